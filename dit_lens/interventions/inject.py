"""`Inject`: copy the original branch's site output into the edited branch (feature injection).

Plug-and-Play editing is this edit at two sites: the block outputs (spatial features) and the
self-attention weights (which carry what the published method injects as queries and keys:
softmax(q·kᵀ) is all the edited branch takes from them). On a weights site the edited branch keeps
its own values, so it attends the way the original did while saying what its own prompt says.

Examples:
    >>> import torch
    >>> from dit_lens.interventions.base import EditContext
    >>> edit = Inject("block", layers=(0,), steps=(0, 1))
    >>> twin = torch.ones(1, 4, 8)
    >>> ctx = EditContext(0, 0, "block", ("cond",), 1, original=lambda: twin)
    >>> new, _ = edit.apply(torch.zeros(1, 4, 8), ctx)
    >>> bool(torch.equal(new, twin))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..model.lens import Lens
from .base import EditContext, SiteEdit, check_where, register

__all__ = ["Inject"]


@register
@dataclass(frozen=True)
class Inject(SiteEdit):
    """Replace the edited rows' `site` output with their unedited twins' at `layers` and `steps`.

    Attributes:
        site: Any site of the family, output (``"block"``, ``"attn1"``, ...) or weights
            (``"attn1.weights"``).
        layers: Blocks (``None``: all).
        steps: Denoising steps (``None``: all); an empty tuple injects nothing (the identity).
        halves: Guidance halves to inject into; each takes the twin's same half.
    """

    reads_original: ClassVar[bool] = True

    site: str = "block"
    layers: tuple[int, ...] | None = None
    steps: tuple[int, ...] | None = None
    halves: str = "both"

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site:
            raise ValueError(f"Inject.site must be a site name such as 'block' or 'attn1.weights', got {self.site!r}")
        empty = self.steps is not None and len(tuple(self.steps)) == 0
        layers, steps = check_where("Inject", self.layers, None if empty else self.steps, self.halves)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "steps", () if empty else steps)

    @property
    def is_identity(self) -> bool:
        return self.steps == ()

    def check(self, lens: Lens, num_inference_steps: int) -> None:
        self.check_at(lens, num_inference_steps)  # site, blocks and steps

    def apply(self, h: torch.Tensor, ctx: EditContext | None) -> tuple[torch.Tensor, None]:
        if ctx is None:
            raise ValueError("Inject copies from the original branch and runs only inside generate/edit")
        return ctx.original(), None
