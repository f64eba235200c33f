"""Regions: where on the image an edit may act, and `Confine`, which keeps the original outside one.

A `Region` is a mask, one for every image or one per seed:

- at image size ``(H, W)`` (pixels) or at the denoiser's token grid ``(rows, cols)`` (one value per
  image token), bool or float in [0, 1];
- a numpy array, a torch tensor, or an ``xarray.DataArray``; a DataArray with a leading ``seed`` dim
  (e.g. the segmenter's masks of a run's original images) gives each seed its own mask, and an edit
  picks a pair's mask by the pair's seed.

Edits read a region at the resolution they work at, by area averaging: `Region.tokens` (the share of
each token's patch inside the region, for attention and token edits) and `Region.latents` (for latent
edits). `Region.focus` is the blurred, max-normalised token mask Ω that attention regulation uses.

Examples:
    >>> import numpy as np
    >>> mask = np.zeros((16, 16), bool); mask[:8, :8] = True  # the top-left quarter of a 16×16 image
    >>> region = Region.of(mask)
    >>> region
    Region(1 mask of 16×16, 25% inside)
    >>> region.tokens((4, 4), seeds=[0]).reshape(4, 4)[0].tolist()  # (pairs, tokens) on a 4×4 grid
    [1.0, 1.0, 0.0, 0.0]
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from ..model.lens import Lens
from ..validate import as_array, check_seeds
from .base import EditContext, LatentEdit, register

__all__ = ["Confine", "MaskedValue", "Region", "as_region", "window_steps"]


@dataclass(frozen=True, eq=False)
class Region:
    """A validated mask (use `Region.of`): ``mask (masks, h, w)`` float32 in [0, 1], and the seed of each
    mask (``None``: one mask for every image)."""

    mask: np.ndarray
    seeds: tuple[int, ...] | None = None

    @classmethod
    def of(cls, value: Any, name: str = "region") -> "Region":
        """A `Region` from a mask (array, tensor, DataArray with an optional leading ``seed`` dim)."""
        if isinstance(value, Region):
            return value
        seeds = None
        if isinstance(value, xr.DataArray):
            if "seed" in value.dims:
                value = value.transpose("seed", ...)
                try:  # the same seeds every run takes: a coordinate of 1.7 names no seed
                    seeds = tuple(check_seeds(value["seed"].values.tolist(), f"the seed coordinate of {name}"))
                except ValueError as err:
                    raise ValueError(f"{err}; give one mask per seed, labelled with the run's integer seeds") from None
        value = as_array(value)
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{name} must be a mask (numpy array, torch tensor or xarray DataArray), "
                            f"got {type(value).__name__}")
        if value.dtype != bool and not np.issubdtype(value.dtype, np.number):
            raise ValueError(f"{name} must be bool or numbers in [0, 1], got dtype {value.dtype}")
        mask = value.astype(np.float32)
        want = 2 if seeds is None else 3
        if mask.ndim != want:
            shape = "(H, W) or (rows, cols)" if seeds is None else "(seed, H, W)"
            raise ValueError(f"{name} must be {shape}, got shape {tuple(value.shape)}; a mask per seed is an "
                             f"xarray.DataArray with dims ('seed', 'y', 'x')")
        if not np.isfinite(mask).all():
            raise ValueError(f"{name} must hold values in [0, 1] (a bool mask or a soft one); it holds NaN or inf")
        if mask.min() < 0 or mask.max() > 1:
            raise ValueError(f"{name} must hold values in [0, 1] (a bool mask or a soft one), "
                             f"got range [{mask.min():g}, {mask.max():g}]")
        mask = mask[None] if seeds is None else mask
        empty = [i for i in range(len(mask)) if not mask[i].any()]
        if empty:
            which = "it is" if seeds is None else f"the masks of seeds {[seeds[i] for i in empty]} are"
            raise ValueError(f"{name} is empty: {which} zero everywhere, so there is nowhere to act")
        mask.setflags(write=False)
        return cls(mask, seeds)

    # -- reading it at a resolution --------------------------------------------------------------
    def _select(self, seeds: Sequence[int], pairs: int | None) -> np.ndarray:
        if self.seeds is None:
            return np.repeat(self.mask, len(seeds) if pairs is None else pairs, axis=0)
        if not seeds:
            raise ValueError("this region holds one mask per seed, but the images being edited have no seeds "
                             "(inverted images); give one mask for every image")
        missing = [s for s in seeds if s not in self.seeds]
        if missing:
            raise ValueError(f"the region has masks for seeds {list(self.seeds)} but the run uses seeds {missing}; "
                             f"give a mask for every seed")
        return self.mask[[self.seeds.index(int(s)) for s in seeds]]

    def resampled(self, shape: tuple[int, int], seeds: Sequence[int], pairs: int | None = None) -> torch.Tensor:
        """The masks of `seeds` at `shape` by area averaging ``(pairs, h, w)``; a shared mask is repeated for
        `pairs` rows (default: one per seed), so rows without seeds (inverted images) can use it."""
        mask = torch.from_numpy(self._select(seeds, pairs).copy())[:, None]  # (pairs, 1, h, w)
        if tuple(mask.shape[-2:]) == tuple(shape):
            return mask[:, 0]
        return F.adaptive_avg_pool2d(mask, tuple(shape))[:, 0]

    def tokens(self, grid: tuple[int, int], seeds: Sequence[int], pairs: int | None = None) -> torch.Tensor:
        """Share of each image token inside the region ``(pairs, tokens)``, tokens in row-major order."""
        return self.resampled(grid, seeds, pairs).flatten(1)

    def latents(self, shape: tuple[int, int], seeds: Sequence[int], pairs: int | None = None) -> torch.Tensor:
        """The region at the latent grid ``(pairs, 1, h, w)``."""
        return self.resampled(shape, seeds, pairs)[:, None]

    def focus(self, grid: tuple[int, int], seeds: Sequence[int], blur: float, pairs: int | None = None) -> torch.Tensor:
        """Ω: the token mask blurred by a Gaussian of `blur` tokens and divided by its maximum ``(pairs, tokens)``."""
        mask = self.resampled(grid, seeds, pairs)[:, None]  # (pairs, 1, rows, cols)
        if blur > 0:
            radius = max(1, math.ceil(3 * blur))
            x = torch.arange(-radius, radius + 1, dtype=torch.float32)
            kernel = torch.exp(-0.5 * (x / blur) ** 2)
            kernel = kernel / kernel.sum()
            mask = F.conv2d(F.pad(mask, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
            mask = F.conv2d(F.pad(mask, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
        peak = mask.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(mask.dtype).tiny)
        return (mask / peak).flatten(1)

    def check(self, lens: Lens, name: str) -> None:
        """Refuse a mask that is neither image-sized nor token-grid-sized for `lens`."""
        image = (lens.pipeline_kwargs["height"], lens.pipeline_kwargs["width"])
        grid = tuple(lens.token_grid)
        if tuple(self.mask.shape[1:]) not in (image, grid):
            raise ValueError(f"{name} is {self.mask.shape[1]}×{self.mask.shape[2]}, but this model makes "
                             f"{image[0]}×{image[1]} images on a {grid[0]}×{grid[1]} token grid; give a mask of one "
                             f"of those sizes")

    # -- as a value ------------------------------------------------------------------------------
    @property
    def digest(self) -> str:
        blob = np.ascontiguousarray(self.mask).tobytes() + repr(self.seeds).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()

    def settings(self) -> dict:
        return {"shape": [int(n) for n in self.mask.shape], "seeds": None if self.seeds is None else list(self.seeds),
                "inside": round(float(self.mask.mean()), 4), "digest": self.digest}

    def to_dict(self) -> dict:
        return {**self.settings(), "mask": self.mask.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "Region":
        mask = np.asarray(data["mask"], np.float32)
        seeds = data.get("seeds")
        value: Any = mask[0] if seeds is None else xr.DataArray(mask, dims=("seed", "y", "x"), coords={"seed": seeds})
        region = cls.of(value)
        if "digest" in data and region.digest != data["digest"]:
            raise ValueError("the saved region does not match its digest; the file is corrupt")
        return region

    def __repr__(self) -> str:
        n, h, w = self.mask.shape
        per = "" if self.seeds is None else " (one per seed)"
        return f"Region({n} mask{'s' if n > 1 else ''} of {h}×{w}{per}, {100 * float(self.mask.mean()):.0f}% inside)"


def as_region(value: Any, name: str) -> Region | None:
    """`Region.of(value)`, or None for None."""
    return None if value is None else Region.of(value, name)


def window_steps(window: tuple[float, float], num_inference_steps: int) -> list[int]:
    """The steps i of a run of T steps with ``start <= i / T < end`` (a window given as fractions)."""
    start, end = window
    return [i for i in range(num_inference_steps) if start <= i / num_inference_steps < end]


def check_window(window: Any, name: str) -> tuple[float, float]:
    """`window` as ``(start, end)`` fractions with 0 <= start < end <= 1."""
    try:
        start, end = (float(x) for x in window)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (start, end), fractions of the run such as (0, 0.4), got {window!r}") from None
    if not (0.0 <= start < end <= 1.0):
        raise ValueError(f"{name} must satisfy 0 <= start < end <= 1 (fractions of the run), got {window!r}")
    return start, end


class MaskedValue:
    """Settings and round trips for values whose masks are `Region` fields (masks digested in settings,
    kept whole in ``to_dict``)."""

    def settings(self) -> dict:
        data: dict = {"type": type(self).__name__}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            data[f.name] = value.settings() if isinstance(value, Region) else list(value) \
                if isinstance(value, tuple) else value
        return data

    def to_dict(self) -> dict:
        data = self.settings()
        for f in fields(self):  # type: ignore[arg-type]
            if isinstance(getattr(self, f.name), Region):
                data[f.name] = getattr(self, f.name).to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Any:
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}  # type: ignore[arg-type]
        for name, value in values.items():
            if isinstance(value, dict) and "mask" in value:
                values[name] = Region.from_dict(value)
        return cls(**values)


@register
@dataclass(frozen=True, eq=False)
class Confine(LatentEdit):
    """Keep the original outside a region: after each step in `steps` (fractions of the run), the edited
    branch's latents outside the region are set to the original branch's,

        z_edited ← m · z_edited + (1 − m) · z_original,   m = the region at the latent grid,

    so an edit (a steer, a new prompt) can only change what lies inside. After the window the outside
    evolves freely again, which can smooth the seam. Records nothing.

    Attributes:
        region: Where the edit may act (any mask `Region.of` takes).
        steps: ``(start, end)`` fractions of the run during which the outside is reset.
    """

    record: ClassVar[str | None] = None
    region: Any = None
    steps: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.region is None:
            raise ValueError("Confine needs a region (a mask of where the edit may act)")
        object.__setattr__(self, "region", Region.of(self.region, "Confine.region"))
        object.__setattr__(self, "steps", check_window(self.steps, "Confine.steps"))

    def check(self, lens: Lens, num_inference_steps: int) -> None:
        self.region.check(lens, "Confine.region")

    def apply_latents(self, step: int, original: torch.Tensor, edited: torch.Tensor,
                      ctx: EditContext | None = None) -> tuple[torch.Tensor, None]:
        if ctx is None or step not in window_steps(self.steps, ctx.num_inference_steps):
            return edited, None
        m = self.region.latents(tuple(edited.shape[-2:]), ctx.seeds, len(edited)).to(edited)
        return torch.where(m >= 1, edited, m * edited + (1 - m) * original), None

    def settings(self) -> dict:
        return {"type": "Confine", "region": self.region.settings(), "steps": list(self.steps)}

    def to_dict(self) -> dict:
        return {**self.settings(), "region": self.region.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "Confine":
        return cls(Region.from_dict(data["region"]), steps=tuple(data.get("steps", (0.0, 1.0))))
