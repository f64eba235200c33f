"""`Steer`: a concept-removal intervention (a site edit), as a printable value.

For every image token h of the output of the site the vector was captured at (``attn2``, the
cross-attention output, for MedSteer) at a steered layer l and step t (both halves of the guidance
batch by default):

    g  = max(0, h · v(l, t))            the per-token gate (dot product, not cosine)
    h' = h − α · g · v(l, t)            the paper's update
    h' ← ‖h‖ · h' / ‖h'‖                with ``renormalize=True`` (the authors' public code)

With a `region`, the update of each token is scaled by its share m in the region (h' = h − α·m·g·v):
tokens outside are left bit-for-bit unchanged, and the recorded gate is m·g, what was applied.

Where and when: windows (``layers`` × ``steps``, every pair of them), or explicit ``cells``, pairs
(step, layer) steered and no others (e.g. the cells an activation-patching grid picks).

Examples:
    >>> import numpy as np, xarray as xr
    >>> v = xr.DataArray(np.eye(4, dtype=np.float32)[None, None, 0].repeat(3, 1),
    ...                  dims=("step", "layer", "channel"))
    >>> Steer(v, alpha=2.5, layers=[1, 2])
    Steer(alpha=2.5, site=attn2, layers=[1, 2], steps=all, renormalize=False, vector=1 steps × 3 layers × 4 channels)
    >>> Steer(v, cells=[(0, 2), (0, 1)]).cells
    ((0, 1), (0, 2))
    >>> h = torch.tensor([[[2.0, 1.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0]]])  # (batch, tokens, C)
    >>> new, gate = steer_tokens(h, torch.tensor([1.0, 0.0, 0.0, 0.0]), alpha=1.0)
    >>> gate.tolist(), new[0, 0].tolist()
    ([[2.0, 0.0]], [0.0, 1.0, 0.0, 0.0])
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import xarray as xr

from ..model.lens import Lens
from ..trace.attrs import read, typed
from ..validate import check_real, check_vector, is_int
from ..model.where import At
from .base import HALVES, EditContext, SiteEdit, register
from .region import Region

__all__ = ["Steer", "steer_tokens"]


def steer_tokens(
    h: torch.Tensor, v: torch.Tensor, alpha: float, renormalize: bool = False, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the gated update to tokens ``h (..., tokens, C)`` along unit ``v (C,)``.

    `weight` ``(..., tokens)`` in [0, 1] scales each token's update (a region); None: 1 everywhere.

    Returns:
        The edited tokens (same shape) and the gate ``g (..., tokens)`` (times `weight`). Tokens with
        g = 0 are returned bit-for-bit unchanged; ``alpha = 0`` returns ``h`` bit-for-bit.
    """
    v = v.to(device=h.device, dtype=h.dtype)
    gate = torch.relu(h @ v)  # (..., tokens)
    if weight is not None:
        gate = gate * weight.to(gate)
    new = h - alpha * gate.unsqueeze(-1) * v  # (..., tokens, C)
    if renormalize:
        norm_h = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        norm_new = torch.linalg.vector_norm(new, dim=-1, keepdim=True)
        new = torch.where(norm_new > 0, new * (norm_h / norm_new), new)
    return new, gate


@register
@dataclass(frozen=True, eq=False)
class Steer(SiteEdit):
    """Remove a concept along a vector at chosen layers and steps of the site it was captured at.

    Attributes:
        vector: Unit concept vector, dims ``(step, layer, channel)`` (see `concept_vector`); a vector
            whose norm over channels is not 1 is refused (`dit_lens.readouts.vectors.normalize_vector`).
        alpha: Steering strength α (0 leaves the model untouched).
        layers: Blocks to steer (``None``: every layer the vector covers).
        steps: Denoising steps to steer (``None``: all).
        cells: Instead of `layers` and `steps`, the (step, layer) pairs to steer and no others (sorted;
            ``None``: the windows). Giving both is an error.
        renormalize: Rescale each edited token back to its original L2 norm (authors' code).
        reuse_last_step: Allow runs with more steps than the vector, reusing its last step
            (authors' code); otherwise that is an error. Vectors are indexed by step position, so
            the fix for a mismatch is a vector computed with the run's step count, not this.
        name: A label for figures and results (e.g. ``"polyps−normal cecum"``).
        site: The site to edit; ``None`` takes the site the vector was captured at (its ``site``
            attr; ``"attn2"`` for vectors that do not say). Naming another site is an error: a
            direction in one site's space means nothing in another's.
        halves: Guidance halves to steer: ``"both"`` (the paper), ``"cond"`` or ``"uncond"``.
        region: Steer only inside this region (any mask `dit_lens.interventions.region.Region.of`
            takes: image or token-grid size, one mask or one per seed); ``None``: everywhere.
    """

    record: ClassVar[str | None] = "gate"

    vector: xr.DataArray = field(repr=False)
    alpha: float = 2.5
    layers: tuple[int, ...] | None = None
    steps: tuple[int, ...] | None = None
    renormalize: bool = False
    reuse_last_step: bool = False
    name: str = ""
    site: str | None = None
    halves: str = "both"
    region: Any = None
    cells: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        check_vector(self.vector)
        if self.region is not None:
            object.__setattr__(self, "region", Region.of(self.region, "Steer.region"))
        object.__setattr__(self, "alpha", check_real(self.alpha, "Steer.alpha"))
        captured = str(self.vector.attrs.get("site", "attn2"))
        if self.site is None:
            object.__setattr__(self, "site", captured)
        elif self.site != captured:
            raise ValueError(
                f"the vector was captured at site {captured!r} but Steer.site is {self.site!r}; steer the site the "
                f"vector was computed at (leave site=None), or compute a vector at {self.site!r} with "
                f"concept_vector(..., site={self.site!r})"
            )
        if self.site.endswith(".weights"):
            raise ValueError(f"Steer edits a site's output, not attention weights; got site {self.site!r}")
        if self.halves not in HALVES:
            raise ValueError(f"Steer.halves must be one of {list(HALVES)}, got {self.halves!r}")
        have_layers = [int(x) for x in self.vector["layer"].values]
        for attr, allowed in (("layers", have_layers), ("steps", None)):
            value = getattr(self, attr)
            if value is None:
                continue
            if isinstance(value, (int, np.integer)):
                value = (value,)
            value = tuple(sorted({int(x) for x in value}))
            if not value:
                raise ValueError(f"Steer.{attr} is empty; pass None to steer all {attr}")
            if min(value) < 0:
                raise ValueError(f"Steer.{attr} must be >= 0, got {list(value)}")
            if allowed is not None and not set(value) <= set(allowed):
                raise ValueError(
                    f"Steer.layers {sorted(set(value) - set(allowed))} are not in the vector "
                    f"(it covers layers {allowed})"
                )
            object.__setattr__(self, attr, value)
        if self.cells is not None:
            object.__setattr__(self, "cells", _check_cells(self.cells, self.layers, self.steps, have_layers))

    # -- what runs -------------------------------------------------------------------------

    @property
    def vector_steps(self) -> int:
        return int(self.vector.sizes["step"])

    def steered_layers(self) -> list[int]:
        if self.cells is not None:
            return sorted({layer for _, layer in self.cells})
        return list(self.layers) if self.layers is not None else [int(x) for x in self.vector["layer"].values]

    def steered_steps(self, num_inference_steps: int) -> list[int]:
        if self.cells is not None:
            steps = sorted({step for step, _ in self.cells})
        else:
            steps = range(num_inference_steps) if self.steps is None else self.steps
        return [t for t in steps if t < num_inference_steps]

    @property
    def at(self) -> At:
        """Where it steers: the steered layers (of `cells`, else `layers`, else the vector's) and steps (of
        `cells`, else `steps`)."""
        steps = sorted({step for step, _ in self.cells}) if self.cells is not None else self.steps
        return At(self.site, self.steered_layers(), steps, self.halves)

    @property
    def is_identity(self) -> bool:
        return self.alpha == 0.0

    def apply(self, h: torch.Tensor, ctx: EditContext | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The gated update on the rows ``h (rows, tokens, C)``; returns them and the gate ``(rows, tokens)``
        (``(None, None)`` at a step and layer of the hook that is not one of `cells`)."""
        if self.cells is not None and (ctx.step, ctx.layer) not in self.cells:
            return None, None
        weight = None
        if self.region is not None:
            if ctx is None or ctx.lens is None:
                raise ValueError("a Steer with a region runs only inside generate (which knows the token grid)")
            m = self.region.tokens(tuple(ctx.lens.token_grid), ctx.seeds, ctx.pairs)  # (pairs, tokens)
            weight = m.repeat(len(ctx.halves), 1).to(h.device)
        return steer_tokens(h, self.vector_at(ctx.step, ctx.layer), self.alpha, self.renormalize, weight)

    def check(self, lens: Lens, num_inference_steps: int) -> None:
        """Raise a clear error if this steer cannot run on `lens` with T steps."""
        late = [list(c) for c in self.cells or () if c[0] >= num_inference_steps]
        if late:
            raise ValueError(f"Steer.cells {late} go beyond the run's {num_inference_steps} steps (steps 0.."
                             f"{num_inference_steps - 1}); pick cells of a grid made with this step count")
        self.check_at(lens, num_inference_steps)  # site, blocks and steps
        channels = int(self.vector.sizes["channel"])
        if channels != lens.width:
            raise ValueError(
                f"the vector has {channels} channels but the model's {self.site} output is "
                f"{lens.width} wide; compute the vector on this model"
            )
        if num_inference_steps > self.vector_steps and not self.reuse_last_step:
            raise ValueError(
                f"the run has {num_inference_steps} steps but the vector only {self.vector_steps}: a vector is "
                f"indexed by step position, so its steps line up with the run's only when the counts match; "
                f"compute the vector with num_inference_steps={num_inference_steps} (for an inverted image, the "
                f"inversion's step count). reuse_last_step=True repeats its last step for the rest (the authors' "
                f"behaviour): it runs, but steers late steps with an early-step direction"
            )
        if self.region is not None:
            self.region.check(lens, "Steer.region")

    def vector_at(self, step: int, layer: int) -> torch.Tensor:
        """v(layer, step) as a tensor ``(C,)``; past the vector's last step, its last step."""
        index = min(step, self.vector_steps - 1)
        return torch.from_numpy(
            np.ascontiguousarray(self.vector.isel(step=index).sel(layer=layer).values)
        )

    # -- as a value ------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        """Equal when every setting, the vector's values and its step and layer labels are equal (a
        loaded copy equals what was saved)."""
        if not isinstance(other, Steer):
            return NotImplemented
        return self.settings() == other.settings() and all(
            np.array_equal(self.vector[d].values, other.vector[d].values) for d in ("step", "layer"))

    def __hash__(self) -> int:
        return hash(self.vector_digest)

    @property
    def vector_digest(self) -> str:
        return _digest(self.vector.values)

    def settings(self) -> dict:
        """Everything that defines the run except the vector's values (which are digested)."""
        return {
            "type": "Steer",
            "name": self.name,
            "site": self.site,
            "halves": self.halves,
            "alpha": self.alpha,
            "layers": None if self.layers is None else list(self.layers),
            "steps": None if self.steps is None else list(self.steps),
            **({} if self.cells is None else {"cells": [list(c) for c in self.cells]}),
            "renormalize": self.renormalize,
            "reuse_last_step": self.reuse_last_step,
            "update": "authors (renormalized)" if self.renormalize else "paper",
            "vector_shape": [int(n) for n in self.vector.shape],
            "vector_digest": self.vector_digest,
            **({} if not self.vector_source else {"vector_source": self.vector_source}),
            **({} if self.region is None else {"region": self.region.settings()}),
        }

    @property
    def vector_source(self) -> dict:
        """Where the vector came from, as `dit_lens.concept_vector` recorded it: the positive and negative
        prompts and seeds (empty for a vector made elsewhere)."""
        found = {}
        for key in ("positive_prompts", "positive_seeds", "negative_prompts", "negative_seeds"):
            value = self.vector.attrs.get(key)
            if value is not None:
                found[key] = list(read(self.vector.attrs, key))
        return found

    def to_dict(self) -> dict:
        """Settings plus the vector itself (``xarray.DataArray.to_dict``); JSON-serialisable. `save` adds a
        digest over all of it, so a saved file whose α, layers, steps, update or vector was edited is refused."""
        data = self.settings()
        vector = self.vector.astype(np.float64).to_dict(data="list")
        vector["attrs"] = typed(vector["attrs"])
        data["vector"] = vector
        if self.region is not None:
            data["region"] = self.region.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Steer":
        vector = xr.DataArray.from_dict(data["vector"]).astype(np.float32)
        if "vector_digest" in data and _digest(vector.values) != data["vector_digest"]:
            raise ValueError("the saved steer's vector does not match its digest; the file is corrupt")
        return cls(
            vector,
            alpha=data["alpha"],
            layers=data.get("layers"),
            steps=data.get("steps"),
            renormalize=data.get("renormalize", False),
            reuse_last_step=data.get("reuse_last_step", False),
            name=data.get("name", ""),
            site=data.get("site"),
            halves=data.get("halves", "both"),
            region=None if data.get("region") is None else Region.from_dict(data["region"]),
            cells=None if data.get("cells") is None else [tuple(c) for c in data["cells"]],
        )

    def __repr__(self) -> str:
        layers = "all" if self.layers is None else _ranges(self.layers)
        steps = "all" if self.steps is None else _ranges(self.steps)
        where = (f"layers={layers}, steps={steps}" if self.cells is None
                 else "cells=[" + ", ".join(f"({t}, {l})" for t, l in self.cells) + "]")
        shape = self.vector.shape
        label = f"{self.name!r}, " if self.name else ""
        halves = "" if self.halves == "both" else f", halves={self.halves}"
        halves += "" if self.region is None else f", region={self.region!r}"
        return (
            f"Steer({label}alpha={self.alpha:g}, site={self.site}{halves}, {where}, "
            f"renormalize={self.renormalize}, "
            f"vector={shape[0]} steps × {shape[1]} layers × {shape[2]} channels)"
        )


def _check_cells(cells: Any, layers: Any, steps: Any, have_layers: list[int]) -> tuple[tuple[int, int], ...]:
    """`Steer.cells` as sorted, distinct (step, layer) pairs of the vector's layers; refused beside windows."""
    if layers is not None or steps is not None:
        raise ValueError("Steer takes either cells or the layers and steps windows, not both; pass cells=[(step, "
                         "layer), ...] alone, or layers= and steps= alone")
    if isinstance(cells, (str, bytes)) or not isinstance(cells, Iterable):
        raise ValueError(f"Steer.cells is a list of (step, layer) pairs, got {cells!r}")
    pairs = []
    for cell in cells:
        items = tuple(cell) if isinstance(cell, Iterable) and not isinstance(cell, (str, bytes)) else ()
        if len(items) != 2 or not all(is_int(x) for x in items):
            raise ValueError(f"Steer.cells holds (step, layer) pairs of integers, got {cell!r}")
        step, layer = (int(x) for x in items)
        if step < 0:
            raise ValueError(f"Steer.cells steps must be >= 0, got the cell {(step, layer)}")
        pairs.append((step, layer))
    if not pairs:
        raise ValueError("Steer.cells is empty; pass at least one (step, layer) pair, or None to steer the windows")
    missing = sorted({layer for _, layer in pairs} - set(have_layers))
    if missing:
        raise ValueError(f"Steer.cells name layers {missing} that are not in the vector (it covers layers "
                         f"{have_layers})")
    return tuple(sorted(set(pairs)))


def _digest(values: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=8).hexdigest()


def _ranges(values: Sequence[int]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"
