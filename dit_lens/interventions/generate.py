"""`generate`: counterfactual pairs (original, edited) from the same seed, in one batched pass.

Both branches of a pair share prompt and seed, so they start from the same noise; only the edited
branch's rows are changed, by any list of interventions (`dit_lens.interventions.base`: site edits,
attention-weight edits, latent edits), through the same nnsight-hooked model that `capture` reads.
What an intervention records (MedSteer's gate, the blend mask) comes back beside the images.

Numbers never come back wrong silently: the latents are checked after every denoising step and the
images after decoding, and NaN or inf stops the run with a `dit_lens.validate.NonFiniteError` naming
the step and the edit settings (e.g. a steering strength α too large for the model).

Examples:
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> out = generate(lens, ["a polyp"], seeds=[0, 1], num_inference_steps=2, progress=False)
    >>> dict(out["image"].sizes)
    {'prompt': 1, 'seed': 2, 'branch': 1, 'y': 16, 'x': 16, 'rgb': 3}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from ..scale.executors import as_executor
from ..trace.attrs import typed
from ..trace.runner import scheduler_timesteps
from ..validate import check_guidance, check_int, check_prompts, check_seeds, check_steps
from .base import Intervention, LatentEdit, SiteEdit, flatten
from .blend import Blend, check_blend
from .plan import Plan, as_edits
from .steer import Steer

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["generate", "reprompt", "scheduler_timesteps"]


def generate(
    lens: Lens,
    prompts: str | Sequence[str],
    *,
    seeds: Sequence[int],
    edits: Intervention | Sequence[Intervention] | None = None,
    steer: Steer | Sequence[Steer] | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.5,
    record_gates: bool = False,
    blend: float = 0.0,
    batch_size: int | None = None,
    progress: bool = True,
    executor: Any = None,
) -> xr.Dataset:
    """Generate images for every (prompt, seed), with an edited twin when edits are given.

    Args:
        lens: From `dit_lens.load`.
        prompts: One prompt or a list.
        seeds: Generator seeds; each (prompt, seed) is one cell.
        edits: Interventions applied to the edited branch: site edits in list order at each site,
            latent edits in list order after each step.
        steer: Shorthand: `Steer` values put before `edits` (several apply in order at each site).
        num_inference_steps: Denoising steps T.
        guidance_scale: Classifier-free guidance scale.
        record_gates: Also return what site edits record per token (MedSteer's gate
            g = max(0, h·v)) on the conditional half of the edited run, at their layers and steps.
        blend: Shorthand: latent blending with threshold τ in [0, 1) (`Blend`) after `edits`; 0 (the
            default) turns it off.
        batch_size: Cells per pipeline call (each cell is 1 or 2 images); default 4.
        progress: Show a progress bar over batches.
        executor: Where the batches run: ``None`` (this process) or ``"ray"`` / a
            `dit_lens.scale.RayExecutor` (spread over Ray workers; the same images).

    Returns:
        Dataset with ``image (prompt, seed, branch, y, x, rgb)`` float32 in [0, 1], branch
        ``["original", "edited"]`` (the original and the edited image; ``["original"]`` without
        edits), and with `record_gates` ``gate (prompt, seed, step, layer, row, col)`` (a leading
        ``steer`` dim when several edits record one); with blending, ``blend_mask (prompt, seed,
        blend_step, latent_y, latent_x)``, the mask m after every step. Attrs hold provenance and
        every setting (``edits``: each intervention's settings).
    """
    prompts, seeds = check_prompts(prompts), check_seeds(seeds)
    edits = as_edits(edits, steer, blend)
    num_inference_steps, guidance_scale, batch_size = _validate(
        lens, edits, num_inference_steps, guidance_scale, record_gates, batch_size)
    branches = ["original", "edited"] if edits else ["original"]
    cells = [(p, s) for p in range(len(prompts)) for s in range(len(seeds))]
    per_call = batch_size or 4
    plan = Plan(lens, edits, num_inference_steps, record_gates)

    height, width = lens.pipeline_kwargs["height"], lens.pipeline_kwargs["width"]
    images = np.zeros((len(prompts), len(seeds), len(branches), height, width, 3), np.float32)
    records: dict[str, np.ndarray] = {}

    chunks = [cells[i : i + per_call] for i in range(0, len(cells), per_call)]
    runs = [([prompts[p] for p, _ in chunk for _ in branches], [seeds[s] for _, s in chunk for _ in branches],
             [i * len(branches) + 1 for i in range(len(chunk))] if edits else []) for chunk in chunks]
    shared = (edits, num_inference_steps, record_gates, guidance_scale)
    done = as_executor(executor).map(lens, _run_batch, runs, shared=shared)
    for k, (out_images, chunk_records) in tqdm(done, desc="generate", unit="batch", total=len(runs),
                                                disable=not progress):
        chunk = chunks[k]
        for name, values in chunk_records.items():  # values: (edits, pairs, ...)
            if name not in records:
                records[name] = np.zeros((values.shape[0], len(prompts), len(seeds), *values.shape[2:]), np.float32)
        for i, (p, s) in enumerate(chunk):
            images[p, s] = out_images[i * len(branches) : (i + 1) * len(branches)]
            for name, values in chunk_records.items():
                records[name][:, p, s] = values[:, i]

    coords: dict = {"prompt": prompts, "seed": seeds, "branch": branches}
    data: dict = {"image": (("prompt", "seed", "branch", "y", "x", "rgb"), images)}
    if "gate" in records:
        rows, cols = lens.token_grid
        gates = records["gate"].reshape(*records["gate"].shape[:5], rows, cols)
        timesteps = scheduler_timesteps(lens, num_inference_steps).astype(np.float64)  # as capture and maps label them
        coords.update(step=plan.steps, layer=plan.layers, timestep=("step", timesteps[plan.steps]))
        _add_record(data, coords, "gate", ("prompt", "seed", "step", "layer", "row", "col"), gates,
                    plan.names(plan.recording("gate")))
    if "blend_mask" in records:
        masks = records["blend_mask"]
        coords["blend_step"] = np.arange(masks.shape[3])
        _add_record(data, coords, "blend_mask", ("prompt", "seed", "blend_step", "latent_y", "latent_x"), masks,
                    plan.names(plan.recording("blend_mask")))
    if "energy" in records:
        coords["guided_step"] = plan.guided_steps
        _add_record(data, coords, "energy", ("prompt", "seed", "guided_step"), records["energy"],
                    plan.names(plan.guides))
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(lens.provenance())
    blends = [e.threshold for e in edits if isinstance(e, Blend)]
    ds.attrs.update(
        num_inference_steps=num_inference_steps,
        guidance_scale=float(guidance_scale),
        blend=blends[-1] if blends else 0.0,
        seeds=typed(seeds),
        steers=typed([e.settings() for e in edits if isinstance(e, Steer)]),
        edits=typed([e.settings() for e in edits]),
    )
    return ds


def reprompt(
    lens: Lens,
    source: str,
    target: str,
    *,
    seeds: Sequence[int],
    edits: Intervention | Sequence[Intervention] | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.5,
    blend: float = 0.0,
    batch_size: int | None = None,
    progress: bool = True,
    executor: Any = None,
) -> xr.Dataset:
    """The re-prompting baseline as pairs: the `source` and `target` prompts from the same seed.

    Laid out like a `generate` result so the same metrics apply: branch ``"original"`` is the
    source prompt's image, ``"edited"`` the target prompt's (the counterfactual). Both come from
    one batched pass; `edits` act on the target branch as `generate` applies them to an edited one
    (e.g. `AttentionRegulation` to put the target's pathology in a region, `Confine` to keep the
    source image outside it), and `blend` too. `executor` spreads the batches as `generate`'s does.

    Returns:
        Dataset with ``image (prompt, seed, branch, y, x, rgb)``, prompt ``[source]`` (and ``energy``
        when an edit corrects latents); attrs name the target prompt and every edit's settings.
    """
    check_prompts([source, target])  # two different strings
    seeds = check_seeds(seeds)
    edits = as_edits(edits, None, blend)
    num_inference_steps, guidance_scale, batch_size = _validate(
        lens, edits, num_inference_steps, guidance_scale, False, batch_size, same_prompt_ok=True)
    plan = Plan(lens, edits, num_inference_steps, False)
    height, width = lens.pipeline_kwargs["height"], lens.pipeline_kwargs["width"]
    images = np.zeros((1, len(seeds), 2, height, width, 3), np.float32)
    per_call = batch_size or 4
    starts = list(range(0, len(seeds), per_call))
    runs = [([source, target] * len(chunk), [s for s in chunk for _ in range(2)], [2 * i + 1 for i in range(len(chunk))])
            for chunk in (seeds[i : i + per_call] for i in starts)]
    energies: dict[int, np.ndarray] = {}
    done = as_executor(executor).map(lens, _run_batch, runs, shared=(edits, num_inference_steps, False, guidance_scale))
    for k, (out, records) in tqdm(done, desc="reprompt", unit="batch", total=len(runs), disable=not progress):
        n = len(runs[k][2])
        images[0, starts[k] : starts[k] + n] = out.reshape(n, 2, height, width, 3)
        if "energy" in records:
            energies[k] = records["energy"]  # (edits, pairs, guided steps)
    energy = [energies[k] for k in sorted(energies)]
    coords: dict = {"prompt": [source], "seed": seeds, "branch": ["original", "edited"]}
    data: dict = {"image": (("prompt", "seed", "branch", "y", "x", "rgb"), images)}
    if energy:
        coords["guided_step"] = plan.guided_steps
        _add_record(data, coords, "energy", ("prompt", "seed", "guided_step"),
                    np.concatenate(energy, axis=1)[:, None], plan.names(plan.guides))
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(lens.provenance())
    ds.attrs.update(num_inference_steps=num_inference_steps, guidance_scale=float(guidance_scale),
                    blend=check_blend(blend), seeds=typed(seeds), edit="reprompt", target_prompt=target,
                    edits=typed([e.settings() for e in edits]))
    return ds


def _run_batch(lens: Lens, shared: tuple, run: tuple) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One pipeline call of `generate` (in this process or on a worker): images and records."""
    edits, num_inference_steps, record_gates, guidance_scale = shared
    return Plan(lens, edits, num_inference_steps, record_gates).run(*run, guidance_scale)


def _add_record(data: dict, coords: dict, name: str, dims: tuple, values: np.ndarray, labels: list[str]) -> None:
    if len(labels) == 1:
        data[name] = (dims, values[0])
    else:
        dim = "steer" if name == "gate" else f"{name}_edit"
        coords[dim] = labels
        data[name] = ((dim,) + dims, values)


def _validate(lens, edits, T, guidance_scale, record_gates, batch_size,
              same_prompt_ok: bool = False) -> tuple[int, float, int | None]:
    """Checked ``(num_inference_steps, guidance_scale, batch_size)`` as plain Python numbers."""
    T = check_steps(T, lens.pipeline.scheduler)
    guidance_scale = check_guidance(guidance_scale)
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size", minimum=1)
    if edits and not same_prompt_ok and all(isinstance(e, LatentEdit) and e.reads_original for e in edits):
        raise ValueError("blend needs a steer (or another edit): latent edits alone (blend, Confine) pull the edited "
                         "branch toward the original one, which is the same run; add a steer or another edit, or "
                         "change the prompt with reprompt(..., edits=...)")
    parts = flatten(edits)
    if record_gates and not any(isinstance(e, SiteEdit) and e.record for e in parts):
        raise ValueError("record_gates=True needs a steer (or another site edit that records): the gate is the steering's own")
    for edit in edits:
        edit.check(lens, T)
    return T, guidance_scale, batch_size
