"""`capture`: record a site's output per layer and denoising step into a labelled, resumable store.

The run for prompt p and seed s is the plain call ``lens.pipeline(p, generator=lens.generator(s),
num_inference_steps=T, guidance_scale=g, output_type="np", **lens.pipeline_kwargs)``, executed
through nnsight; ``step`` is the index of the transformer call in its denoising loop. Results land
cell by cell (one cell = one (prompt, seed) run) in a Zarr store (`dit_lens.trace.store`), so a killed
capture resumes where it stopped and a repeated one is read back without running the model.

Examples:
    >>> import tempfile
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> store = tempfile.mkdtemp() + "/polyp.zarr"
    >>> ds = capture(lens, ["a polyp", "normal mucosa"], seeds=[0, 1], num_inference_steps=3,
    ...              store=store)
    >>> ds.attn2.dims, ds.attn2.shape
    (('prompt', 'seed', 'step', 'layer', 'channel'), (2, 2, 3, 2, 16))
    >>> ds.timestep.values.round().tolist()
    [999.0, 666.0, 333.0]

    Attention weights (``site="attn2.weights"``) are kept per text token, averaged over heads and
    image tokens (``reduce="mean"``), or per image token and text token (``reduce="heads"``):

    >>> w = capture(lens, ["a polyp"], seeds=[0], num_inference_steps=2, site="attn2.weights",
    ...             store=tempfile.mkdtemp() + "/weights.zarr")
    >>> w["attn2.weights"].dims, w["attn2.weights"].shape
    (('prompt', 'seed', 'step', 'layer', 'key'), (1, 1, 2, 2, 120))
    >>> w["attn2.weights"].sum("key").values.round(4).ravel().tolist()  # each query's weights sum to 1
    [1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

import datetime
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from ..model.lens import Lens
from ..scale.executors import LocalExecutor, as_executor
from .runner import Hook, branch_rows, scheduler_timesteps, check_prompts, check_seeds, is_int, traced_generate
from ..storage.locks import exclusive
from ..validate import NonFiniteError
from .store import CaptureStore, DamagedStoreError, VariableSpec, cache_root, content_key
from ..model.tokens import text_keys
from .settings import BRANCHES, DEFAULT_BATCH, REDUCTIONS, CaptureSettings

__all__ = ["BRANCHES", "DEFAULT_BATCH", "REDUCTIONS", "CaptureSettings", "capture"]

def capture(
    lens: Lens,
    prompts: str | Iterable[str],
    *,
    seeds: Iterable[int],
    num_inference_steps: int = 20,
    guidance_scale: float = 4.5,
    layers: Iterable[int] | None = None,
    site: str = "attn2",
    branch: str = "cond",
    reduce: str | None = "mean",
    store: str | Path | None = None,
    batch_size: int | None = None,
    repair: bool = False,
    executor: Any = None,
    label: str | None = None,
) -> xr.Dataset:
    """Record `site`'s output at every requested layer and step, for every prompt × seed.

    Cells already complete in the store are not run again; a tqdm bar counts cells (silence it
    with ``TQDM_DISABLE=1``).

    Args:
        lens: A `dit_lens.Lens` (from `dit_lens.load`).
        prompts: Prompt strings (unique); one string is one prompt.
        seeds: Generator seeds (unique non-negative integers).
        num_inference_steps: Denoising steps T.
        guidance_scale: Classifier-free guidance scale.
        layers: Block indices (default: all).
        site: What to record: ``"attn2"`` (cross-attention output), ``"attn1"``, ``"ff"``,
            ``"block"`` (block output), or the softmax attention weights ``"attn2.weights"``
            (image-token queries × text-token keys) and ``"attn1.weights"`` (image × image).
        branch: ``"cond"`` or ``"uncond"`` half of the guidance batch, or ``"both"`` (a
            ``branch`` dim with labels ``["cond", "uncond"]``).
        reduce: ``"mean"`` over image tokens, or ``None`` for every token (a ``token`` dim before
            ``channel``; written to the store step by step, never held in memory). At a weights
            site: ``"mean"`` over heads and queries (a ``key`` dim, one value per text token; a
            cell of 20 steps × 28 layers × 120 keys is 269 kB) or ``"heads"``, the mean over heads
            (``query`` and ``key`` dims, written step by step; queries × keys × 4 B per step and
            layer: 31 kB for the embedded world, 2 MB for PixArt-alpha at 1024 px). Heads are always
            averaged inside the hook, so memory stays bounded.
        store: Zarr path. Default: a content-addressed entry under ``cache/captures/`` (root
            overridable with ``$DIT_LENS_CACHE``) keyed by the weights, prompts, seeds, settings
            and package version.
        batch_size: Runs per pipeline call (default `DEFAULT_BATCH`, 8). Batching is faster on a
            GPU and on a CPU (a call of 8 images costs about a third of 8 single calls here) and changes
            values only by float rounding.
        repair: Recompute the finished cells of `store` that are damaged (a chunk missing, or
            failing its checksum) instead of refusing them; intact cells are kept.
        executor: Where the batches run: ``None`` (this process) or ``"ray"`` / a
            `dit_lens.scale.RayExecutor`: Ray workers write their cells into the one store at once,
            and this process marks each cell done once its chunks read back intact. The same values.
        label: The progress bar's name (default ``"capture <site>"``).

    Any number of processes may capture into one store at once: one computes (the others wait for
    it, with a note on stderr) and all return the same values. Every finished cell is checked
    (checksums, no chunk missing) before anything is served.

    Returns:
        A Dataset backed by the store (``.load()`` it to detach), with variable ``site`` of dims
        ``("prompt", "seed", "step", "layer"[, "branch"][, "token"], "channel")`` (at a weights
        site ``(..., "key")`` or ``(..., "query", "key")``; key i is text token i, see
        `dit_lens.model.tokens`) and coordinates prompt, seed, step, timestep (per step), layer;
        provenance in ``attrs``.

    Raises:
        ValueError: a bad argument (the message names it and the fix).
        dit_lens.trace.store.CaptureStoreError: `store` is unreadable or holds another capture.
        dit_lens.trace.store.DamagedStoreError: finished cells of `store` are missing or damaged
            (the message names them; ``repair=True`` recomputes them). Nothing was served.
        dit_lens.validate.NonFiniteError: a run produced NaN or inf values (e.g. an extreme guidance scale);
            its cells were not stored as done.
    """
    prompts = check_prompts(prompts)
    seeds = check_seeds(seeds)
    if isinstance(layers, (int, np.integer)):
        raise ValueError(f"layers must be a list of block indices; pass layers=[{layers}]")
    settings = CaptureSettings(
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        layers=None if layers is None else tuple(layers),
        site=site,
        branch=branch,
        reduce=reduce,
    ).resolve(lens)
    if batch_size is None:
        batch_size = DEFAULT_BATCH
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")

    template, spec = _layout(lens, prompts, seeds, settings)
    identity = _identity(lens, prompts, seeds, settings)
    key = content_key(identity)
    path = Path(store) if store is not None else cache_root() / "captures" / f"{key}.zarr"
    attrs = {**_provenance(lens, settings), "capture_key": key}
    total = len(prompts) * len(seeds)
    if not isinstance(repair, bool):
        raise ValueError(f"repair must be True or False, got {repair!r}")
    with exclusive(path), ThreadPoolExecutor(max_workers=1) as pool:
        if path.exists() or _streamed(settings):  # checked (or needed) before any model work
            opened = _open_verified(path, template, spec, identity, attrs, prompts, seeds, repair)
            missing = opened.missing()
            cells = lambda: opened  # noqa: E731
        else:  # a new store is made by a worker while the first batch runs (zarr's fixed cost hidden)
            making = pool.submit(CaptureStore.open, path, template, spec, identity=identity, attrs=attrs)
            missing = [(i, j) for i in range(len(prompts)) for j in range(len(seeds))]
            cells = making.result
        batches = [missing[start : start + int(batch_size)] for start in range(0, len(missing), int(batch_size))]
        runner = as_executor(executor)
        if isinstance(runner, LocalExecutor):
            shared: Any = (cells, prompts, seeds, settings, spec.shape[2:])
        else:  # workers write their cells' chunks into the store; only this process marks cells done
            cells()
            shared = (str(path), spec, prompts, seeds, settings)
        bar = tqdm(total=total, initial=total - len(missing), unit="cell", desc=label or f"capture {settings.site}")
        with bar:
            for k, _ in runner.map(lens, _fill if isinstance(runner, LocalExecutor) else _fill_store, batches,
                                   shared=shared):
                cells().mark_done(batches[k])
                bar.update(len(batches[k]))
        return cells().dataset()


def _fill(lens: Lens, shared: tuple, batch: list) -> None:
    cells, prompts, seeds, settings, cell_shape = shared
    _run_batch(lens, cells, batch, prompts, seeds, settings, cell_shape)


def _fill_store(lens: Lens, shared: tuple, batch: list) -> None:
    """A worker's half of a capture: run `batch` and write its cells into the store at the path."""
    path, spec, prompts, seeds, settings = shared
    store = CaptureStore(Path(path), spec)
    _run_batch(lens, lambda: store, batch, prompts, seeds, settings, spec.shape[2:])


def _open_verified(path, template, spec, identity, attrs, prompts, seeds, repair) -> CaptureStore:
    """Open the store and check its finished cells; with `repair`, mark the damaged ones missing."""
    try:
        store = CaptureStore.open(path, template, spec, identity=identity, attrs=attrs)
    except DamagedStoreError:
        if not repair:
            raise
        CaptureStore.reset_done(path)
        store = CaptureStore.open(path, template, spec, identity=identity, attrs=attrs)
    damaged = store.verify()
    if damaged and repair:
        store.unmark(damaged)
    elif damaged:
        listed = "; ".join(f"prompt {prompts[i]!r} seed {seeds[j]}: {why}" for (i, j), why in list(damaged.items())[:3])
        more = f" (and {len(damaged) - 3} more)" if len(damaged) > 3 else ""
        raise DamagedStoreError(
            f"store {path}: {len(damaged)} finished cell(s) are missing or damaged, so nothing was served "
            f"from it: {listed}{more}; recompute just those cells with capture(..., repair=True) "
            f"(`--repair` on the command line)"
        )
    return store


def _streamed(settings: CaptureSettings) -> bool:
    """Whether values go to the store step by step (large) rather than once per batch (small)."""
    return settings.reduce != "mean"


def _reduction(settings: CaptureSettings):
    """``reduce(output) -> values`` applied inside the hook, before anything is kept."""
    weights = settings.site.endswith(".weights")
    if settings.reduce == "mean" and weights:
        return lambda w: w.mean(dim=(1, 2), dtype=torch.float32)  # (rows, heads, q, k) -> (rows, k)
    if settings.reduce == "mean":
        return lambda h: h.mean(dim=1, dtype=torch.float32)  # (rows, tokens, C) -> (rows, C)
    if settings.reduce == "heads":
        return lambda w: w.mean(dim=1, dtype=torch.float32)  # (rows, heads, q, k) -> (rows, q, k)
    return lambda h: h  # (rows, tokens, C)


def _run_batch(lens, cells, batch, prompts, seeds, settings, cell_shape) -> None:
    """Run the cells of `batch` as one pipeline call and write their values to ``cells()``, the
    store (a callable, so that a store still being created is waited for only when written to).
    `cell_shape` is one cell's shape in the store: (step, layer[, branch], ...)."""
    size, guided = len(batch), lens.guided(settings.guidance_scale)
    steps, layers, branch = settings.num_inference_steps, settings.layers, settings.branch
    position = {layer: index for index, layer in enumerate(layers)}
    reduce = _reduction(settings)
    tail = tuple(cell_shape[3 if branch == "both" else 2 :])  # per step and layer: (C,), (k,), (q, k), ...

    def reduced(output: torch.Tensor) -> torch.Tensor:
        values = branch_rows(reduce(output), branch, size, guided)  # (cells[, branch], ...)
        if tuple(values.shape[-len(tail) :]) != tail:
            raise ValueError(f"{settings.site} gives {tuple(values.shape[1:])} per cell, step and layer; the store "
                             f"expects {tail} (does the pipeline pad prompts to another length?)")
        return values

    diverged: list[tuple[int, int]] = []  # (step, layer) where a value was NaN or inf

    if not _streamed(settings):
        buffer = torch.empty((size, *cell_shape), dtype=torch.float32, device=lens.device)  # (cells, step, layer, ...)

        def visit(step: int, layer: int, output: torch.Tensor) -> None:
            buffer[:, step, position[layer]] = reduced(output)

    else:

        def visit(step: int, layer: int, output: torch.Tensor) -> None:
            values = reduced(output).float().cpu().numpy()  # (cells[, branch], ...)
            if not np.isfinite(values).all():
                diverged.append((step, layer))
            for row, cell in enumerate(batch):
                cells().write(cell, values[row], at=(step, position[layer]))

    traced_generate(
        lens,
        [prompts[i] for i, _ in batch],
        [seeds[j] for _, j in batch],
        num_inference_steps=steps,
        guidance_scale=settings.guidance_scale,
        hooks=[Hook(settings.site, layers, visit)],
    )
    if not _streamed(settings):
        values = buffer.cpu().numpy()
        bad = ~np.isfinite(values.reshape(size, steps, len(layers), -1)).all(axis=(0, 3))  # (step, layer)
        diverged += [(int(t), layers[int(k)]) for t, k in np.argwhere(bad)]
    if diverged:
        (t, layer), runs = diverged[0], ", ".join(f"{prompts[i]!r} seed {seeds[j]}" for i, j in batch[:3])
        raise NonFiniteError(
            f"capture of {settings.site} produced NaN or inf values at {len(diverged)} (step, layer) points, first at "
            f"step {t}, layer {layer} (runs {runs}{', ...' if size > 3 else ''}; guidance_scale "
            f"{settings.guidance_scale:g}); nothing of these runs was stored: lower guidance_scale, or check the "
            f"model's weights and dtype")
    if not _streamed(settings):
        for row, cell in enumerate(batch):
            cells().write(cell, values[row])


def _layout(lens, prompts, seeds, settings) -> tuple[xr.Dataset, VariableSpec]:
    """Coordinates and the data variable's dims, shape and chunks."""
    steps, layers = settings.num_inference_steps, settings.layers
    coords: dict = {
        "prompt": np.array(prompts, dtype=str),
        "seed": np.array(seeds, dtype=np.int64),
        "step": np.arange(steps, dtype=np.int64),
        "timestep": ("step", scheduler_timesteps(lens, steps).astype(np.float64)),
        "layer": np.array(layers, dtype=np.int64),
    }
    dims = ["prompt", "seed", "step", "layer"]
    shape = [len(prompts), len(seeds), steps, len(layers)]
    chunks = [1, 1, steps, len(layers)]  # mean: one chunk per cell
    if settings.branch == "both":
        coords["branch"] = np.array(["cond", "uncond"])
        dims, shape, chunks = dims + ["branch"], shape + [2], chunks + [2]
    tokens = int(np.prod(lens.token_grid))
    if settings.site.endswith(".weights"):
        keys = _key_count(lens, settings.site)
        tail = {"key": keys} if settings.reduce == "mean" else {"query": tokens, "key": keys}
        for name, count in tail.items():
            coords[name] = np.arange(count, dtype=np.int64)
        dims, shape, chunks = dims + list(tail), shape + list(tail.values()), chunks + list(tail.values())
    else:
        if settings.reduce is None:
            coords["token"] = np.arange(tokens, dtype=np.int64)
            dims, shape, chunks = dims + ["token"], shape + [tokens], chunks + [tokens]
        dims, shape, chunks = dims + ["channel"], shape + [lens.width], chunks + [lens.width]
    if _streamed(settings):
        chunks[2] = chunks[3] = 1  # one chunk per cell, step and layer
    spec = VariableSpec(settings.site, tuple(dims), tuple(shape), tuple(chunks))
    return xr.Dataset(coords=coords), spec


def _key_count(lens: Lens, site: str) -> int:
    """Keys of a weights site: the padded text length (cross-attention) or the image tokens."""
    attention = lens.family.attention_of(site)
    if attention != lens.family.cross_attention_site:
        return int(np.prod(lens.token_grid))
    return text_keys(lens)


def _identity(lens, prompts, seeds, settings) -> dict:
    """What must match for two captures to be the same (hashed into the cache key)."""
    from ..version import __version__

    scheduler = lens.pipeline.scheduler
    provenance = lens.provenance()
    return {
        "model_fingerprint": lens.fingerprint,
        "model_class": provenance["model_class"],
        "denoiser_class": provenance["denoiser_class"],
        "scheduler": {
            "class": type(scheduler).__name__,
            # "_use_default_values" etc. are bookkeeping (a list in set order), not settings
            "config": {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
        },
        "pipeline_kwargs": dict(lens.pipeline_kwargs),
        "device_type": lens.device.type,  # initial noise differs between CPU and CUDA generators
        "prompts": list(prompts),
        "seeds": list(seeds),
        "settings": settings.to_dict(),
        "dit_lens_version": __version__,
    }


def _provenance(lens, settings) -> dict:
    import diffusers
    import nnsight

    return {
        **lens.provenance(),
        **{f"capture_{k}": v for k, v in settings.to_dict().items() if v is not None},
        "token_grid": list(lens.token_grid),
        "device": str(lens.device),
        "dtype": str(lens.denoiser.dtype),
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "nnsight_version": nnsight.__version__,
        "python_version": platform.python_version(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
