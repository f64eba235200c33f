"""What one `dit_lens.patching` call patches: the site's blocks, the heads, and the cells of every patch; and how
a metric's values are read (`score_metric`, `metric_name`), shared by exact and attribution patching.

A patch is a set of cells ``(step, layer)`` (and, with heads, one attention head): `patch_grid` turns a named
grid (``"cell"``, ``"layer"``, ``"step"``) or a list of ``(layer window, step window)`` pairs into the result's
dims and coordinates and each patch's cells; `site_layers` and `head_indices` check the site and the heads
against the model's family.

Examples:
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> dims, coords, patches, _ = patch_grid(lens, "layer", "attn2", [0, 1], None, None, 2)
    >>> dims, [sorted(p) for p in patches]
    (('layer',), [[(0, 0), (1, 0)], [(0, 1), (1, 1)]])
    >>> head_indices(lens, "attn2", True, [0, 1]), head_indices(lens, "attn2", [1], [0, 1])
    (([0, 1], 2), ([1], 2))
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import xarray as xr

from ..trace.attrs import typed
from ..trace.runner import scheduler_timesteps
from ..validate import NonFiniteError, as_array, check_window, is_int, window_layers

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["DIRECTIONS", "GRIDS", "OUTPUT_SITES", "Cells", "check_patching", "effect_dataset", "head_indices",
           "metric_name", "patch_grid", "score_metric", "site_layers"]

#: Which run gets the other's activation: the corrupt one (``"denoise"``) or the clean one (``"noise"``).
DIRECTIONS = ("denoise", "noise")

#: The named grids; a list of (layer window, step window) pairs is the other kind.
GRIDS = ("cell", "layer", "step")
#: The sites whose output a patch copies.
OUTPUT_SITES = ("attn1", "attn2", "ff", "block")

Cells = frozenset  # of (step, layer)


def site_layers(lens: Lens, site: str, heads: bool = False) -> list[int]:
    """The blocks that have output site `site` (with `heads`: its per-head output ``"<site>.heads"``), refusing
    weights sites, unknown names and a site without per-head softmax attention."""
    family = lens.family
    if site not in OUTPUT_SITES:
        family.rank(site)  # unknown site: names the family's sites
        raise ValueError(f"patching copies a site's output: choose one of {list(OUTPUT_SITES)}, got {site!r}")
    family.rank(site)  # a site this family does not have
    if not heads:
        return lens.layers_with(site)
    if f"{site}.heads" not in family.every_site:
        with_heads = [s for s in OUTPUT_SITES if f"{s}.heads" in family.every_site]
        raise ValueError(f"heads patches one head of a softmax attention's output, and {family.label or family.name}'s "
                         f"site {site!r} has none; its sites with heads are {with_heads}: pass one of them as site, "
                         f"or heads=False")
    return lens.layers_with(f"{site}.heads")


def head_indices(lens: Lens, site: str, heads: Any, layers: list[int]) -> tuple[list[int | None], int]:
    """The heads to patch one at a time (``[None]``: the whole site), every head for ``True`` or the listed ones,
    checked against the head count of `site` at `layers`; and that count (0 for the whole site)."""
    if heads is False:
        return [None], 0
    counts = sorted({int(lens.site_module(site, layer).heads) for layer in layers})
    if len(counts) != 1:
        raise ValueError(f"the blocks {layers} of {site!r} differ in head count ({counts}); patch heads of blocks "
                         f"with one head count at a time (layers=...)")
    count = counts[0]
    if heads is True:
        return list(range(count)), count
    if isinstance(heads, (str, bytes)) or is_int(heads):
        raise ValueError(f"heads must be True, False or a list of head indices in 0..{count - 1}, got {heads!r}; "
                         f"e.g. heads=[0]")
    try:
        chosen = list(heads)
    except TypeError:
        raise ValueError(f"heads must be True, False or a list of head indices in 0..{count - 1}, got "
                         f"{heads!r}") from None
    bad = [h for h in chosen if not is_int(h) or not 0 <= int(h) < count]
    if not chosen or bad:
        raise ValueError(f"heads {bad or chosen} are not head indices of {site!r}, which has {count} heads "
                         f"(0..{count - 1})")
    if len(set(int(h) for h in chosen)) != len(chosen):
        raise ValueError(f"heads has duplicates: {chosen}; list each head once")
    return [int(h) for h in chosen], count


def _indices(value: Any, n: int, what: str, allowed: list[int]) -> list[int]:
    """A window of `what` (``"blocks"`` over `allowed`, or ``"steps"``): None, fractions or indices."""
    if value is None:
        return list(allowed)
    if isinstance(value, tuple):
        start, stop = check_window(value, f"a {what[:-1]} window")
        picked = window_layers((start, stop), n)
    else:
        try:
            picked = list(value)
        except TypeError:
            raise ValueError(f"a {what[:-1]} window is None, a tuple (start, stop) of fractions or a list of "
                             f"{what[:-1]} indices, got {value!r}") from None
        if not picked or not all(is_int(i) for i in picked):
            raise ValueError(f"a list of {what} must hold integer indices, got {value!r}; write fractions as a tuple "
                             f"(start, stop)")
    chosen = [int(i) for i in picked if int(i) in allowed]
    missing = [int(i) for i in picked if int(i) not in allowed]
    if isinstance(value, tuple) and chosen:
        return chosen
    if missing or not chosen:
        raise ValueError(f"{what} {missing or list(picked)} are not among the {len(allowed)} {what} this patch can "
                         f"reach ({_span(allowed)})")
    return sorted(set(chosen))


def _span(values: list[int]) -> str:
    return f"{values[0]}..{values[-1]}" if values == list(range(values[0], values[-1] + 1)) else str(values)


def patch_grid(lens: Lens, grid: Any, site: str, reachable: list[int], layers: Any, steps: Any,
               T: int) -> tuple[tuple[str, ...], dict, list[Cells], list[dict]]:
    """The grid's dims, coords, each patch's cells and each window's labels, over the blocks `reachable` that
    have `site` and T steps."""
    all_steps = list(range(T))
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise ValueError(f"grid must be 'cell', 'layer', 'step' or a list of (layer window, step window) pairs, "
                             f"got {grid!r}")
        if isinstance(layers, (int, np.integer)) or isinstance(steps, (int, np.integer)):
            raise ValueError("layers and steps are lists of indices; pass e.g. layers=[3] or steps=[0]")
        for layer in [] if layers is None else list(layers):
            if not is_int(layer) or not 0 <= layer < lens.num_layers:
                raise ValueError(f"layers must be block indices in 0..{lens.num_layers - 1}, got {layer!r}")
            lens.family.check_site(site, int(layer), lens.split)  # a block of Flux's other list
        chosen_layers = reachable if layers is None else _indices(list(layers), lens.num_layers, "blocks", reachable)
        chosen_steps = all_steps if steps is None else _indices(list(steps), T, "steps", all_steps)
        if grid == "cell":
            patches = [Cells({(t, l)}) for t in chosen_steps for l in chosen_layers]
            return ("step", "layer"), {"step": chosen_steps, "layer": chosen_layers}, patches, []
        if grid == "layer":
            patches = [Cells((t, l) for t in chosen_steps) for l in chosen_layers]
            return ("layer",), {"layer": chosen_layers}, patches, []
        patches = [Cells((t, l) for l in chosen_layers) for t in chosen_steps]
        return ("step",), {"step": chosen_steps}, patches, []
    if layers is not None or steps is not None:
        raise ValueError("layers= and steps= choose the rows of a 'cell', 'layer' or 'step' grid; a list of windows "
                         "names its own blocks and steps (leave layers and steps out)")
    try:
        windows = list(grid)
    except TypeError:
        raise ValueError(f"grid must be 'cell', 'layer', 'step' or a list of (layer window, step window) pairs, "
                         f"got {grid!r}") from None
    if not windows:
        raise ValueError("grid is an empty list: there is nothing to patch; pass e.g. grid=[(None, None)] (the "
                         "whole run) or grid='cell'")
    patches, labels = [], []
    for window in windows:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(f"each window of grid is a pair (layer window, step window), got {window!r}; e.g. "
                             f"(None, None) or ((0, 0.25), None)")
        block_window, step_window = window
        chosen_layers = _indices(block_window, lens.num_layers, "blocks", reachable)
        chosen_steps = _indices(step_window, T, "steps", all_steps)
        patches.append(Cells((t, l) for t in chosen_steps for l in chosen_layers))
        labels.append({"layer_window": _label(block_window), "step_window": _label(step_window),
                       "layers": chosen_layers, "steps": chosen_steps})
    coords = {"window": list(range(len(windows))),
              "layer_window": ("window", [w["layer_window"] for w in labels]),
              "step_window": ("window", [w["step_window"] for w in labels])}
    return ("window",), coords, patches, labels


def _label(window: Any) -> str:
    if window is None:
        return "all"
    if isinstance(window, tuple):
        return f"{float(window[0]):g}-{float(window[1]):g}"  # as the layer windows of studies label them
    return ",".join(str(int(i)) for i in window)


def score_metric(metric: Callable, images: np.ndarray) -> np.ndarray:
    """The metric's values ``(n,)`` for images ``(n, H, W, 3)`` or latents, refused unless one finite number per run."""
    name, n = metric_name(metric), len(images)
    try:
        values = np.asarray(as_array(metric(images)), dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"the metric {name} must return one number per image, shape ({n},); its output does not "
                         f"read as numbers ({err})") from None
    if values.shape != (n,):
        raise ValueError(f"the metric {name} returned shape {values.shape} for {n} images; it must return one number "
                         f"per image, shape ({n},)")
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise NonFiniteError(f"the metric {name} returned NaN or inf for {bad} of {n} images; it must return a finite "
                             f"number per image")
    return values


def metric_name(metric: Any) -> str:
    name = getattr(metric, "name", None) or getattr(metric, "__name__", None) or type(metric).__name__
    return str(name)


def check_patching(clean: Any, corrupt: Any, direction: Any, metric: Any, reads: str) -> None:
    """Refuse what exact and attribution patching both refuse: prompts that are not two different non-empty
    strings, an unknown direction, a metric that is not callable (`reads`: what it is called on)."""
    for name, prompt in (("clean", clean), ("corrupt", corrupt)):
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{name} must be a non-empty prompt string, got {prompt!r}")
    if clean == corrupt:
        raise ValueError(f"clean and corrupt are the same prompt ({clean!r}); patching compares two different "
                         f"prompts, e.g. clean='An endoscopic image of polyps', corrupt='An endoscopic image of "
                         f"normal cecum'")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'denoise' (the corrupt run gets the clean activation) or 'noise' "
                         f"(the clean run gets the corrupt one), got {direction!r}")
    if not callable(metric):
        raise ValueError(f"metric must be a callable on {reads}, got {type(metric).__name__}")


def effect_dataset(lens: Lens, *, seeds: Sequence[int], dims: tuple[str, ...], coords: dict, patched: np.ndarray,
                   scores: np.ndarray, images: np.ndarray, num_inference_steps: int, metric: Any,
                   extra: dict | None = None, **attrs: Any) -> xr.Dataset:
    """The result of a patching call, exact or attribution: ``effect`` from the patched runs' metric `patched`
    ``(seed, patch)`` and the unpatched runs' `scores` ``(seed, [clean, corrupt])``, NaN (with a warning naming
    the seeds) where the metric scores the clean and the corrupt run alike; the clean and corrupt `images`
    ``(seed, 2, H, W, 3)``, `extra` variables, a ``timestep`` per step, provenance and `attrs`."""
    spread = scores[:, 0] - scores[:, 1]
    alike = [seeds[i] for i in np.flatnonzero(spread == 0)]
    if alike:
        warnings.warn(f"the metric {metric_name(metric)} scores the clean and the corrupt image alike at seeds "
                      f"{alike}: their effect is undefined (NaN); choose prompts or a metric that tell them apart",
                      stacklevel=3)
    with np.errstate(divide="ignore", invalid="ignore"):
        effect = np.where(spread[:, None] != 0, (patched - scores[:, 1:2]) / spread[:, None], np.nan)
    shape = (len(seeds),) + tuple(len(coords[d]) for d in dims)
    coords = {"seed": list(seeds), **coords}
    if "step" in dims:
        timesteps = scheduler_timesteps(lens, num_inference_steps).astype(np.float64)
        coords["timestep"] = ("step", timesteps[coords["step"]])
    ds = xr.Dataset(
        {
            "effect": (("seed",) + dims, effect.reshape(shape)),
            "metric_patched": (("seed",) + dims, patched.reshape(shape)),
            "metric_clean": (("seed",), scores[:, 0]),
            "metric_corrupt": (("seed",), scores[:, 1]),
            "image_clean": (("seed", "y", "x", "rgb"), images[:, 0]),
            "image_corrupt": (("seed", "y", "x", "rgb"), images[:, 1]),
            **(extra or {}),
        },
        coords=coords,
    )
    ds.attrs.update(lens.provenance())
    ds.attrs.update(metric=metric_name(metric), num_inference_steps=num_inference_steps, seeds=typed(list(seeds)),
                    **attrs)
    return ds
