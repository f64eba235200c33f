"""`FeatureEdit`: scale, clamp or ablate sparse-autoencoder features at a site (a site edit), error term kept.

For every image token h of the SAE's site at an edited block and step, with z = SAE.encode(h) and the SAE's
unit decoder rows W_dec[f]:

    scale:   h' = h + Σ_f (s − 1) · z_f · W_dec[f]       (s = 1 leaves h bit for bit; s = 0 ablates)
    clamp:   h' = h + Σ_f (c − z_f) · W_dec[f]           (the feature set to c on every token)
    ablate:  h' = h − Σ_f z_f · W_dec[f]
    splice:  h' = x̂ = SAE.decode(SAE.encode(h))         (the site's output replaced by the reconstruction)

In the first three, only the chosen features' share of the reconstruction moves; the SAE's error h − x̂ stays in h', so an edit
that changes no feature changes nothing (METHODS.md §7: steering by feature). ``splice`` drops the error
term instead, on every feature: what the model loses when the site passes through the SAE (its splice cost). The SAE is referenced in saved
settings by its folder and digest (`dit_lens.features.sae.load_sae` reads it back and the digest must match).

Examples:
    >>> import tempfile, torch
    >>> from dit_lens.features.sae import SAE
    >>> sae = SAE.new(d_in=4, k=1, expansion=2, seed=0, site="attn2", layers=(0,), steps=(0,),
    ...               model_fingerprint="demo")
    >>> edit = FeatureEdit(sae, features=[3], mode="ablate")
    >>> edit
    FeatureEdit(features=(3,), mode='ablate', scale=0.0, at=At(site='attn2', layers=(0,), steps=None, halves='both'))
    >>> h = torch.randn(1, 5, 4)                     # (rows, tokens, C)
    >>> torch.equal(FeatureEdit(sae, features=[3], scale=1.0).apply(h, None)[0], h)
    True
    >>> from dit_lens.interventions.base import from_dict
    >>> loaded = from_dict(FeatureEdit(load_sae(sae.save(tempfile.mkdtemp() + "/sae")), features=3).to_dict())
    >>> loaded.features, loaded.mode
    ((3,), 'scale')
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..features.sae import SAE, load_sae
from ..model.lens import Lens
from ..model.where import At
from .base import EditContext, SiteEdit, register

__all__ = ["MODES", "FeatureEdit", "feature_delta"]

#: What a `FeatureEdit` does to its features.
MODES = ("scale", "clamp", "ablate", "splice")


def feature_delta(sae: SAE, h: torch.Tensor, features: torch.Tensor, mode: str, value: float) -> torch.Tensor:
    """The change ``(..., C)`` a `FeatureEdit` adds to ``h (..., C)`` (float32)."""
    z = sae.encode(h)[..., features]  # (..., n features)
    if mode == "scale":
        coefficient = (value - 1.0) * z
    elif mode == "clamp":
        coefficient = value - z
    else:
        coefficient = -z
    return coefficient @ sae.W_dec[features]  # (..., C)


@register
@dataclass(frozen=True, eq=False)
class FeatureEdit(SiteEdit):
    """Scale, clamp or ablate SAE features at the SAE's site.

    Attributes:
        sae: The `SAE` (trained on the model this edit runs on, at its site).
        features: Feature indices (one or several; none for ``mode="splice"``).
        scale: ``mode="scale"``: the factor s on the features' activations (1: identity, 0: ablation);
            ``mode="clamp"``: the activation c the features are set to on every token; ignored by ``"ablate"``
            and ``"splice"``.
        mode: One of `MODES`.
        at: Where: the SAE's site, blocks among those it was trained on, steps, guidance halves (default: the
            SAE's site and blocks, every step, both halves).
    """

    sae: SAE = field(repr=False)
    features: Any = ()
    mode: str = "scale"
    scale: float = 0.0
    at: At | None = None  # type: ignore[assignment]  (the field replaces SiteEdit's derived place)

    def __post_init__(self) -> None:
        if not isinstance(self.sae, SAE):
            raise ValueError(f"FeatureEdit.sae must be a trained SAE (dit_lens.train_sae / load_sae), got "
                             f"{type(self.sae).__name__}")
        if self.mode not in MODES:
            raise ValueError(f"FeatureEdit.mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.mode == "splice":
            if self.features not in ((), None, []):
                raise ValueError(f"FeatureEdit(mode='splice') replaces the site's output by the SAE's reconstruction "
                                 f"on every feature; pass no features (got {self.features!r})")
            object.__setattr__(self, "features", ())
        else:
            object.__setattr__(self, "features", self.sae.check_features(self.features, "FeatureEdit.features"))
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real) or not math.isfinite(self.scale):
            raise ValueError(f"FeatureEdit.scale must be a finite number, got {self.scale!r}")
        object.__setattr__(self, "scale", 0.0 if self.mode in ("ablate", "splice") else float(self.scale))
        at = At(self.sae.site, self.sae.layers) if self.at is None else self.at
        if not isinstance(at, At):
            raise ValueError(f"FeatureEdit.at must be a dit_lens.model.where.At, got {at!r}")
        if at.site != self.sae.site:
            raise ValueError(f"FeatureEdit.at.site is {at.site!r} but the SAE was trained on {self.sae.site!r}; edit "
                             f"the SAE's site")
        layers = at.layers if at.layers is not None else self.sae.layers
        foreign = sorted(set(layers) - set(self.sae.layers))
        if foreign:
            raise ValueError(f"FeatureEdit.at.layers {foreign} are not blocks the SAE was trained on "
                             f"({list(self.sae.layers)}); its features are defined there only")
        object.__setattr__(self, "at", At(at.site, layers, at.steps, at.halves))

    @property
    def site(self) -> str:  # type: ignore[override]
        return self.at.site

    @property
    def halves(self) -> str:  # type: ignore[override]
        return self.at.halves

    @property
    def is_identity(self) -> bool:
        return self.mode == "scale" and self.scale == 1.0

    def check(self, lens: Lens, num_inference_steps: int) -> None:
        self.sae.check_fits(lens, self.site, name="FeatureEdit's SAE")
        self.check_at(lens, num_inference_steps)

    def apply(self, h: torch.Tensor, ctx: EditContext | None) -> tuple[torch.Tensor, None]:
        """``h (rows, tokens, C)`` with the chosen features moved (`feature_delta`); at identity, `h` itself."""
        if self.is_identity:
            return h, None
        if self.mode == "splice":
            return self.sae.decode(self.sae.encode(h)).to(device=h.device, dtype=h.dtype), None
        index = torch.tensor(self.features)
        delta = feature_delta(self.sae, h, index, self.mode, self.scale)
        return h + delta.to(device=h.device, dtype=h.dtype), None

    # -- as a value ------------------------------------------------------------------------

    def settings(self) -> dict:
        return {"type": "FeatureEdit", "features": list(self.features), "mode": self.mode, "scale": self.scale,
                "site": self.at.site, "layers": list(self.at.layers), "halves": self.at.halves,
                "steps": None if self.at.steps is None else list(self.at.steps),
                "sae": {"folder": None if self.sae.folder is None else str(self.sae.folder),
                        "digest": self.sae.digest, "k": self.sae.k, "features": self.sae.num_features}}

    def to_dict(self) -> dict:
        """Settings with the SAE referenced by its saved folder and digest (an unsaved SAE is refused)."""
        if self.sae.folder is None:
            raise ValueError("FeatureEdit refers to its SAE by the folder it is saved in; save it first "
                             "(sae = load_sae(sae.save(folder))) or use the SAE train_sae returned")
        return self.settings()

    @classmethod
    def from_dict(cls, data: dict) -> "FeatureEdit":
        reference = data.get("sae") or {}
        if not reference.get("folder"):
            raise ValueError("this FeatureEdit names no saved SAE folder; it cannot be rebuilt")
        sae = load_sae(Path(reference["folder"]))
        if sae.digest != reference.get("digest"):
            raise ValueError(f"the SAE in {reference['folder']} (digest {sae.digest}) is not the one this FeatureEdit "
                             f"was made with (digest {reference.get('digest')}); point it at that SAE's folder")
        at = At(data["site"], data["layers"], data.get("steps"), data.get("halves", "both"))
        return cls(sae, features=data["features"], mode=data["mode"], scale=data["scale"], at=at)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureEdit):
            return NotImplemented
        return self.settings() == other.settings()

    def __hash__(self) -> int:
        return hash((self.sae.digest, self.features, self.mode, self.scale))

    def __repr__(self) -> str:
        return f"FeatureEdit(features={self.features}, mode={self.mode!r}, scale={self.scale!r}, at={self.at!r})"
