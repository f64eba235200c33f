"""Latent blending: keep the steered image's background where steering changed little.

Steering edits cross-attention outputs everywhere the gate is open, so besides removing the concept
it also shifts the tone and texture of the rest of the image. Blending localises the edit without a
mask from outside: after every denoising step, with ``z_u`` and ``z_s`` the unsteered and steered
latents of a pair (same seed, same step),

    r  = box3(Σ_c |z_s − z_u|) / max over the image      how much steering changed each position
    m  = clip(r / τ, 0, 1)                                  1 where it changed at least τ of the most
    z_s ← m · z_s + (1 − m) · z_u

so positions the steering changed strongly keep the steered latent and the others are pulled back
to the unsteered one. τ = 0 turns blending off (as τ → 0, m → 1 wherever the branches differ);
larger τ keeps more of the unsteered image. Where the branches are identical (α = 0) m = 0 and the
steered latent stays bit-for-bit the unsteered one. The mask is the data-driven counterpart of the
gate map: where, at each step, steering actually moved the image.

Examples:
    >>> u = torch.zeros(1, 4, 8, 8)
    >>> s = u.clone(); s[0, :, 2:4, 2:4] = 1.0; s[0, :, 6, 6] = 0.05  # a strong edit and a slight drift
    >>> new, mask = blend_latents(u, s, threshold=0.3)
    >>> bool((new[0, :, 2:4, 2:4] == 1.0).all()), float(new[0, 0, 6, 6]) < 0.05, tuple(mask.shape)
    (True, True, (1, 8, 8))
    >>> bool((blend_latents(u, u.clone(), threshold=0.3)[0] == u).all())
    True
    >>> Blend(0.3)  # the same, as an intervention for generate(edits=[...])
    Blend(threshold=0.3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..validate import is_real
from .base import EditContext, LatentEdit, register

__all__ = ["Blend", "blend_latents", "check_blend"]


def check_blend(threshold: float) -> float:
    """`threshold` as a float in [0, 1); ValueError otherwise."""
    if not is_real(threshold) or not math.isfinite(float(threshold)):
        raise ValueError(f"blend must be a number in [0, 1) (0 = off), got {threshold!r}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"blend must be in [0, 1) (0 = off; 0.2-0.3 keeps most of the background), got {threshold}")
    return float(threshold)


def blend_latents(unsteered: torch.Tensor, steered: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pull `steered` toward `unsteered` where they differ little.

    Args:
        unsteered: Latents ``(pairs, C, H, W)`` of the unsteered branch.
        steered: Latents of the steered branch, same shape.
        threshold: τ in (0, 1): the fraction of the largest change at which a position is kept
            fully steered.

    Returns:
        The blended steered latents and the mask m ``(pairs, H, W)`` in [0, 1].
    """
    change = (steered - unsteered).abs().sum(1, keepdim=True)  # (pairs, 1, H, W)
    change = F.avg_pool2d(change, 3, stride=1, padding=1, count_include_pad=False)
    peak = change.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(change.dtype).tiny)  # no change: ratio 0
    mask = (change / peak / threshold).clamp(0.0, 1.0)
    blended = torch.where(mask > 0, mask * steered + (1 - mask) * unsteered, unsteered)
    return blended, mask[:, 0]


@register
@dataclass(frozen=True)
class Blend(LatentEdit):
    """Latent blending as an intervention: after every step, `blend_latents` on the edited branch.

    Records the mask m of every step as ``blend_mask``. ``threshold = 0`` is the identity.
    """

    threshold: float = 0.3
    record: ClassVar[str | None] = "blend_mask"

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", check_blend(self.threshold))

    @property
    def is_identity(self) -> bool:
        return self.threshold == 0.0

    def apply_latents(self, step: int, original: torch.Tensor, edited: torch.Tensor,
                      ctx: EditContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return blend_latents(original, edited, self.threshold)
