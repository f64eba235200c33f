"""`generate`: counterfactual pairs (unsteered, steered) from the same seed, in one batched pass.

Both branches of a pair share prompt and seed, so they start from the same noise; only the steered
branch's rows are edited, through the same nnsight-hooked model that `capture` reads. The gate of
every steered token can be recorded as a heat map over the token grid.

Examples:
    >>> from dit_lens import PixArtSpec, build_pixart, load
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> out = generate(lens, ["a polyp"], seeds=[0, 1], num_inference_steps=2, progress=False)
    >>> dict(out["image"].sizes)
    {'prompt': 1, 'seed': 2, 'branch': 1, 'y': 16, 'x': 16, 'rgb': 3}
"""

from __future__ import annotations

import copy
import json
from typing import Any, Sequence

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from .blend import blend_latents, check_blend
from ..trace.runner import check_prompts, check_seeds, traced_generate
from .steer import Steer, steer_tokens

__all__ = ["generate", "reprompt", "scheduler_timesteps"]


def generate(
    lens: Any,
    prompts: str | Sequence[str],
    *,
    seeds: Sequence[int],
    steer: Steer | Sequence[Steer] | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.5,
    record_gates: bool = False,
    blend: float = 0.0,
    batch_size: int | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """Generate images for every (prompt, seed), with a steered twin when `steer` is given.

    Args:
        lens: From `dit_lens.load`.
        prompts: One prompt or a list.
        seeds: Generator seeds; each (prompt, seed) is one cell.
        steer: A `Steer`, or several applied in order at each site (e.g. dye and polyp).
        num_inference_steps: Denoising steps T.
        guidance_scale: Classifier-free guidance scale.
        record_gates: Also return the gate g = max(0, h·v) of every token of the conditional half
            of the steered run, at steered layers and steps.
        blend: Latent blending threshold τ in [0, 1) (`dit_lens.interventions.blend`): after every step the
            steered latent is pulled back to the unsteered one where steering changed it less
            than τ of its largest change. 0 (the default) turns it off.
        batch_size: Cells per pipeline call (each cell is 1 or 2 images); default 4.
        progress: Show a progress bar over batches.

    Returns:
        Dataset with ``image (prompt, seed, branch, y, x, rgb)`` float32 in [0, 1], branch
        ``["unsteered", "steered"]`` (or ``["unsteered"]``), and with `record_gates`
        ``gate (prompt, seed, step, layer, row, col)`` (a leading ``steer`` dim when several
        steers are given); with `blend`, ``blend_mask (prompt, seed, blend_step, latent_y, latent_x)``,
        the mask m after every step. Attrs hold provenance and every setting.
    """
    prompts, seeds = check_prompts(prompts), check_seeds(seeds)
    steers = _as_steers(steer)
    _validate(lens, prompts, seeds, steers, num_inference_steps, record_gates, batch_size)
    blend = check_blend(blend)
    if blend and not steers:
        raise ValueError("blend needs a steer: it blends the steered branch with the unsteered one")
    branches = ["unsteered", "steered"] if steers else ["unsteered"]
    cells = [(p, s) for p in range(len(prompts)) for s in range(len(seeds))]
    per_call = batch_size or 4
    rows, cols = lens.token_grid
    layers = sorted({l for st in steers for l in st.steered_layers()})
    steps = sorted({t for st in steers for t in st.steered_steps(num_inference_steps)})

    height, width = lens.pipeline_kwargs["height"], lens.pipeline_kwargs["width"]
    images = np.zeros((len(prompts), len(seeds), len(branches), height, width, 3), np.float32)
    gates = None
    if record_gates:
        gates = np.zeros((len(steers), len(prompts), len(seeds), len(steps), len(layers), rows, cols), np.float32)
    masks = None

    chunks = [cells[i : i + per_call] for i in range(0, len(cells), per_call)]
    for chunk in tqdm(chunks, desc="generate", unit="batch", disable=not progress):
        row_prompts = [prompts[p] for p, _ in chunk for _ in branches]
        row_seeds = [seeds[s] for _, s in chunk for _ in branches]
        steered_rows = [i * len(branches) + 1 for i in range(len(chunk))] if steers else []
        out_images, chunk_gates, chunk_masks = _run(
            lens, row_prompts, row_seeds, steers, steered_rows, layers, steps,
            num_inference_steps, guidance_scale, record_gates, blend,
        )
        if blend and masks is None:
            masks = np.zeros((len(prompts), len(seeds), *chunk_masks.shape[1:]), np.float32)
        for i, (p, s) in enumerate(chunk):
            images[p, s] = out_images[i * len(branches) : (i + 1) * len(branches)]
            if masks is not None:
                masks[p, s] = chunk_masks[i]
            if gates is not None:
                gates[:, p, s] = chunk_gates[:, i].reshape(len(steers), len(steps), len(layers), rows, cols)

    coords = {"prompt": prompts, "seed": seeds, "branch": branches}
    data = {"image": (("prompt", "seed", "branch", "y", "x", "rgb"), images)}
    if gates is not None:
        gate_dims = ("prompt", "seed", "step", "layer", "row", "col")
        timesteps = scheduler_timesteps(lens, num_inference_steps)
        coords.update(step=steps, layer=layers, timestep=("step", timesteps[steps]))
        if len(steers) == 1:
            data["gate"] = (gate_dims, gates[0])
        else:
            coords["steer"] = [st.name or f"steer{k}" for k, st in enumerate(steers)]
            data["gate"] = (("steer",) + gate_dims, gates)
    if masks is not None:
        data["blend_mask"] = (("prompt", "seed", "blend_step", "latent_y", "latent_x"), masks)
        coords["blend_step"] = np.arange(masks.shape[2])
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(lens.provenance())
    ds.attrs.update(
        num_inference_steps=num_inference_steps,
        guidance_scale=float(guidance_scale),
        blend=blend,
        seeds=json.dumps(seeds),
        steers=json.dumps([st.settings() for st in steers]),
    )
    return ds


def reprompt(
    lens: Any,
    source: str,
    target: str,
    *,
    seeds: Sequence[int],
    num_inference_steps: int = 20,
    guidance_scale: float = 4.5,
    blend: float = 0.0,
    batch_size: int | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """The re-prompting baseline as pairs: the `source` and `target` prompts from the same seed.

    Laid out like a `generate` result so the same metrics apply: branch ``"unsteered"`` is the
    source prompt's image, ``"steered"`` the target prompt's (the counterfactual). Both come from
    one batched pass, so `blend` treats the target branch as `generate` treats a steered one.

    Returns:
        Dataset with ``image (prompt, seed, branch, y, x, rgb)``, prompt ``[source]``; attrs name
        the target prompt.
    """
    prompts, seeds = check_prompts([source, target]), check_seeds(seeds)
    _validate(lens, prompts, seeds, [], num_inference_steps, False, batch_size)
    blend = check_blend(blend)
    height, width = lens.pipeline_kwargs["height"], lens.pipeline_kwargs["width"]
    images = np.zeros((1, len(seeds), 2, height, width, 3), np.float32)
    per_call = batch_size or 4
    chunks = [seeds[i : i + per_call] for i in range(0, len(seeds), per_call)]
    done = 0
    for chunk in tqdm(chunks, desc="reprompt", unit="batch", disable=not progress):
        out, _, _ = _run(lens, [source, target] * len(chunk), [s for s in chunk for _ in range(2)], [],
                         [2 * i + 1 for i in range(len(chunk))], [], [], num_inference_steps, guidance_scale,
                         False, blend)
        images[0, done : done + len(chunk)] = out.reshape(len(chunk), 2, height, width, 3)
        done += len(chunk)
    coords = {"prompt": [source], "seed": seeds, "branch": ["unsteered", "steered"]}
    ds = xr.Dataset({"image": (("prompt", "seed", "branch", "y", "x", "rgb"), images)}, coords=coords)
    ds.attrs.update(lens.provenance())
    ds.attrs.update(num_inference_steps=num_inference_steps, guidance_scale=float(guidance_scale), blend=blend,
                    seeds=json.dumps(seeds), edit="reprompt", target_prompt=target)
    return ds


def _run(lens, row_prompts, row_seeds, steers, steered_rows, layers, steps, T, guidance, record, blend):
    """One pipeline call over the rows; edits `steered_rows`. Returns (images, gates, blend masks)."""
    n_steered, n_rows = len(steered_rows), len(row_prompts)
    gates = torch.zeros(len(steers), n_steered, len(steps), len(layers), lens.token_grid[0] * lens.token_grid[1])
    step_index = {t: i for i, t in enumerate(steps)}

    def visit(t: int, j: int, h: torch.Tensor) -> torch.Tensor | None:
        if t not in step_index:
            return None
        layer = layers[j]
        halves = h.shape[0] // n_rows  # 2 with classifier-free guidance: [uncond rows, cond rows]
        index = torch.tensor([r + k * n_rows for k in range(halves) for r in steered_rows])
        edited, changed = h[index], False  # (halves * steered, tokens, C)
        for k, st in enumerate(steers):
            if layer not in st.steered_layers() or t not in st.steered_steps(T):
                continue
            edited, gate = steer_tokens(edited, st.vector_at(t, layer), st.alpha, st.renormalize)
            changed = True
            if record:  # the conditional half is the last n_steered rows of `index`
                gates[k, :, step_index[t], j] = gate[-n_steered:].detach().float().cpu()
        if not changed:
            return None
        new = h.clone()
        new[index] = edited
        return new

    masks: list[torch.Tensor] = []

    steered = torch.tensor(steered_rows, dtype=torch.long)  # the unsteered twin of row r is row r - 1

    def step_end(t: int, latents: torch.Tensor) -> None:  # latents: (rows, C, H, W), edited in place
        latents[steered], mask = blend_latents(latents[steered - 1], latents[steered], blend)
        masks.append(mask.detach().float().cpu())  # (pairs, H, W)

    result = traced_generate(
        lens, row_prompts, row_seeds, num_inference_steps=T, guidance_scale=guidance,
        site=lens.family.cross_attention_site, layers=layers, visit=visit, output_type="np",
        step_end=step_end if blend else None,
    )
    mask_array = torch.stack(masks, dim=1).numpy() if masks else None  # (pairs, steps, H, W)
    return result.images.astype(np.float32), gates.numpy(), mask_array


def scheduler_timesteps(lens: Any, num_inference_steps: int) -> np.ndarray:
    """The scheduler's timestep values for a run of T steps (one per transformer call)."""
    scheduler = copy.deepcopy(lens.pipeline.scheduler)
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    return scheduler.timesteps.cpu().numpy()


def _as_steers(steer: Any) -> list[Steer]:
    if steer is None:
        return []
    steers = [steer] if isinstance(steer, Steer) else list(steer)
    for st in steers:
        if not isinstance(st, Steer):
            raise TypeError(f"steer= takes Steer values (or a list of them), got {type(st).__name__}")
    return steers


def _validate(lens, prompts, seeds, steers, T, record_gates, batch_size) -> None:
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {T!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if record_gates and not steers:
        raise ValueError("record_gates=True needs a steer: the gate is the steering's own")
    for st in steers:
        st.check(lens, T)
