"""`patching`: exact activation patching over the cells (step, layer) of a run.

Two prompts, *clean* and *corrupt*, run from the same seed (so from the same initial noise). A patched
run is one of them with a site's output at some cells replaced by the other run's output there:

- ``direction="denoise"``: the corrupt prompt runs with the clean run's activation put in (is this cell
  *sufficient* to restore what the clean prompt makes?);
- ``direction="noise"``: the clean prompt runs with the corrupt run's activation put in (is it
  *necessary*?).

A metric scores every decoded image, and each patch gets ``effect = (m(patched) − m(corrupt)) /
(m(clean) − m(corrupt))``: 0 where the patch changes nothing, 1 where it makes the clean run's score.

One pipeline call runs up to `batch_size` patched runs together with the run they copy from: a patched
row copies the site's output from its source row of the same batch at its cells (both guidance halves of
that row, so it is exactly a run whose activation was replaced), as the injection of `dit_lens.Inject`
copies from its twin. Every call holds the source run of each seed it patches (the clean run for
``"denoise"``), and a seed's first call also its other unpatched run: a call of `batch_size` patched runs
of one seed makes ``batch_size + 1`` images (one more in the seed's first).

What is patched (`grid`), over the blocks `layers` and the denoising steps `steps`:

- ``"cell"``: each (step, layer) alone: ``effect (seed, step, layer)``;
- ``"layer"``: each layer at every step: ``effect (seed, layer)``;
- ``"step"``: each step at every layer: ``effect (seed, step)``;
- a list of windows ``(layer window, step window)``: ``effect (seed, window)``. A window is ``None``
  (every block with the site / every step), a *tuple* ``(start, stop)`` of fractions of the depth or of
  the steps (blocks ``round(start·L) … round(stop·L) − 1``, never empty, as the layer windows of studies
  and methods; of those, the blocks that have the site), or a *list* (or range) of block or step
  indices. ``grid=[(None, None)]`` is the one whole-run patch.

On PixArt the text enters the image tokens only through ``attn2``, so patching ``attn2`` at every cell
(``"denoise"``) makes the clean image itself: a check of any patching code.

Examples:
    >>> import numpy as np
    >>> from dit_lens import PixArtSpec, build_pixart, load
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> def brightness(images):  # (n, H, W, 3) in [0, 1] -> (n,)
    ...     return images.mean(axis=(1, 2, 3))
    >>> out = patching(lens, clean="a red polyp", corrupt="a pale mucosa", seeds=[0], metric=brightness,
    ...                num_inference_steps=2, progress=False)
    >>> out.effect.dims, out.effect.shape
    (('seed', 'step', 'layer'), (1, 2, 2))
    >>> whole = patching(lens, clean="a red polyp", corrupt="a pale mucosa", seeds=[0], metric=brightness,
    ...                  grid=[(None, None)], num_inference_steps=2, progress=False)
    >>> float(whole.effect.sel(seed=0, window=0))  # attn2 everywhere carries the whole prompt
    1.0
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from ..trace.attrs import typed
from ..trace.runner import Hook, scheduler_timesteps, traced_generate
from ..validate import (NonFiniteError, window_layers, as_array, check_guidance, check_int, check_seeds, check_steps, check_window,
                        is_int)

__all__ = ["DEFAULT_BATCH", "DIRECTIONS", "GRIDS", "patching"]

#: Which run gets the other's activation: the corrupt one (``"denoise"``) or the clean one (``"noise"``).
DIRECTIONS = ("denoise", "noise")
#: The named grids; a list of (layer window, step window) pairs is the other kind.
GRIDS = ("cell", "layer", "step")
#: Patched runs per pipeline call by default: each call also makes the run its patches copy from, so larger
#: calls waste less (one row in 17).
DEFAULT_BATCH = 16
#: The sites whose output a patch copies.
OUTPUT_SITES = ("attn1", "attn2", "ff", "block")

Cells = frozenset  # of (step, layer)


def patching(
    lens: Any,
    *,
    clean: str,
    corrupt: str,
    seeds: Sequence[int],
    metric: Callable[[np.ndarray], Any],
    site: str = "attn2",
    layers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    grid: str | Sequence[tuple[Any, Any]] = "cell",
    heads: bool = False,
    direction: str = "denoise",
    method: str = "exact",
    num_inference_steps: int = 20,
    guidance_scale: float = 4.5,
    batch_size: int | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """Patch `site` from one prompt's run into the other's, cell by cell, and score every image.

    Args:
        lens: A `dit_lens.Lens`.
        clean: The prompt whose behaviour is measured (e.g. "An endoscopic image of polyps").
        corrupt: Another prompt (e.g. "An endoscopic image of normal cecum").
        seeds: Generator seeds; clean and corrupt share each one.
        metric: ``metric(images)`` on decoded images ``(n, H, W, 3)`` float32 in [0, 1] returning one
            finite number per image, shape ``(n,)`` (numpy, torch or a list).
        site: ``"attn2"`` (cross-attention output), ``"attn1"``, ``"ff"`` or ``"block"``; on Flux the
            blocks of either list that have it.
        layers: Blocks of a ``"cell"``, ``"layer"`` or ``"step"`` grid (default: every block with `site`).
        steps: Denoising steps of those grids (default: all T).
        grid: ``"cell"``, ``"layer"``, ``"step"`` or a list of ``(layer window, step window)`` (see the
            module's docs).
        heads: One attention head at a time: not available yet (refused).
        direction: ``"denoise"`` (the corrupt run gets the clean activation) or ``"noise"`` (the reverse).
        method: ``"exact"`` (every patched run is run); attribution patching is not available yet.
        num_inference_steps: Denoising steps T.
        guidance_scale: Classifier-free guidance scale (a patch covers both halves of the guidance batch).
        batch_size: Patched runs per pipeline call, beside the run they copy from (default 16); changes values
            only by float rounding.
        progress: Show a progress bar over pipeline calls.

    Returns:
        Dataset with ``effect`` and ``metric_patched`` of dims ``(seed, step, layer)`` / ``(seed, layer)``
        / ``(seed, step)`` / ``(seed, window)`` by `grid` (windows carry coordinates ``layer_window`` and
        ``step_window``, their labels), ``metric_clean (seed)`` and ``metric_corrupt (seed)``, the clean and
        corrupt images ``image_clean`` / ``image_corrupt (seed, y, x, rgb)``, and a ``timestep`` coordinate
        per step. ``effect`` is NaN at a seed where the metric scores the clean and the corrupt image alike
        (a warning names them). Attrs: provenance, every setting and the cells of each patch.

    Raises:
        ValueError: a bad argument, identical prompts, or a metric whose output is not one finite number
            per image (the message names the metric).
    """
    if heads is not False:
        raise ValueError("patching one attention head at a time (heads=True) is not available yet; patch the "
                         "whole site with heads=False")
    if method != "exact":
        if method == "attribution":
            raise ValueError("attribution patching (method='attribution') is not available yet; use method='exact'")
        raise ValueError(f"method must be 'exact', got {method!r}")
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
        raise ValueError(f"metric must be a callable on images (n, H, W, 3) returning (n,), got {type(metric).__name__}")
    seeds = check_seeds(seeds)
    T = check_steps(num_inference_steps, lens.pipeline.scheduler)
    guidance_scale = check_guidance(guidance_scale)
    per_call = DEFAULT_BATCH if batch_size is None else check_int(batch_size, "batch_size", minimum=1)
    site_layers = _site_layers(lens, site)
    dims, coords, patches, labels = _grid(lens, grid, site, site_layers, layers, steps, T)

    runs = [(s, k) for s in range(len(seeds)) for k in range(len(patches))]  # seed-major: a call holds 1-2 seeds
    chunks = [runs[i : i + per_call] for i in range(0, len(runs), per_call)]
    patched = np.full((len(seeds), len(patches)), np.nan)
    sources = np.full((len(seeds), 2), np.nan)  # (seed, [clean, corrupt])
    height, width = lens.pipeline_kwargs["height"], lens.pipeline_kwargs["width"]
    images = np.zeros((len(seeds), 2, height, width, 3), np.float32)
    # the patched runs' own prompt (its unpatched run: the other source) and the prompt they copy from
    own, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    kinds = {source: int(direction == "noise"), own: int(direction == "denoise")}  # index into [clean, corrupt]
    scored: set[int] = set()
    for chunk in tqdm(chunks, desc=f"patching {site}", unit="call", disable=not progress):
        # rows: each seed's source run, its unpatched own run in its first call only, then the patched runs
        lead = [(s, prompt) for s in sorted({s for s, _ in chunk})
                for prompt in ((source,) if s in scored else (source, own))]
        prompts = [prompt for _, prompt in lead] + [own] * len(chunk)
        row_seeds = [seeds[s] for s, _ in lead] + [seeds[s] for s, _ in chunk]
        from_row = {s: i for i, (s, prompt) in enumerate(lead) if prompt == source}
        plan: dict = {}  # (step, layer) -> (patched rows, their source rows)
        for j, (s, k) in enumerate(chunk):
            for cell in patches[k]:
                plan.setdefault(cell, ([], []))
                plan[cell][0].append(len(lead) + j)
                plan[cell][1].append(from_row[s])
        out = _run(lens, site, plan, prompts, row_seeds, T, guidance_scale)
        scores = _score(metric, out)
        for i, (s, prompt) in enumerate(lead):
            if s not in scored:  # a seed's clean and corrupt score and image: from its first call
                sources[s, kinds[prompt]], images[s, kinds[prompt]] = scores[i], out[i]
        scored.update(s for s, _ in lead)
        for j, (s, k) in enumerate(chunk):
            patched[s, k] = scores[len(lead) + j]

    spread = sources[:, 0] - sources[:, 1]
    alike = [seeds[i] for i in np.flatnonzero(spread == 0)]
    if alike:
        warnings.warn(f"the metric {_name(metric)} scores the clean and the corrupt image alike at seeds {alike}: "
                      f"their effect is undefined (NaN); choose prompts or a metric that tell them apart",
                      stacklevel=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        effect = np.where(spread[:, None] != 0, (patched - sources[:, 1:2]) / spread[:, None], np.nan)
    shape = (len(seeds),) + tuple(len(coords[d]) for d in dims)
    coords = {"seed": seeds, **coords}
    timesteps = scheduler_timesteps(lens, T).astype(np.float64)
    if "step" in dims:
        coords["timestep"] = ("step", timesteps[coords["step"]])
    ds = xr.Dataset(
        {
            "effect": (("seed",) + dims, effect.reshape(shape)),
            "metric_patched": (("seed",) + dims, patched.reshape(shape)),
            "metric_clean": (("seed",), sources[:, 0]),
            "metric_corrupt": (("seed",), sources[:, 1]),
            "image_clean": (("seed", "y", "x", "rgb"), images[:, 0]),
            "image_corrupt": (("seed", "y", "x", "rgb"), images[:, 1]),
        },
        coords=coords,
    )
    ds.attrs.update(lens.provenance())
    ds.attrs.update(
        clean=clean, corrupt=corrupt, site=site, direction=direction, method=method, metric=_name(metric),
        grid=grid if isinstance(grid, str) else "windows", windows=typed(labels),
        patches=typed([sorted(p) for p in patches]), num_inference_steps=T, guidance_scale=guidance_scale,
        batch_size=per_call, seeds=typed(seeds),
    )
    return ds


def _run(lens: Any, site: str, plan: dict, prompts: list[str], row_seeds: list[int], T: int,
         guidance_scale: float) -> np.ndarray:
    """One pipeline call; row ``plan[(step, layer)][0][i]`` takes row ``plan[...][1][i]``'s `site` output there.
    Returns the decoded images ``(rows, H, W, 3)``."""
    n = len(prompts)
    halves = 2 if lens.guided(guidance_scale) else 1  # guided: unconditional rows first, then conditional
    rows = {cell: (torch.tensor([r + b * n for b in range(halves) for r in dst], device=lens.device),
                   torch.tensor([r + b * n for b in range(halves) for r in src], device=lens.device))
            for cell, (dst, src) in plan.items()}

    def visit(step: int, layer: int, h: torch.Tensor) -> torch.Tensor | None:  # h (halves·rows, tokens, C)
        if (step, layer) not in rows:
            return None
        dst, src = rows[(step, layer)]
        out = h.clone()
        out[dst] = h[src]
        return out

    layers = tuple(sorted({layer for _, layer in plan}))
    hooks = [Hook(site, layers, visit, frozenset(step for step, _ in plan))] if plan else []
    result = traced_generate(lens, prompts, row_seeds, num_inference_steps=T, guidance_scale=guidance_scale,
                             hooks=hooks, output_type="np")
    images = result.images
    images = images.float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float32)
    if not np.isfinite(images).all():
        raise NonFiniteError(f"the decoded images hold NaN or inf (guidance_scale={guidance_scale:g}, {T} steps): the "
                             f"model or its settings diverge; check the weights, dtype and guidance_scale")
    return images


def _score(metric: Callable, images: np.ndarray) -> np.ndarray:
    """The metric's values ``(n,)`` for images ``(n, H, W, 3)``, refused unless one finite number per image."""
    name, n = _name(metric), len(images)
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


def _name(metric: Any) -> str:
    name = getattr(metric, "name", None) or getattr(metric, "__name__", None) or type(metric).__name__
    return str(name)


def _site_layers(lens: Any, site: str) -> list[int]:
    """The blocks that have output site `site`, refusing weights sites and unknown names."""
    family = lens.family
    if site not in OUTPUT_SITES:
        family.rank(site)  # unknown site: names the family's sites
        raise ValueError(f"patching copies a site's output: choose one of {list(OUTPUT_SITES)}, got {site!r}")
    family.rank(site)  # a site this family does not have
    return lens.layers_with(site)


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


def _grid(lens: Any, grid: Any, site: str, site_layers: list[int], layers: Any, steps: Any,
          T: int) -> tuple[tuple[str, ...], dict, list[Cells], list[dict]]:
    """The grid's dims, coords, each patch's cells and each window's labels."""
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
        chosen_layers = site_layers if layers is None else _indices(list(layers), lens.num_layers, "blocks", site_layers)
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
        chosen_layers = _indices(block_window, lens.num_layers, "blocks", site_layers)
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
