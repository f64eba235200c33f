"""`patching`: exact activation patching over the cells (step, layer) of a run.

Two prompts, *clean* and *corrupt*, run from the same seed (so from the same initial noise). A patched
run is one of them with a site's output at some cells replaced by the other run's output there:

- ``direction="denoise"``: the corrupt prompt runs with the clean run's activation put in (is this cell
  *sufficient* to restore what the clean prompt makes?);
- ``direction="noise"``: the clean prompt runs with the corrupt run's activation put in (is it
  *necessary*?).

A metric scores every decoded image (or, with ``metric_on="latents"``, every run's final latents, and no
VAE decode runs for the patched runs), and each patch gets ``effect = (m(patched) − m(corrupt)) /
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

With ``heads=True`` (or a list of head indices) an attention site is patched one head at a time: the head's
slice of the attention's output before its output projection mixes the heads (the site ``"<site>.heads"`` of
`dit_lens.model.sites`), and every result gains a last dim ``head``. Patching every head of a cell at once is
patching the site's output there.

On PixArt the text enters the image tokens only through ``attn2``, so patching ``attn2`` at every cell
(``"denoise"``) makes the clean image itself: a check of any patching code.

Examples:
    >>> import numpy as np
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
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
    >>> per_head = patching(lens, clean="a red polyp", corrupt="a pale mucosa", seeds=[0], metric=brightness,
    ...                     grid="layer", heads=True, num_inference_steps=2, progress=False)
    >>> per_head.effect.dims, per_head.effect.shape  # PixArtSpec's 2 heads
    (('seed', 'layer', 'head'), (1, 2, 2))
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from ..model.lens import Lens
from ..trace.attrs import typed
from ..trace.runner import Hook, traced_generate
from ..validate import NonFiniteError, check_guidance, check_int, check_seeds, check_steps
from .attribution import attribution_patching
from .patch_grid import (DIRECTIONS, GRIDS, check_patching, effect_dataset, head_indices, patch_grid,
                         score_metric as _score, site_layers)

__all__ = ["DEFAULT_BATCH", "DIRECTIONS", "GRIDS", "METRIC_ON", "patching"]

#: What the metric scores: the decoded images or the final latents.
METRIC_ON = ("images", "latents")
#: Patched runs per pipeline call by default: each call also makes the run its patches copy from, so larger
#: calls waste less (one row in 17).
DEFAULT_BATCH = 16


def patching(
    lens: Lens,
    *,
    clean: str,
    corrupt: str,
    seeds: Sequence[int],
    metric: Callable[[np.ndarray], Any],
    site: str = "attn2",
    layers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    grid: str | Sequence[tuple[Any, Any]] = "cell",
    heads: bool | Sequence[int] = False,
    direction: str = "denoise",
    method: str = "exact",
    metric_on: str = "images",
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
        metric: ``metric(images)`` on decoded images ``(n, H, W, 3)`` float32 in [0, 1] (with
            ``metric_on="latents"``: on final latents ``(n, C, h, w)`` float32) returning one finite number per
            run, shape ``(n,)`` (numpy, torch or a list).
        site: ``"attn2"`` (cross-attention output), ``"attn1"``, ``"ff"`` or ``"block"``; on Flux the
            blocks of either list that have it.
        layers: Blocks of a ``"cell"``, ``"layer"`` or ``"step"`` grid (default: every block with `site`).
        steps: Denoising steps of those grids (default: all T).
        grid: ``"cell"``, ``"layer"``, ``"step"`` or a list of ``(layer window, step window)`` (see the
            module's docs).
        heads: ``True``: patch every head of the attention site one at a time; a list: those heads; ``False``:
            the whole site. Sites with heads: a family's softmax attentions with their own output projection
            (not ``"ff"``, ``"block"``, SANA's linear ``"attn1"`` or Flux's single-stream blocks).
        direction: ``"denoise"`` (the corrupt run gets the clean activation) or ``"noise"`` (the reverse).
        method: ``"exact"`` (every patched run is run) or ``"attribution"`` (first order, one forward and one
            backward pass per seed: `dit_lens.attribution_patching` with its defaults; the metric must then be
            differentiable on torch images, e.g. `dit_lens.class_logprob`).
        metric_on: ``"images"`` (decoded images) or ``"latents"`` (each run's final latents; only the clean and
            the corrupt run are decoded, once per seed, for ``image_clean`` / ``image_corrupt``).
        num_inference_steps: Denoising steps T.
        guidance_scale: Classifier-free guidance scale (a patch covers both halves of the guidance batch).
        batch_size: Patched runs per pipeline call, beside the run they copy from (default 16); changes values
            only by float rounding.
        progress: Show a progress bar over pipeline calls.

    Returns:
        Dataset with ``effect`` and ``metric_patched`` of dims ``(seed, step, layer)`` / ``(seed, layer)``
        / ``(seed, step)`` / ``(seed, window)`` by `grid` (windows carry coordinates ``layer_window`` and
        ``step_window``, their labels), then ``head`` with heads, ``metric_clean (seed)`` and
        ``metric_corrupt (seed)``, the clean and corrupt images ``image_clean`` / ``image_corrupt (seed, y, x,
        rgb)`` (with ``metric_on="latents"`` also their latents ``latent_clean`` / ``latent_corrupt (seed,
        channel, h, w)``), and a ``timestep`` coordinate per step. ``effect`` is NaN at a seed where the
        metric scores the clean and the corrupt run alike (a warning names them). Attrs: provenance, every setting and the cells of each patch.

    Raises:
        ValueError: a bad argument, identical prompts, heads of a site without them, or a metric whose output
            is not one finite number per run (the message names the metric).
    """
    if method == "attribution":
        if heads is not False or metric_on != "images":
            raise ValueError("attribution patching differentiates the metric of decoded images through the whole "
                             "site: use heads=False and metric_on='images' with method='attribution', or "
                             "method='exact'")
        return attribution_patching(lens, clean=clean, corrupt=corrupt, seeds=seeds, metric=metric, site=site,
                                    layers=layers, steps=steps, grid=grid, direction=direction,
                                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                    progress=progress)
    if method != "exact":
        raise ValueError(f"method must be 'exact' (every patched run is run) or 'attribution' (first order, one "
                         f"backward pass per seed), got {method!r}")
    if metric_on not in METRIC_ON:
        raise ValueError(f"metric_on must be 'images' (decoded images) or 'latents' (final latents), got {metric_on!r}")
    check_patching(clean, corrupt, direction, metric, f"{metric_on} returning one number per run")
    seeds = check_seeds(seeds)
    T = check_steps(num_inference_steps, lens.pipeline.scheduler)
    guidance_scale = check_guidance(guidance_scale)
    per_call = DEFAULT_BATCH if batch_size is None else check_int(batch_size, "batch_size", minimum=1)
    per_head = heads is not False
    reachable = site_layers(lens, site, per_head)
    patched_site = f"{site}.heads" if per_head else site
    dims, coords, grid_cells, labels = patch_grid(lens, grid, patched_site, reachable, layers, steps, T)
    head_list, head_count = head_indices(lens, site, heads, reachable)
    if per_head:
        dims, coords = dims + ("head",), {**coords, "head": head_list}
    patches = [(cells, head) for cells in grid_cells for head in head_list]  # a patch: its cells, one head or all

    runs = [(s, k) for s in range(len(seeds)) for k in range(len(patches))]  # seed-major: a call holds 1-2 seeds
    chunks = [runs[i : i + per_call] for i in range(0, len(runs), per_call)]
    patched = np.full((len(seeds), len(patches)), np.nan)
    sources = np.full((len(seeds), 2), np.nan)  # (seed, [clean, corrupt])
    finals: list = [[None, None] for _ in seeds]  # each seed's clean and corrupt output: image or latents
    # the patched runs' own prompt (its unpatched run: the other source) and the prompt they copy from
    own, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    kinds = {source: int(direction == "noise"), own: int(direction == "denoise")}  # index into [clean, corrupt]
    scored: set[int] = set()
    for chunk in tqdm(chunks, desc=f"patching {patched_site}", unit="call", disable=not progress):
        # rows: each seed's source run, its unpatched own run in its first call only, then the patched runs
        lead = [(s, prompt) for s in sorted({s for s, _ in chunk})
                for prompt in ((source,) if s in scored else (source, own))]
        prompts = [prompt for _, prompt in lead] + [own] * len(chunk)
        row_seeds = [seeds[s] for s, _ in lead] + [seeds[s] for s, _ in chunk]
        from_row = {s: i for i, (s, prompt) in enumerate(lead) if prompt == source}
        plan: dict = {}  # (step, layer) -> {head or None: (patched rows, their source rows)}
        for j, (s, k) in enumerate(chunk):
            cells, head = patches[k]
            for cell in cells:
                dst, src = plan.setdefault(cell, {}).setdefault(head, ([], []))
                dst.append(len(lead) + j)
                src.append(from_row[s])
        out = _run(lens, patched_site, head_count, plan, prompts, row_seeds, T, guidance_scale, metric_on)
        scores = _score(metric, out)
        for i, (s, prompt) in enumerate(lead):
            if s not in scored:  # a seed's clean and corrupt score and output: from its first call
                sources[s, kinds[prompt]], finals[s][kinds[prompt]] = scores[i], out[i]
        scored.update(s for s, _ in lead)
        for j, (s, k) in enumerate(chunk):
            patched[s, k] = scores[len(lead) + j]

    finals = np.stack([np.stack(pair) for pair in finals])  # (seed, [clean, corrupt], ...)
    if metric_on == "latents":
        latents, images = finals, _decode(lens, finals)
        extra = {"latent_clean": (("seed", "channel", "h", "w"), latents[:, 0]),
                 "latent_corrupt": (("seed", "channel", "h", "w"), latents[:, 1])}
    else:
        images, extra = finals, {}
    return effect_dataset(
        lens, seeds=seeds, dims=dims, coords=coords, patched=patched, scores=sources, images=images,
        num_inference_steps=T, metric=metric, extra=extra, clean=clean, corrupt=corrupt, site=site, heads=per_head,
        direction=direction, method=method, metric_on=metric_on, guidance_scale=guidance_scale,
        grid=grid if isinstance(grid, str) else "windows", windows=typed(labels),
        patches=typed([sorted(cells) for cells in grid_cells]), batch_size=per_call)


def _run(lens: Lens, site: str, heads: int, plan: dict, prompts: list[str], row_seeds: list[int], T: int,
         guidance_scale: float, metric_on: str) -> np.ndarray:
    """One pipeline call; at ``(step, layer)``, row ``plan[cell][head][0][i]`` takes row ``plan[cell][head][1][i]``'s
    `site` output there, of one of its `heads` heads (`head` None: all of it). Returns the decoded images ``(rows, H,
    W, 3)``, or the final latents ``(rows, C, h, w)`` with `metric_on` ``"latents"`` (no decode), float32."""
    n = len(prompts)
    halves = 2 if lens.guided(guidance_scale) else 1  # guided: unconditional rows first, then conditional
    device = lens.device  # once: diffusers looks it up through every module of the denoiser
    edits: dict = {}  # (step, layer) -> [(head, patched rows, source rows)], both guidance halves
    for (step, layer), by_head in plan.items():
        edits[(step, layer)] = [
            (head, torch.tensor([r + b * n for b in range(halves) for r in dst], device=device),
             torch.tensor([r + b * n for b in range(halves) for r in src], device=device))
            for head, (dst, src) in sorted(by_head.items(), key=lambda item: -1 if item[0] is None else item[0])]

    def visit(step: int, layer: int, h: torch.Tensor) -> torch.Tensor:  # h (halves·rows, tokens, C)
        # in place: the patched rows only (their source rows are never patched); h is this call's own tensor
        for head, dst, src in edits[(step, layer)]:
            if head is None:
                h[dst] = h[src]
            else:  # head i: channels i·d … (i+1)·d − 1 of the heads' concatenation
                width = h.shape[-1] // heads
                h[dst, :, head * width : (head + 1) * width] = h[src, :, head * width : (head + 1) * width]
        return h

    hooks = [Hook(site, (layer,), visit, frozenset(step for step, at in plan if at == layer))
             for layer in sorted({layer for _, layer in plan})]  # each block only at the steps it is patched
    result = traced_generate(lens, prompts, row_seeds, num_inference_steps=T, guidance_scale=guidance_scale,
                             hooks=hooks, output_type="latent" if metric_on == "latents" else "np")
    out = result.images
    out = out.float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float32)
    if not np.isfinite(out).all():
        what = "final latents" if metric_on == "latents" else "decoded images"
        raise NonFiniteError(f"the {what} hold NaN or inf (guidance_scale={guidance_scale:g}, {T} steps): the model "
                             f"or its settings diverge; check the weights, dtype and guidance_scale")
    return out


def _decode(lens: Lens, latents: np.ndarray) -> np.ndarray:
    """Images ``(seed, 2, H, W, 3)`` of each seed's clean and corrupt final latents ``(seed, 2, C, h, w)``."""
    from ..sampling.images import decode

    flat = torch.from_numpy(latents.reshape(-1, *latents.shape[2:])).to(lens.device)
    images = decode(lens, flat)
    return images.reshape(*latents.shape[:2], *images.shape[1:])
