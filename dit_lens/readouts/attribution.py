"""`attribution_patching`: activation patching to first order, from one backward pass per seed.

Exact patching (`dit_lens.patching`) runs the model once per patch. Attribution patching estimates every
patch of a seed at once: with ``a_own`` the site's output at a cell (step, layer) of the patched prompt's
own run, ``a_source`` the other run's output there (both guidance halves) and m the metric of the own run's
image,

    m(patched) ≈ m(own) + Σ_cells Σ (a_source − a_own) · ∂m/∂a_own,

a sum over the patch's cells and over every row, token and channel of the cell's output. Per seed and
chunk of seeds it takes one run of the source prompt without gradients (recording the site's output at
every cell), one run of the own prompt in plain torch (`dit_lens.sampling.DifferentiableSampler`, the
differentiable copy of the pipeline's loop and decode) with a zero tensor added to the site's output at every cell, and
one backward pass to those tensors. First order is additive, so a ``"layer"``, ``"step"`` or window patch
is the sum of its cells' terms: the cell terms are computed once, for every cell any patch holds.

The result has `patching`'s layout: ``effect = (m(patched) − m(corrupt)) / (m(clean) − m(corrupt))``
with the first-order m(patched) as ``metric_patched``; ``metric_clean``, ``metric_corrupt`` and the
images come from the two differentiable-loop runs (the pipeline's images up to float rounding). The
estimate is exact where the metric is linear in the site's output; elsewhere it is a tangent, good for
small differences between the runs and for ranking cells, to be checked with exact patching where a
decision rests on it.

The metric is a callable on torch images ``(n, H, W, 3)`` in [0, 1] returning ``(n,)`` that torch can
differentiate, scoring each image on its own (`class_logprob` is one, and reads numpy images too, so
the same metric serves exact patching).

Examples:
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> def brightness(images):  # (n, H, W, 3) in [0, 1] -> (n,), numpy or torch alike
    ...     return images.mean(axis=(1, 2, 3))
    >>> out = attribution_patching(lens, clean="a red polyp", corrupt="a pale mucosa", seeds=[0],
    ...                            metric=brightness, num_inference_steps=2, progress=False)
    >>> out.effect.dims, out.effect.shape, out.attrs["method"]
    (('seed', 'step', 'layer'), (1, 2, 2), 'attribution')
    >>> layer = attribution_patching(lens, clean="a red polyp", corrupt="a pale mucosa", seeds=[0],
    ...                              metric=brightness, grid="layer", num_inference_steps=2, progress=False)
    >>> bool(abs(layer.effect - out.effect.sum("step")).max() < 1e-9)  # first order adds up
    True
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from ..model.lens import Lens
from ..optimize.objectives import ClassProbability
from ..sampling.loop import DifferentiableSampler, frozen
from ..trace.attrs import typed
from ..trace.runner import initial_noise
from ..validate import NonFiniteError, check_guidance, check_int, check_seeds, check_steps
from .patch_grid import (check_patching, effect_dataset, metric_name as _name, patch_grid, score_metric as _score,
                         site_layers)

__all__ = ["ClassLogProb", "attribution_patching", "class_logprob"]

#: Seeds per differentiable run by default (as `dit_lens.optimize_noise`).
DEFAULT_BATCH = 4


def attribution_patching(
    lens: Lens,
    *,
    clean: str,
    corrupt: str,
    seeds: Sequence[int],
    metric: Callable[[torch.Tensor], torch.Tensor],
    site: str = "attn2",
    layers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    grid: str | Sequence[tuple[Any, Any]] = "cell",
    direction: str = "denoise",
    num_inference_steps: int = 20,
    guidance_scale: float = 4.5,
    batch_size: int | None = None,
    checkpoint: bool = True,
    progress: bool = True,
) -> xr.Dataset:
    """`dit_lens.patching` to first order: every patch of a seed from one forward and one backward pass.

    Args:
        lens: A `dit_lens.Lens` (a pipeline with a VAE).
        clean: The prompt whose behaviour is measured (e.g. "An endoscopic image of polyps").
        corrupt: Another prompt (e.g. "An endoscopic image of normal cecum").
        seeds: Generator seeds; clean and corrupt share each one.
        metric: ``metric(images)`` on torch images ``(n, H, W, 3)`` float in [0, 1] returning a torch tensor
            ``(n,)`` with a gradient, each image scored on its own (e.g. `class_logprob`).
        site: ``"attn2"`` (cross-attention output), ``"attn1"``, ``"ff"`` or ``"block"``.
        layers: Blocks of a ``"cell"``, ``"layer"`` or ``"step"`` grid (default: every block with `site`).
        steps: Denoising steps of those grids (default: all T).
        grid: ``"cell"``, ``"layer"``, ``"step"`` or a list of ``(layer window, step window)``, as `patching`.
        direction: ``"denoise"`` (the corrupt run gets the clean activation) or ``"noise"`` (the reverse).
        num_inference_steps: Denoising steps T.
        guidance_scale: Classifier-free guidance scale (a patch covers both halves of the guidance batch).
        batch_size: Seeds per differentiable run (default 4); changes values only by float rounding.
        checkpoint: Recompute each transformer call in the backward pass, so memory holds one step's
            activations; False is faster (about 1.6× on the embedded world, benchmarks/attribution.py) where
            every step's fit. The result is the same either way.
        progress: Show a progress bar over the runs.

    Returns:
        `patching`'s dataset (same variables, dims, coordinates and attrs), with ``attrs["method"] ==
        "attribution"`` and ``metric_patched`` the first-order estimate m(own) + Σ (a_source − a_own) ·
        ∂m/∂a_own (own: the corrupt run for ``"denoise"``, the clean run for ``"noise"``).

    Raises:
        ValueError: a bad argument, identical prompts, or a metric that does not return one finite number
            per image or whose scores have no gradient (then use ``patching(..., method="exact")``).
    """
    check_patching(clean, corrupt, direction, metric, "torch images (n, H, W, 3) returning (n,)")
    if not isinstance(checkpoint, bool):
        raise ValueError(f"checkpoint must be True or False, got {checkpoint!r}")
    seeds = check_seeds(seeds)
    T = check_steps(num_inference_steps, lens.pipeline.scheduler)
    guidance_scale = check_guidance(guidance_scale)
    per_call = DEFAULT_BATCH if batch_size is None else check_int(batch_size, "batch_size", minimum=1)
    dims, coords, patches, labels = patch_grid(lens, grid, site, site_layers(lens, site), layers, steps, T)
    cells = sorted(frozenset().union(*patches))  # every cell some patch holds, each attributed once

    own, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    kinds = {source: int(direction == "noise"), own: int(direction == "denoise")}  # index into [clean, corrupt]
    terms = np.zeros((len(seeds), len(cells)))  # (seed, cell): Σ (a_source − a_own) · ∂m/∂a_own
    scores = np.zeros((len(seeds), 2))  # (seed, [clean, corrupt])
    height, width = lens.pipeline_kwargs["height"], lens.pipeline_kwargs["width"]
    images = np.zeros((len(seeds), 2, height, width, 3), np.float32)
    modules = [m for m in lens.pipeline.components.values() if isinstance(m, torch.nn.Module)]
    chunks = [list(range(i, min(i + per_call, len(seeds)))) for i in range(0, len(seeds), per_call)]
    with frozen(modules):
        loops = {prompt: DifferentiableSampler(lens, prompt, T, guidance_scale, checkpoint) for prompt in (own, source)}
        for chunk in tqdm(chunks, desc=f"attribution {site}", unit="call", disable=not progress):
            run = _attribute(lens, site, cells, loops[own], loops[source], [seeds[s] for s in chunk], metric)
            terms[chunk] = run["terms"]
            scores[chunk, kinds[own]], images[chunk, kinds[own]] = run["own"]
            scores[chunk, kinds[source]], images[chunk, kinds[source]] = run["source"]

    index = {cell: i for i, cell in enumerate(cells)}
    summed = np.stack([terms[:, [index[c] for c in sorted(p)]].sum(1) for p in patches], 1)  # (seed, patch)
    patched = scores[:, kinds[own], None] + summed
    return effect_dataset(
        lens, seeds=seeds, dims=dims, coords=coords, patched=patched, scores=scores, images=images,
        num_inference_steps=T, metric=metric, clean=clean, corrupt=corrupt, site=site, heads=False,
        direction=direction, method="attribution", metric_on="images", guidance_scale=guidance_scale,
        grid=grid if isinstance(grid, str) else "windows", windows=typed(labels),
        patches=typed([sorted(p) for p in patches]), batch_size=per_call)


@contextmanager
def _at_cells(lens: Lens, site: str, cells: list[tuple[int, int]], loop: DifferentiableSampler,
              visit: Callable[[tuple[int, int], torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Forward hooks that call ``visit((step, layer), output)`` on `site`'s output ``(rows, tokens, C)`` at
    `cells` of `loop`'s runs; a returned tensor replaces it. Removed on exit, also on error."""
    wanted, text = set(cells), lens.text_tokens()

    def hook_for(layer: int) -> Callable:
        part = lens.part(layer)

        def hook(_module: Any, _inputs: Any, output: Any) -> Any:
            cell = (loop.step, layer)
            if cell not in wanted:
                return None
            new = visit(cell, part.read(site, output, text))
            return None if new is None else part.write(site, output, new, text)

        return hook

    handles = [lens.site_module(site, layer).register_forward_hook(hook_for(layer))
               for layer in sorted({layer for _, layer in cells})]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _attribute(lens: Lens, site: str, cells: list[tuple[int, int]], own: DifferentiableSampler,
               source: DifferentiableSampler, seeds: list[int], metric: Callable) -> dict:
    """One chunk of seeds: the cell terms ``(seeds, cells)``, and the own and source runs' scores ``(seeds,)``
    and images ``(seeds, H, W, 3)``."""
    m, z = len(seeds), initial_noise(lens, seeds)  # (m, C, h, w)
    halves = 2 if lens.guided(own.guidance_scale) else 1  # guided: unconditional rows first
    saved: dict[tuple[int, int], torch.Tensor] = {}  # cell -> the source's output, then a_source − a_own

    def record(cell: tuple[int, int], h: torch.Tensor) -> None:  # h (halves·m, tokens, C)
        saved[cell] = h.detach().clone()

    with torch.no_grad(), _at_cells(lens, site, cells, source, record):
        source_images = _for_metric(source.images(z, seeds))  # (m, H, W, 3)
    _check_images(source_images, own.guidance_scale)
    source_scores = _score(metric, source_images)

    deltas = {cell: torch.zeros_like(saved[cell], requires_grad=True) for cell in cells}
    differences: set[tuple[int, int]] = set()

    def shift(cell: tuple[int, int], h: torch.Tensor) -> torch.Tensor:
        if cell not in differences:  # the first forward; a recomputed call sees the same h
            saved[cell] -= h.detach()
            differences.add(cell)
        return h + deltas[cell]

    with torch.enable_grad(), _at_cells(lens, site, cells, own, shift):
        own_images = _for_metric(own.images(z, seeds))
        _check_images(own_images.detach(), own.guidance_scale)
        own_scores = _differentiable_score(metric, own_images)
        grads = torch.autograd.grad(own_scores.sum(), [deltas[c] for c in cells], allow_unused=True)
    terms = torch.zeros(m, len(cells), dtype=torch.float64)
    for i, (cell, grad) in enumerate(zip(cells, grads)):
        if grad is not None:  # None: the metric does not depend on this cell
            product = (saved[cell].double() * grad.double()).flatten(1).sum(1).cpu()  # (halves·m,)
            terms[:, i] = product.reshape(halves, m).sum(0)
    if not bool(torch.isfinite(terms).all()):
        raise NonFiniteError(f"the metric {_name(metric)}'s gradient holds NaN or inf; make it smooth in the images")
    return {"terms": terms.numpy(),
            "own": (own_scores.detach().double().cpu().numpy(), own_images.detach().cpu().numpy()),
            "source": (source_scores, source_images.cpu().numpy())}


def _for_metric(images: torch.Tensor) -> torch.Tensor:
    """Images ``(m, 3, H, W)`` as the metric reads them, ``(m, H, W, 3)``, in float32 (float64 kept)."""
    images = images.permute(0, 2, 3, 1)
    return images if images.dtype == torch.float64 else images.float()


def _differentiable_score(metric: Callable, images: torch.Tensor) -> torch.Tensor:
    """The metric's scores ``(n,)`` of images that carry a graph, refused unless finite and differentiable."""
    name, n = _name(metric), len(images)
    exact = "attribution patching differentiates the metric; use patching(..., method='exact') for this metric"
    try:
        scores = metric(images)
    except RuntimeError as err:
        if "numpy" not in str(err) and "requires grad" not in str(err):
            raise
        raise ValueError(f"the metric {name} does not take torch images with a gradient ({err}); compute it in "
                         f"torch, or {exact.split('; ')[1]}") from None
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"the metric {name} returned {type(scores).__name__}, not a torch tensor with a gradient; "
                         f"{exact}")
    if tuple(scores.shape) != (n,):
        raise ValueError(f"the metric {name} returned shape {tuple(scores.shape)} for {n} images; it must return "
                         f"one number per image, shape ({n},)")
    if not bool(torch.isfinite(scores.detach()).all()):
        raise NonFiniteError(f"the metric {name} returned NaN or inf; it must return a finite number per image")
    if not scores.requires_grad:
        raise ValueError(f"the metric {name}'s scores have no gradient (computed with numpy, .item(), .detach() or "
                         f"under torch.no_grad?); {exact}")
    return scores


def _check_images(images: torch.Tensor, guidance_scale: float) -> None:
    if not bool(torch.isfinite(images).all()):
        raise NonFiniteError(f"the decoded images hold NaN or inf (guidance_scale={guidance_scale:g}): the model or "
                             f"its settings diverge; check the weights, dtype and guidance_scale")


@dataclass(frozen=True, eq=False)
class ClassLogProb:
    """The judge's log-probability of `label` for each image, on numpy or torch images ``(n, H, W, 3)`` in
    [0, 1]: numpy in, numpy ``(n,)`` out (exact patching, studies); torch in, a differentiable torch ``(n,)``
    out on the images' device (attribution patching). Built on `dit_lens.optimize.class_probability`."""

    oracle: Any
    label: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "_objective", ClassProbability(self.oracle, self.label, True))  # checks both

    @property
    def name(self) -> str:
        judge = getattr(self.oracle, "fingerprint", "")[:12]
        return f"class_logprob({self.label!r}{f', oracle={judge}' if judge else ''})"

    def __call__(self, images: Any) -> Any:
        if isinstance(images, torch.Tensor):
            _check_shape(images.shape, self.name)
            device = next(self.oracle.net.parameters()).device
            x = images.to(device=device, dtype=torch.float32).permute(0, 3, 1, 2)  # (n, 3, H, W)
            return self._objective(x).to(images.device)
        x = np.asarray(images, dtype=np.float32)
        _check_shape(x.shape, self.name)
        with torch.no_grad():
            return self(torch.from_numpy(np.ascontiguousarray(x))).double().numpy()


def _check_shape(shape: Any, name: str) -> None:
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{name} takes images of shape (n, H, W, 3) in [0, 1], got shape {tuple(shape)}")


def class_logprob(oracle: Any, label: str) -> ClassLogProb:
    """A patching metric: `oracle`'s log-probability of `label` (e.g. ``class_logprob(dit_lens.load_oracle(),
    "polyps")``), for exact patching (numpy images) and attribution patching (torch images) alike.

    Examples:
        >>> import numpy as np
        >>> from dit_lens import load_oracle
        >>> metric = class_logprob(load_oracle(), "polyps")
        >>> scores = metric(np.full((2, 64, 64, 3), 0.5, np.float32))
        >>> scores.shape, bool((scores < 0).all())
        ((2,), True)
    """
    return ClassLogProb(oracle, label)
