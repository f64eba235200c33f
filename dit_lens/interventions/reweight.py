"""`Reweight`: scale the attention paid to chosen keys — the smallest attention-weight edit.

Examples:
    >>> import torch
    >>> from dit_lens.interventions.base import from_dict
    >>> edit = Reweight(tokens=(1,), scale=2.0, layers=(0,))
    >>> edit
    Reweight(site='attn2.weights', tokens=(1,), scale=2.0, layers=(0,), steps=None, halves='both', renormalize=True)
    >>> w = torch.full((1, 1, 1, 4), 0.25)  # (rows, heads, queries, keys)
    >>> new, _ = edit.apply(w, None)
    >>> [round(x, 3) for x in new.flatten().tolist()]
    [0.2, 0.4, 0.2, 0.2]
    >>> from_dict(edit.to_dict()) == edit
    True
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..model.lens import Lens
from .base import EditContext, SiteEdit, check_where, register

__all__ = ["Reweight"]


@register
@dataclass(frozen=True)
class Reweight(SiteEdit):
    """Scale the attention paid to chosen keys (text tokens at ``attn2.weights``), per head and query.

    ``w'[..., k] = scale · w[..., k]`` for k in `tokens`; with `renormalize` each query's weights are
    divided by their new sum so they stay a distribution. ``scale = 1`` is the identity (the run is
    bit-identical to the unedited one). Use `dit_lens.model.tokens` to find a word's tokens.

    Attributes:
        site: A weights site, ``"attn2.weights"`` (text keys) or ``"attn1.weights"`` (image keys).
        tokens: Key indices to scale.
        scale: Factor (> 0 strengthens, < 1 weakens, 0 removes them).
        layers: Blocks (``None``: all).
        steps: Denoising steps (``None``: all).
        halves: Guidance halves to edit.
        renormalize: Keep each query's weights summing to 1.
    """

    site: str = "attn2.weights"
    tokens: tuple[int, ...] = ()
    scale: float = 1.0
    layers: tuple[int, ...] | None = None
    steps: tuple[int, ...] | None = None
    halves: str = "both"
    renormalize: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site.endswith(".weights"):
            raise ValueError(f"Reweight.site must be an attention-weights site such as 'attn2.weights', got {self.site!r}")
        tokens = (self.tokens,) if isinstance(self.tokens, numbers.Integral) else tuple(self.tokens)
        if not tokens or not all(isinstance(t, numbers.Integral) and t >= 0 for t in tokens):
            raise ValueError(f"Reweight.tokens must be a non-empty list of key indices >= 0, got {self.tokens!r}")
        object.__setattr__(self, "tokens", tuple(sorted({int(t) for t in tokens})))
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real) or not math.isfinite(self.scale) \
                or self.scale < 0:
            raise ValueError(f"Reweight.scale must be a finite number >= 0, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        layers, steps = check_where("Reweight", self.layers, self.steps, self.halves)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "steps", steps)

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0

    def check(self, lens: Lens, num_inference_steps: int) -> None:
        if lens.family.attention_of(self.site) is None:
            raise ValueError(f"Reweight.site {self.site!r} is not a weights site of {lens.family.name}")
        self.check_at(lens, num_inference_steps)

    def apply(self, h: torch.Tensor, ctx: EditContext | None) -> tuple[torch.Tensor, None]:
        if max(self.tokens) >= h.shape[-1]:
            raise ValueError(f"Reweight.tokens {list(self.tokens)} reach past the {h.shape[-1]} keys of {self.site}")
        new = h.clone()
        index = torch.tensor(self.tokens, device=h.device)
        new[..., index] = new[..., index] * self.scale  # (rows, heads, queries, keys)
        if self.renormalize:
            new = new / new.sum(-1, keepdim=True).clamp_min(torch.finfo(new.dtype).tiny)
        return new, None
