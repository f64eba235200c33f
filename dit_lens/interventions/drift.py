"""Latent drifting at inference: shift the mean of every reverse transition by a constant δ.

Latent Drifting (arXiv 2412.20651) moves a diffusion model's trajectories off the prior by adding a
drift δ to the mean of each reverse transition, and starts them from drifted noise:

    z_T = ε + δ,        z_{t-1} ← step(z_t) + δ   after every denoising step,

so the edited branch of a pair drifts while its original twin is the plain run. δ is one number for
every channel or, as in the unofficial implementation, one number per latent channel. The default,
``steps=None``, drifts z_T only: the sampling that matches a model fine-tuned with drift by
`dit_lens.finetune`, whose forward process has the drifted marginal N(√ᾱ_t·x_0 + √(1 − ᾱ_t)·δ, (1 − ᾱ_t)·I)
at every t, which the plain sampler then follows. ``steps=(0.0, 1.0)`` is the seed's reverse process
above (after every step).

Examples:
    >>> import torch
    >>> LatentDrift(0.1)
    LatentDrift(delta=0.1, steps=None, initial=True)
    >>> drift = LatentDrift(0.1, steps=(0.0, 1.0))
    >>> z = torch.zeros(1, 4, 2, 2)  # (pairs, C, H, W)
    >>> new, _ = drift.apply_latents(0, z, z)
    >>> round(float(new.mean()), 4), round(float(drift.apply_initial(z).mean()), 4)
    (0.1, 0.1)
    >>> per_channel = LatentDrift((0.0, 0.5, 0.0, -0.5), steps=(0.0, 1.0))
    >>> per_channel.apply_latents(0, z, z)[0][0, :, 0, 0].tolist()
    [0.0, 0.5, 0.0, -0.5]
    >>> from dit_lens import intervention_from_dict
    >>> intervention_from_dict(per_channel.to_dict()) == per_channel
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..model.lens import Lens
from ..validate import is_real
from .base import EditContext, LatentEdit, register
from .region import check_window, window_steps

__all__ = ["LatentDrift"]


def _check_delta(value: Any) -> float | tuple[float, ...]:
    """δ as a finite float, or a non-empty tuple of finite floats (one per latent channel)."""
    fix = "pass a finite number such as delta=0.1, or one per latent channel such as delta=(0.1, 0.0, 0.0, 0.0)"
    if is_real(value):
        if not math.isfinite(float(value)):
            raise ValueError(f"LatentDrift.delta must be finite, got {value!r}; {fix}")
        return float(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list, np.ndarray, torch.Tensor)):
        raise ValueError(f"LatentDrift.delta must be a number or a list of numbers, got {type(value).__name__} "
                         f"{value!r}; {fix}")
    values = value.tolist() if isinstance(value, (np.ndarray, torch.Tensor)) else list(value)
    if not values or not all(is_real(v) and math.isfinite(float(v)) for v in values):
        raise ValueError(f"LatentDrift.delta per channel must be a non-empty list of finite numbers, got {value!r}; "
                         f"{fix}")
    return tuple(float(v) for v in values)


@register
@dataclass(frozen=True)
class LatentDrift(LatentEdit):
    """Add a drift δ to the edited branch's initial noise, and to its latents after each step in `steps`.

    δ = 0 is the identity (the edited branch is bit-for-bit the original). Reads nothing of the original
    branch, so it may be the only edit of a run. Records nothing.

    Attributes:
        delta: δ, one number for every channel or a tuple with one per latent channel.
        steps: ``(start, end)`` fractions of the run after whose steps δ is added; None (the default):
            after none, so only z_T is drifted, the form a model fine-tuned with ``drift=δ`` was trained
            for. ``(0.0, 1.0)`` adds δ after every step too (the seed's reverse process); on the embedded
            world that form was far too strong (RESULTS: Latent Drifting), so it is asked for by name.
        initial: Also drift the initial noise, z_T = ε + δ (as handed to the pipeline, before the sampler
            scales it by ``init_noise_sigma``, which is 1 for DPM-Solver and DDIM).
    """

    record: ClassVar[str | None] = None
    reads_original: ClassVar[bool] = False
    delta: float | tuple[float, ...] = 0.0
    steps: tuple[float, float] | None = None
    initial: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "delta", _check_delta(self.delta))
        if self.steps is not None:
            object.__setattr__(self, "steps", check_window(self.steps, "LatentDrift.steps"))
        if not isinstance(self.initial, (bool, np.bool_)):
            raise ValueError(f"LatentDrift.initial must be True (drift z_T too) or False, got {self.initial!r}")
        object.__setattr__(self, "initial", bool(self.initial))

    @property
    def is_identity(self) -> bool:
        return all(d == 0.0 for d in self._deltas())

    @property
    def changes_initial(self) -> bool:
        return self.initial and not self.is_identity

    def _deltas(self) -> tuple[float, ...]:
        return self.delta if isinstance(self.delta, tuple) else (self.delta,)

    def _check_channels(self, channels: int) -> None:
        if isinstance(self.delta, tuple) and len(self.delta) != channels:
            raise ValueError(f"LatentDrift.delta has {len(self.delta)} values, but the latents have {channels} "
                             f"channels; give one value per channel, or one number for all of them")

    def check(self, lens: Lens, num_inference_steps: int) -> None:
        self._check_channels(int(lens.pipeline.transformer.config.in_channels))

    def _drift(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.delta, tuple):
            return latents + self.delta
        self._check_channels(latents.shape[1])
        delta = torch.tensor(self.delta, dtype=latents.dtype, device=latents.device)  # (C,)
        return latents + delta.view(1, -1, *([1] * (latents.ndim - 2)))  # (1, C, 1, 1) broadcast

    def apply_initial(self, latents: torch.Tensor, ctx: EditContext | None = None) -> torch.Tensor:
        return self._drift(latents) if self.initial else latents

    def apply_latents(self, step: int, original: torch.Tensor, edited: torch.Tensor,
                      ctx: EditContext | None = None) -> tuple[torch.Tensor, None]:
        if self.steps is None or (ctx is not None and step not in window_steps(self.steps, ctx.num_inference_steps)):
            return edited, None
        return self._drift(edited), None
