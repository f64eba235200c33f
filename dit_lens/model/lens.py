"""`load`: one way to open a diffusers DiT pipeline, hooked by nnsight, in eval mode.

The embedded world, a user's PixArt-alpha/Sigma, SANA, SD3 or Flux folder and an already built pipeline all go through
the same code path, so what is measured on the embedded model is measured the same way on real
weights.

Examples:
    >>> from dit_lens.model.builders import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> lens.num_layers, lens.width, lens.token_grid
    (2, 16, (4, 4))
    >>> image = lens.plain("a polyp", seed=0, num_inference_steps=2)
    >>> image.shape
    (16, 16, 3)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapters import merge_adapter
from .sites import Family, family_of

__all__ = ["Lens", "load", "EMBEDDED_PIPELINE"]

#: Where the shipped embedded world's pipeline lives (built by ``dit-lens world build``).
EMBEDDED_PIPELINE = Path(__file__).resolve().parents[1] / "embedded" / "pipeline"


@dataclass(eq=False)
class Lens:
    """A diffusers DiT pipeline together with its nnsight wrapper and its site table.

    Attributes:
        pipeline: The diffusers pipeline, every module in eval mode.
        model: The nnsight ``DiffusionModel`` over the same pipeline (same module objects).
        family: The denoiser's site table.
        source: Where the pipeline came from (``"embedded"``, a folder, or ``"<object>"``).
        lora: The LoRA adapter folder merged into the denoiser, if any.
    """

    pipeline: Any
    model: Any
    family: Family
    source: str
    lora: str | None = None
    pipeline_kwargs: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        """One line: the family, where it came from, its shape and where it runs (not the module tree)."""
        adapter = f", lora={self.lora!r}" if self.lora else ""
        return (f"Lens({self.family.name}, source={self.source!r}{adapter}, {self.num_layers} layers × width "
                f"{self.width}, tokens {self.token_grid[0]}×{self.token_grid[1]}, {self.device.type}, "
                f"{str(self.denoiser.dtype).removeprefix('torch.')})")

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.family.denoiser)

    @property
    def blocks(self) -> list:
        """Every transformer block in the order the denoiser runs them (for Flux: the double-stream blocks,
        then the single-stream ones); dit-lens' layer i is ``blocks[i]``."""
        first = list(getattr(self.denoiser, self.family.blocks))
        if self.family.single is None:
            return first
        return first + list(getattr(self.denoiser, self.family.single.blocks))

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def split(self) -> int:
        """How many blocks the denoiser's first block list holds (all of them but for Flux)."""
        return len(getattr(self.denoiser, self.family.blocks))

    def part(self, layer: int) -> Family:
        """The layout of block `layer` (Flux's single-stream blocks have their own)."""
        return self.family.part(layer, self.split)[0]

    def layers_with(self, site: str) -> list[int]:
        """The blocks that have `site` (every block, but for a site of one of Flux's two block lists)."""
        return [layer for layer in range(self.num_layers) if site in self.part(layer).sites]

    def site_module(self, site: str, layer: int) -> torch.nn.Module:
        """The module of `site` (``"attn2.weights"``: the weights submodule of its processor) in block `layer`."""
        from .sites import site_module

        return site_module(self.pipeline, self.family, site, layer, self.split)

    def guided(self, guidance_scale: float) -> bool:
        """Whether a run at `guidance_scale` has an unconditional batch: classifier-free guidance above 1, never
        on a guidance-distilled family (Flux), whose scale is an input of the transformer."""
        return self.family.cfg and float(guidance_scale) > 1

    def text_tokens(self) -> int:
        """How many text tokens precede the image tokens in a `Family.sequence_sites` output (0 elsewhere)."""
        if self.family.single is None or not self.family.single.sequence_sites:
            return 0
        from .tokens import text_keys

        return text_keys(self)

    @property
    def width(self) -> int:
        """Channels C of the residual stream (and of every attn2 output)."""
        return int(self.denoiser.config.num_attention_heads * self.denoiser.config.attention_head_dim)

    @property
    def token_grid(self) -> tuple[int, int]:
        """(rows, cols) of image tokens at the default resolution."""
        patch = int(self.denoiser.config.patch_size) * self.family.pack
        scale = self.pipeline.vae_scale_factor
        return (
            self.pipeline_kwargs["height"] // scale // patch,
            self.pipeline_kwargs["width"] // scale // patch,
        )

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def generator(self, seed: int) -> torch.Generator:
        """The generator the plain call uses for `seed`."""
        return torch.Generator(self.device).manual_seed(int(seed))

    def plain(
        self,
        prompt: str,
        *,
        seed: int,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.5,
    ) -> np.ndarray:
        """The unhooked reference call; returns one image ``(H, W, 3)`` float in [0, 1]."""
        out = self.pipeline(
            prompt,
            generator=self.generator(seed),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            output_type="np",
            **self.pipeline_kwargs,
        )
        return out.images[0]

    @cached_property
    def fingerprint(self) -> str:
        """Content hash of everything that decides what the pipeline computes.

        Covers every module's weights and buffers in full (a merged LoRA adapter included) and its
        config, the tokenizer (vocabulary, added and special tokens, lengths, padding and
        truncation sides), the scheduler's settings and the pipeline's class. See
        `dit_lens.model.fingerprint`.
        """
        from .fingerprint import fingerprint

        return fingerprint(self.pipeline)

    def provenance(self) -> dict:
        """What identifies this model in saved results."""
        from ..version import __version__

        return {
            "model_source": self.source,
            "model_fingerprint": self.fingerprint,
            "model_class": type(self.pipeline).__name__,
            "denoiser_class": self.family.name,
            "lora": self.lora or "",
            "num_layers": self.num_layers,
            "width": self.width,
            "dit_lens_version": __version__,
        }


def load(
    source: Any,
    *,
    lora: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    allow_other_base: bool = False,
) -> Lens:
    """Open a diffusers DiT pipeline for capture and steering.

    Args:
        source: ``"embedded"`` (the shipped endoscopy world), a local diffusers pipeline folder
            (one with ``model_index.json``; PixArt-alpha, PixArt-Sigma, SANA, SD3 and Flux are supported), or an
            already built diffusers pipeline.
        lora: A local adapter folder merged into the weights: a fine-tune written by `dit_lens.finetune`
            (checked against the digests in its ``finetune.json`` and against the base model it was
            trained on), or a plain peft LoRA of the denoiser (``adapter_config.json`` + weights; with
            a text encoder LoRA in ``text_encoder/``). See `dit_lens.model.adapters`.
        device: Where to run (default: where the pipeline already is, CPU for folders).
        dtype: Weight dtype (default: as stored).
        allow_other_base: Merge a dit-lens fine-tune into a model other than the one it was trained on
            (same architecture, other weights); refused by default.

    Returns:
        A `Lens` whose pipeline is in eval mode.

    Raises:
        FileNotFoundError: `source` or `lora` is a path that does not exist.
        ValueError: the folder is not a diffusers pipeline; `lora` is not an adapter, is damaged
            (`dit_lens.storage.DamagedError`), is for another model, or was trained on another base.
        TypeError: the pipeline's denoiser is not a supported cross-attention DiT.
    """
    pipeline, label = _open_pipeline(source)
    family = family_of(pipeline)
    lora_label = None
    if lora is not None:
        lora_label = str(merge_adapter(pipeline, family, lora, allow_other_base=allow_other_base))
    if device is not None or dtype is not None:
        pipeline.to(device=device, dtype=dtype)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    pipeline.set_progress_bar_config(disable=True)
    return Lens(
        pipeline=pipeline,
        model=_wrap(pipeline),
        family=family,
        source=label,
        lora=lora_label,
        pipeline_kwargs=_pipeline_kwargs(pipeline, family),
    )


def _open_pipeline(source: Any) -> tuple[Any, str]:
    if not isinstance(source, (str, Path)):
        if not hasattr(source, "components"):
            raise TypeError(
                f"load() takes 'embedded', a pipeline folder or a diffusers pipeline, "
                f"got {type(source).__name__}"
            )
        return source, "<object>"
    if str(source) == "embedded":
        if not (EMBEDDED_PIPELINE / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the embedded world is not installed at {EMBEDDED_PIPELINE}; "
                f"build it with `dit-lens world build`"
            )
        path, label = EMBEDDED_PIPELINE, "embedded"
    else:
        path, label = Path(source).expanduser(), str(source)
    if not path.exists():
        raise FileNotFoundError(f"no such pipeline folder: {path}")
    index = path / "model_index.json"
    if not path.is_dir() or not index.is_file():
        raise ValueError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); pass the folder "
            f"written by `pipeline.save_pretrained(...)`, or 'embedded'"
        )
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{index} is not a valid diffusers model_index.json: {err}") from err
    import diffusers

    pipeline_cls = getattr(diffusers, class_name, None)
    if pipeline_cls is None:
        raise ValueError(f"{index} names pipeline class {class_name!r}, unknown to diffusers")
    from ..validate import check_pipeline_folder

    check_pipeline_folder(path)  # names the missing or truncated part, before diffusers does
    return pipeline_cls.from_pretrained(path), label


def _pipeline_kwargs(pipeline: Any, family: Family) -> dict:
    denoiser = getattr(pipeline, family.denoiser)
    if "sample_size" in denoiser.config:
        side = int(denoiser.config.sample_size) * int(pipeline.vae_scale_factor)
    else:  # Flux: the transformer has no size; its autoencoder's sample size is the image side
        side = int(pipeline.vae.config.sample_size)
    kwargs: dict = {"height": side, "width": side}
    import inspect

    accepted = inspect.signature(type(pipeline).__call__).parameters
    if "use_resolution_binning" in accepted:
        kwargs["use_resolution_binning"] = False  # non-standard sizes are rejected otherwise
    if "clean_caption" in accepted:
        kwargs["clean_caption"] = False  # same prompt text whatever optional packages exist
    kwargs.update({k: v for k, v in family.call_kwargs.items() if k in accepted})
    return kwargs


def _wrap(pipeline: Any) -> Any:
    from nnsight.modeling.diffusion import DiffusionModel, _PipelineModule

    model = DiffusionModel(_PipelineModule(pipeline))
    model.pipeline = pipeline
    return model
