"""`CaptureSettings`: everything besides the model, prompts and seeds that decides a capture's values.

Examples:
    >>> CaptureSettings(num_inference_steps=4, site="attn2.weights").to_dict()["site"]
    'attn2.weights'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from ..model.where import At, check_indices
from ..validate import check_guidance, check_steps

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["BRANCHES", "DEFAULT_BATCH", "REDUCTIONS", "CaptureSettings"]

BRANCHES = ("cond", "uncond", "both")
#: Runs per pipeline call when `capture` is not told otherwise.
DEFAULT_BATCH = 8
#: ``"mean"``: over image tokens (and, at a weights site, over heads and image-token queries too);
#: ``"heads"``: over heads only (weights sites); ``None``: nothing (output sites).
REDUCTIONS = ("mean", "heads", None)


@dataclass(frozen=True)
class CaptureSettings:
    """Everything besides the model, prompts and seeds that decides a capture's values.

    Attributes:
        num_inference_steps: Denoising steps T (>= 1).
        guidance_scale: Classifier-free guidance scale g; ``"uncond"``/``"both"`` need g > 1.
        layers: Block indices, ascending; ``None`` until `resolve` fills in every block.
        site: Site name in the model family's table (``"attn2"`` = the text-conditioning attention's
            output, in every family).
        branch: ``"cond"``, ``"uncond"`` or ``"both"`` halves of the guidance batch.
        reduce: ``"mean"`` over image tokens, or ``None`` to keep every token. At a weights site
            (``"attn2.weights"``): ``"mean"`` over heads and image-token queries (one value per key),
            or ``"heads"``, the mean over heads (a query × key map); every head, query and key
            (``None``) is refused there.
    """

    num_inference_steps: int = 20
    guidance_scale: float = 4.5
    layers: tuple[int, ...] | None = None
    site: str = "attn2"
    branch: str = "cond"
    reduce: str | None = "mean"

    def __post_init__(self) -> None:
        steps = check_steps(self.num_inference_steps)
        object.__setattr__(self, "guidance_scale", check_guidance(self.guidance_scale))
        if self.branch not in BRANCHES:
            raise ValueError(f"unknown branch={self.branch!r}; pass one of {list(BRANCHES)}")
        if self.branch != "cond" and self.guidance_scale <= 1:
            raise ValueError(
                f"branch={self.branch!r} needs classifier-free guidance, but guidance_scale="
                f"{self.guidance_scale} <= 1 runs no unconditional branch; raise guidance_scale or "
                f"pass branch='cond'"
            )
        if not isinstance(self.site, str):
            raise ValueError(f"site must be a site name such as 'attn2', got {self.site!r}")
        if self.site.endswith(".weights"):
            if self.reduce is None:
                raise ValueError(
                    f"reduce=None at {self.site} would keep heads × queries × keys floats for every step and "
                    f"layer (at PixArt-alpha 1024 px: 16 heads × 4096 × 120 × 4 B = 31 MB per step and layer, "
                    f"17 GB per run of 20 steps × 28 layers); pass reduce='heads' (mean over heads: queries × "
                    f"keys), reduce='mean' (one value per key), or read raw weights with a Hook in "
                    f"dit_lens.trace.runner.traced_generate"
                )
            if self.reduce not in ("mean", "heads"):
                raise ValueError(f"unknown reduce={self.reduce!r} for {self.site}; pass 'mean' (over heads and "
                                 f"image-token queries, per key) or 'heads' (over heads, per query and key)")
        elif self.reduce not in ("mean", None):
            raise ValueError(
                f"unknown reduce={self.reduce!r} for site {self.site!r}; pass reduce='mean' (mean over image "
                f"tokens) or reduce=None (every token); 'heads' applies to weights sites such as 'attn2.weights'"
            )
        if self.layers is not None:
            layers = self.layers if isinstance(self.layers, (int, str)) else tuple(self.layers)
            if isinstance(layers, tuple) and len(set(layers)) != len(layers):
                raise ValueError(f"layers has duplicates: {list(layers)}; list each block once")
            object.__setattr__(self, "layers", check_indices("layers", layers))
        object.__setattr__(self, "num_inference_steps", int(steps))
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))

    def resolve(self, lens: Lens, name: str = "capture") -> "CaptureSettings":
        """These settings checked against `lens`, with ``layers=None`` expanded to every block.

        The site and blocks are checked by `dit_lens.model.where.At`, as every edit's and hook's are; `name`
        (the calling function) labels the messages.
        """
        check_steps(self.num_inference_steps, lens.pipeline.scheduler)  # what the sampler can run
        if self.branch != "cond" and not lens.family.cfg:
            raise ValueError(f"branch={self.branch!r} needs classifier-free guidance, but {lens.family.label} is "
                             f"guidance-distilled (no unconditional branch runs); pass branch='cond'")
        where = At(self.site, self.layers, steps=()).resolve(lens, 0, name=name)  # site and blocks
        return replace(self, layers=where.layers)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = None if self.layers is None else list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CaptureSettings":
        data = dict(data)
        if data.get("layers") is not None:
            data["layers"] = tuple(data["layers"])
        return cls(**data)
