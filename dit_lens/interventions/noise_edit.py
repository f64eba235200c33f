"""`OptimizedNoise`: the latent edit that starts a run's edited branch from optimised initial noise
(made by `dit_lens.optimize.noise.optimize_noise`), with the measurements of how Gaussian it stayed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
import xarray as xr
from scipy import stats

from ..model.lens import Lens
from ..trace.runner import initial_noise
from ..validate import check_seeds, is_real
from .base import EditContext, LatentEdit, register

__all__ = ["OptimizedNoise"]

@register
@dataclass(frozen=True, eq=False)
class OptimizedNoise(LatentEdit):
    """Start the edited branch from each seed's optimised noise (a latent edit of z_T only).

    ``generate(lens, prompt, seeds=..., edits=[it])`` gives pairs whose original starts from the seed's
    own noise and whose edited twin starts from `noise`; every later step is the plain run's. Made by
    `optimize_noise`; per-seed measurements are for `report`. Run it with the steps and guidance scale it
    was optimised for: under other settings the noise is still a plausible draw, but not optimised for them.

    Attributes:
        prompt: The prompt it was optimised for (a run with another prompt is refused).
        seeds: The seeds it holds noise for.
        noise: ``(seeds, C, h, w)`` float32, the optimised z_T of each seed.
        objective: What was maximised.
        before, after: The objective at ε and at `noise`, per seed, on the differentiable run.
        best_iteration: The iteration whose noise was kept, per seed (0: the seed's own noise).
        norm_ratio, cosine: ‖z‖ / ‖ε‖ and cos(z, ε) per seed.
        iterations, lr, max_angle, target, num_inference_steps, grad_steps, guidance_scale: `optimize_noise`'s.
        model_fingerprint: The model it was optimised on (`dit_lens.Lens.fingerprint`).
    """

    record: ClassVar[str | None] = None
    reads_original: ClassVar[bool] = False
    prompt: str = ""
    seeds: tuple[int, ...] = ()
    noise: Any = None
    objective: str = ""
    before: tuple[float, ...] = ()
    after: tuple[float, ...] = ()
    best_iteration: tuple[int, ...] = ()
    norm_ratio: tuple[float, ...] = ()
    cosine: tuple[float, ...] = ()
    iterations: int = 0
    lr: float = 0.0
    max_angle: float | None = None
    target: float | None = None
    num_inference_steps: int = 0
    grad_steps: int = 0
    guidance_scale: float = 1.0
    model_fingerprint: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise ValueError(f"OptimizedNoise.prompt must be the prompt the noise was optimised for, "
                             f"got {self.prompt!r}")
        object.__setattr__(self, "seeds", tuple(check_seeds(self.seeds)))
        noise = np.array(self.noise, dtype=np.float32)  # a copy: the value owns its noise
        if noise.ndim != 4 or len(noise) != len(self.seeds):
            raise ValueError(f"OptimizedNoise.noise must be (seeds, C, h, w) with one row per seed "
                             f"({len(self.seeds)}), got shape {noise.shape}")
        if not np.isfinite(noise).all():
            raise ValueError("OptimizedNoise.noise holds NaN or inf; optimise it again")
        noise.setflags(write=False)
        object.__setattr__(self, "noise", noise)
        for name in ("before", "after", "best_iteration", "norm_ratio", "cosine"):
            values = tuple(getattr(self, name))
            if values and (len(values) != len(self.seeds) or not all(is_real(v) for v in values)):
                raise ValueError(f"OptimizedNoise.{name} must hold one number per seed ({len(self.seeds)}), "
                                 f"got {values!r}")
            cast = int if name == "best_iteration" else float
            object.__setattr__(self, name, tuple(cast(v) for v in values))

    @property
    def changes_initial(self) -> bool:
        return True

    def check(self, lens: Lens, num_inference_steps: int) -> None:
        want = tuple(initial_noise(lens, [0]).shape[1:])
        if tuple(self.noise.shape[1:]) != want:
            raise ValueError(f"OptimizedNoise holds noise of shape {self.noise.shape[1:]}, but this model starts from "
                             f"{want}; optimise the noise on this model")

    def apply_initial(self, latents: torch.Tensor, ctx: EditContext | None = None) -> torch.Tensor:
        if ctx is None or not ctx.seeds:
            raise ValueError("OptimizedNoise replaces each seed's noise, so it needs the run's seeds: use it in "
                             "generate(..., seeds=...) or reprompt, not on inverted images")
        other = [p for p in ctx.prompts if p != self.prompt]
        if other:
            raise ValueError(f"this noise was optimised for the prompt {self.prompt!r}, but the run's edited branch "
                             f"uses {other[0]!r}; generate with {self.prompt!r}, or optimise noise for that prompt")
        missing = [s for s in ctx.seeds if s not in self.seeds]
        if missing:
            raise ValueError(f"no optimised noise for seeds {missing}: this holds seeds {list(self.seeds)}; generate "
                             f"with those, or optimise noise for these")
        rows = [self.seeds.index(s) for s in ctx.seeds]
        noise = torch.from_numpy(self.noise[rows])  # (pairs, C, h, w); indexing copies the read-only array
        return noise.to(device=latents.device, dtype=latents.dtype)

    def apply_latents(self, step: int, original: torch.Tensor, edited: torch.Tensor,
                      ctx: EditContext | None = None) -> tuple[torch.Tensor, None]:
        return edited, None  # only z_T changes

    def report(self) -> xr.Dataset:
        """Per seed: the objective before and after (on the differentiable run), the kept iteration, and how
        plausible the noise is as a N(0, I) draw: norm ratio, cosine to ε, the Kolmogorov-Smirnov p-value
        of its entries against N(0, 1), their mean and std, and the correlation of neighbouring entries."""
        flat = self.noise.reshape(len(self.seeds), -1).astype(np.float64)
        right = _neighbours(self.noise[..., :, 1:], self.noise[..., :, :-1])
        below = _neighbours(self.noise[..., 1:, :], self.noise[..., :-1, :])
        per_seed = {
            "before": self.before, "after": self.after, "best_iteration": self.best_iteration,
            "norm_ratio": self.norm_ratio, "cosine": self.cosine,
            "ks_pvalue": [float(stats.kstest(row, "norm").pvalue) for row in flat],
            "entry_mean": flat.mean(1), "entry_std": flat.std(1), "neighbour_correlation": (right + below) / 2,
        }
        ds = xr.Dataset({k: ("seed", np.asarray(v)) for k, v in per_seed.items() if len(v)},
                        coords={"seed": list(self.seeds)})
        ds.attrs.update({k: v for k, v in self.settings().items() if v is not None and k != "seeds"})
        return ds

    def settings(self) -> dict:
        """How the noise was made, and its digest (the noise and per-seed measures are in `to_dict`)."""
        data: dict = {"type": "OptimizedNoise"}
        for f in fields(self):
            if f.name not in ("noise",) + _PER_SEED:
                value = getattr(self, f.name)
                data[f.name] = list(value) if isinstance(value, tuple) else value
        digest = hashlib.blake2b(np.ascontiguousarray(self.noise).tobytes(), digest_size=8).hexdigest()
        return {**data, "noise_shape": [int(n) for n in self.noise.shape], "noise_digest": digest}

    def to_dict(self) -> dict:
        return {**self.settings(), "noise": self.noise.tolist(), **{k: list(getattr(self, k)) for k in _PER_SEED}}

    @classmethod
    def from_dict(cls, data: dict) -> "OptimizedNoise":
        value = cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        if "noise_digest" in data and value.settings()["noise_digest"] != data["noise_digest"]:
            raise ValueError("the saved OptimizedNoise's noise does not match its digest; the file is corrupt")
        return value

    def __repr__(self) -> str:
        return (f"OptimizedNoise({self.prompt!r}, seeds={list(self.seeds)}, objective={self.objective or '?'}, "
                f"{self.iterations} iterations)")


_PER_SEED = ("before", "after", "best_iteration", "norm_ratio", "cosine")


def _neighbours(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of paired entries per seed (``(seeds, ...)`` each)."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


