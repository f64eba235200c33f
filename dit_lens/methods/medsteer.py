"""The MedSteer method: the source prompt's image, and the same run steered along the concept vector.

Settings: where (layer ``window``, fractions of the depth), when (step window ``steps``, fractions of
the denoising steps), ``alpha``, the update variant (``renormalize``), latent ``blend`` and the
number of ``vector_seeds`` per prompt of the concept vector, which comes from the context's
`Vectors` (so captures are made once per pair and reused).

``where="window"`` (the default) steers every step of the step window at every block of the layer window.
``where="causal"`` steers only the cells (step, layer) of those windows where the concept is made: an exact
activation-patching grid (`dit_lens.patching`, cell by cell, at the vector's site) is run on the vector's own
prompts and seeds, never on the evaluation seeds. Direction ``"denoise"``: the target prompt's run gets the
source prompt's activation at one cell, and the judge (``MethodContext.oracle``) scores the image by its
log-probability of the source class; the effect 1 means that cell alone brings the concept back. The cells
with the largest mean effect over the patched runs, a fraction ``top`` of the grid, are steered. The patched
runs are the first ``causal_seeds`` seeds of the vector, seed i with the vector's i-th prompt pair (its
contexts, in turn). The cells and their effects are kept with the result (attr ``causal``; the `Steer`'s
settings in ``steers``).

``where="causal_layers"`` asks the same question a block at a time: a ``grid="layer"`` patching grid in the
``"noise"`` direction (the source prompt's run gets the target prompt's activation at one block, at every step
of the step window) ranks the blocks by how much of the judge's gap that loses (``1 − effect``: 1 means the
block is necessary), and the top fraction ``top`` of the blocks (at least one) is steered at every step of the
step window. A concept each step makes again from the last (so that no single cell matters) still shows up
there.

Examples:
    >>> from dit_lens.methods import get
    >>> [(a.name, a.flag, a.default) for a in get("medsteer").axes][:2]
    [('window', 'windows', ((0.0, 1.0),)), ('steps', 'step-windows', ((0.0, 1.0),))]
    >>> settings = {"window": (0.0, 1.0), "steps": (0.0, 1.0), "alpha": 3.0, "renormalize": False, "blend": 0.0,
    ...             "vector_seeds": 32, "where": "window", "top": 0.1, "causal_seeds": 4}
    >>> get("medsteer").cell_name(0, settings)
    'p0_w0-1_t0-1_a3_r0_n32'
    >>> get("medsteer").cell_name(0, {**settings, "where": "causal", "top": 0.2})
    'p0_w0-1_t0-1_a3_r0_n32_atcausal_top0.2'
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import xarray as xr

from ..interventions.generate import generate
from ..optimize.objectives import class_probability
from ..interventions.steer import Steer
from ..model.lens import Lens
from ..readouts.patching import patching
from ..trace.attrs import typed
from .axes import (BLEND, Axis, check_count, check_flag, check_real, check_window, layer_window, parse_flag,
                   parse_window, window_label, window_layers, window_steps)
from .pair import ConceptPair
from .registry import VECTOR_SEEDS, Method, MethodContext, register

__all__ = ["MEDSTEER", "WHERE", "causal_cells", "causal_grid", "causal_steer", "medsteer_steer", "top_cells",
           "top_layers"]

#: Which cells MedSteer steers: the layer and step windows, or the top cells of a patching grid in them.
WHERE = ("window", "causal", "causal_layers")
#: Patching grids kept for reuse within a process (a study's cells at several α share one), oldest dropped.
_GRIDS: dict[tuple, xr.Dataset] = {}
_KEPT_GRIDS = 4


def _steps(window: tuple, lens: Lens, num_inference_steps: int) -> list[int] | str:
    return window_steps(window, num_inference_steps) or "all"


def _check_where(value: Any) -> str:
    if value not in WHERE:
        raise ValueError(f"expected one of {list(WHERE)} (the windows, the top cells of a patching grid, or its "
                         f"top blocks), got {value!r}")
    return str(value)


def _check_top(value: Any) -> float:
    top = check_real(value)
    if not 0 < top <= 1:
        raise ValueError(f"expected a fraction of the grid's cells in (0, 1], e.g. 0.1, got {value!r}")
    return top


AXES = (
    layer_window("window", default=((0.0, 1.0),), key="w", flag="windows",
                 help="layer windows START:STOP (fractions of the depth)"),
    Axis("steps", default=((0.0, 1.0),), parse=parse_window, check=check_window, key="t", label=window_label,
         flag="step-windows", resolve=_steps,
         help="when to steer: step windows START:STOP (fractions of the steps; 0:1 = all)"),
    Axis("alpha", default=(2.5,), parse=float, check=check_real, key="a", flag="alphas", help="steering strengths"),
    Axis("renormalize", default=(False,), parse=parse_flag, check=check_flag, key="r",
         help="update variants (true = the authors' renormalised update)"),
    BLEND,
    Axis(VECTOR_SEEDS, default=(16,), parse=int, check=check_count, key="n", fixed=True,
         help="seeds per prompt for the concept vector"),
    Axis("where", default=("window",), parse=str, check=_check_where, key="at", omit=("window",), flag="where",
         help="which cells to steer: window (every step and block of the windows), causal (the top cells of a "
              "patching grid on the vector's prompts and seeds, within the windows) or causal_layers (the top "
              "blocks of a block-by-block patching grid, at every step of the step window)"),
    Axis("top", default=(0.1,), parse=float, check=_check_top, key="top", omit=(0.1,), flag="top",
         help="with --where causal: the fraction of the grid's cells steered, those of largest mean effect"),
    Axis("causal_seeds", default=(4,), parse=int, check=check_count, key="cs", omit=(4,), flag="causal-seeds",
         help="with --where causal: patched runs per cell, the vector's first seeds (at most vector_seeds)"),
)


class _LogProbability:
    """`patching`'s metric from `class_probability`: images ``(n, H, W, 3)`` numpy → the judge's
    log-probability of `label` ``(n,)``."""

    def __init__(self, oracle: Any, label: str) -> None:
        self.objective = class_probability(oracle, label)
        self.name = self.objective.name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)  # (n, 3, H, W)
        with torch.no_grad():
            return self.objective(x).double().numpy()


def causal_grid(lens: Lens, pair: ConceptPair, *, oracle: Any, seeds: int, site: str = "attn2",
                layers: Sequence[int] | None = None, steps: Sequence[int] | None = None,
                num_inference_steps: int = 20, guidance_scale: float = 4.5, batch_size: int | None = None,
                progress: bool = False, grid: str = "cell", direction: str = "denoise") -> xr.Dataset:
    """The patching grid ``where="causal"`` picks its cells from (the module's docs), kept for reuse.

    Args:
        lens: A `dit_lens.Lens`.
        pair: The concept pair; its positive and negative prompts are the vector's.
        oracle: The judge (``.net`` and ``.labels``, as `dit_lens.load_oracle`); `pair.source` is one of its labels.
        seeds: How many patched runs per cell: the vector's seeds ``0 … seeds − 1``, seed i with prompt pair
            ``i mod len(pair.contexts)``.
        site: The site patched (the vector's).
        layers: Blocks of the grid (default: every block with `site`).
        steps: Steps of the grid (default: all).
        num_inference_steps: Denoising steps T.
        guidance_scale: Classifier-free guidance scale.
        batch_size: Patched runs per pipeline call (`patching`).
        progress: Show progress bars.
        grid: ``"cell"`` (``where="causal"``) or ``"layer"`` (``where="causal_layers"``).
        direction: ``"denoise"`` or ``"noise"`` (`patching`).

    Returns:
        `patching`'s Dataset over every patched seed, ``effect (seed, step, layer)`` (``(seed, layer)`` for a
        layer grid), with coordinates
        ``clean (seed)`` and ``corrupt (seed)``, the prompts each seed ran.
    """
    seeds = check_count(seeds)
    label = pair.source
    key = (lens.fingerprint, pair, seeds, site, None if layers is None else tuple(layers),
           None if steps is None else tuple(steps), num_inference_steps, float(guidance_scale), batch_size,
           getattr(oracle, "fingerprint", None) or id(oracle), grid, direction)
    if key in _GRIDS:
        return _GRIDS[key]
    metric = _LogProbability(oracle, label)
    positive, negative = pair.positive(), pair.negative()
    parts = []
    for c in range(min(seeds, len(positive))):
        part = patching(lens, clean=positive[c], corrupt=negative[c], seeds=list(range(c, seeds, len(positive))),
                        metric=metric, site=site, layers=layers, steps=steps, direction=direction, grid=grid,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        batch_size=batch_size, progress=progress)
        parts.append(part.assign_coords(clean=("seed", [positive[c]] * part.sizes["seed"]),
                                        corrupt=("seed", [negative[c]] * part.sizes["seed"])))
    grid = xr.concat(parts, "seed", combine_attrs="drop_conflicts").sortby("seed")
    grid.attrs.update(clean=typed(positive), corrupt=typed(negative), label=label, seeds=typed(list(range(seeds))))
    while len(_GRIDS) >= _KEPT_GRIDS:
        _GRIDS.pop(next(iter(_GRIDS)))
    _GRIDS[key] = grid
    return grid


def top_cells(effect: xr.DataArray, top: float) -> list[tuple[int, int]]:
    """The fraction `top` (at least one) of the cells ``(step, layer)`` with the largest mean `effect` over its
    ``seed`` dim, largest first (ties: earlier step, then lower layer). Seeds where the effect is undefined
    (NaN) are left out of a cell's mean."""
    top = _check_top(top)
    mean = effect.mean("seed").transpose("step", "layer") if "seed" in effect.dims else effect.transpose("step", "layer")
    values = mean.values
    if np.isnan(values).all():
        raise ValueError("the patching effect is undefined at every cell (the judge scores the source and target "
                         "prompts' images alike); choose a judge or prompts that tell them apart")
    count = max(1, int(round(top * values.size)))
    steps, layers = (np.asarray(mean[d].values) for d in ("step", "layer"))
    cells = [(int(steps[i]), int(layers[j])) for i in range(len(steps)) for j in range(len(layers))]
    flat = values.reshape(-1)
    order = sorted(range(len(cells)), key=lambda k: (np.isnan(flat[k]), -np.nan_to_num(flat[k]), cells[k]))
    return [cells[k] for k in order[:count]]


def top_layers(effect: xr.DataArray, top: float) -> list[int]:
    """The fraction `top` (at least one) of the blocks of a ``"noise"`` layer grid ``effect (seed, layer)`` whose
    patch loses the most of the gap (smallest mean effect), most necessary first (ties: the lower block)."""
    top = _check_top(top)
    mean = effect.mean("seed") if "seed" in effect.dims else effect
    values = mean.values
    if np.isnan(values).all():
        raise ValueError("the patching effect is undefined at every block (the judge scores the source and target "
                         "prompts' images alike); choose a judge or prompts that tell them apart")
    count = max(1, int(round(top * values.size)))
    layers = [int(l) for l in mean["layer"].values]
    order = sorted(range(len(layers)), key=lambda k: (np.isnan(values[k]), np.nan_to_num(values[k]), layers[k]))
    return [layers[k] for k in order[:count]]


def medsteer_steer(lens: Lens, pair: ConceptPair, settings: dict, context: MethodContext) -> Steer:
    """The `Steer` of one setting: the pair's vector from its first ``vector_seeds`` seeds, at the windows or,
    with ``where="causal"``, at the top cells of the patching grid in them (`causal_cells`)."""
    if context.vectors is None:
        raise ValueError("medsteer needs concept vectors: pass MethodContext(vectors=Vectors(lens, seeds=...))")
    vector = context.vectors(pair, settings[VECTOR_SEEDS])
    layers = window_layers(settings["window"], lens.num_layers)
    steps = window_steps(settings["steps"], context.num_inference_steps)
    common = dict(alpha=settings["alpha"], renormalize=settings["renormalize"], name=pair.name)
    if settings.get("where", "window") == "window":
        return Steer(vector, layers=layers, steps=steps, **common)
    if settings["where"] == "causal_layers":
        return Steer(vector, layers=causal_cells(lens, pair, settings, context, vector)[1], steps=steps, **common)
    return Steer(vector, cells=causal_cells(lens, pair, settings, context, vector)[1], **common)


def causal_cells(lens: Lens, pair: ConceptPair, settings: dict, context: MethodContext,
                 vector: xr.DataArray) -> tuple[xr.Dataset, list[tuple[int, int]]]:
    """The patching grid of ``where="causal"`` in the setting's windows (`causal_grid`) and its top cells; for
    ``where="causal_layers"``, the block-by-block grid and its top blocks."""
    if context.oracle is None:
        raise ValueError("medsteer with where='causal' picks its cells by the judge's log-probability: pass "
                         "MethodContext(oracle=...) (a study passes its oracle)")
    if settings["causal_seeds"] > settings[VECTOR_SEEDS]:
        raise ValueError(f"medsteer with where='causal' patches on the vector's own seeds: causal_seeds "
                         f"{settings['causal_seeds']} must be at most vector_seeds {settings[VECTOR_SEEDS]}")
    by_blocks = {"grid": "layer", "direction": "noise"} if settings["where"] == "causal_layers" else {}
    have = {int(x) for x in vector["layer"].values}
    layers = [l for l in window_layers(settings["window"], lens.num_layers) if l in have]
    grid = causal_grid(lens, pair, oracle=context.oracle, seeds=settings["causal_seeds"],
                       site=str(vector.attrs.get("site", "attn2")), layers=layers,
                       steps=window_steps(settings["steps"], context.num_inference_steps),
                       num_inference_steps=context.num_inference_steps, guidance_scale=context.guidance_scale,
                       progress=context.progress, **by_blocks)
    if by_blocks:
        return grid, top_layers(grid["effect"], settings["top"])
    return grid, top_cells(grid["effect"], settings["top"])


def causal_steer(lens: Lens, pair: ConceptPair, settings: dict, context: MethodContext,
                 vector: xr.DataArray) -> dict:
    """Where ``where="causal"`` steers, as kept with the result: ``{"cells", "effect" (their mean effects),
    "top", "grid_cells", "direction", "metric", "seeds", "clean", "corrupt"}`` (the grid's runs)."""
    grid, cells = causal_cells(lens, pair, settings, context, vector)
    mean = grid["effect"].mean("seed")
    if settings["where"] == "causal_layers":
        return {"layers": list(cells), "effect": [float(mean.sel(layer=l)) for l in cells], "top": settings["top"],
                "grid_layers": int(mean.size), "direction": grid.attrs["direction"], "metric": grid.attrs["metric"],
                "seeds": grid["seed"].values.tolist(), "clean": grid["clean"].values.tolist(),
                "corrupt": grid["corrupt"].values.tolist()}
    return {"cells": [list(c) for c in cells], "effect": [float(mean.sel(step=t, layer=l)) for t, l in cells],
            "top": settings["top"], "grid_cells": int(mean.size), "direction": grid.attrs["direction"],
            "metric": grid.attrs["metric"], "seeds": grid["seed"].values.tolist(),
            "clean": grid["clean"].values.tolist(), "corrupt": grid["corrupt"].values.tolist()}


def _run(lens: Lens, pair: ConceptPair, seeds: Sequence[int], settings: dict, *, context: MethodContext) -> xr.Dataset:
    steer = medsteer_steer(lens, pair, settings, context)
    out = generate(lens, pair.source_prompt, seeds=seeds, steer=steer,
                   num_inference_steps=context.num_inference_steps, guidance_scale=context.guidance_scale,
                   record_gates=context.record_gates, blend=settings["blend"], batch_size=context.batch_size,
                   progress=context.progress)
    if settings["where"] != "window":  # the grid is kept: this reads it back
        out.attrs["causal"] = typed(causal_steer(lens, pair, settings, context, steer.vector))
    return out


def _extras(lens: Lens, pair: ConceptPair, settings: dict, *, context: MethodContext) -> dict:
    """The vector's mean cosine (over steps and layers) to the vector from every captured seed."""
    vector = context.vectors(pair, settings[VECTOR_SEEDS])
    return {"vector_cosine_to_largest": float((vector * context.vectors(pair)).sum("channel").mean())}


#: Cells keep the names they had before methods existed (no prefix).
MEDSTEER = register(Method("medsteer", AXES, _run, extras=_extras, cell_prefix="",
                           description="steer the source prompt's run along the concept vector (MedSteer)"))
