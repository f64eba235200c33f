"""`generate`: counterfactual pairs (original, edited) from the same seed, in one batched pass.

Both branches of a pair share prompt and seed, so they start from the same noise; only the edited
branch's rows are changed, by any list of interventions (`dit_lens.interventions.base`: site edits,
attention-weight edits, latent edits), through the same nnsight-hooked model that `capture` reads.
What an intervention records (MedSteer's gate, the blend mask) comes back beside the images.

Numbers never come back wrong silently: the latents are checked after every denoising step and the
images after decoding, and NaN or inf stops the run with a `dit_lens.validate.NonFiniteError` naming
the step and the edit settings (e.g. a steering strength α too large for the model).

Examples:
    >>> from dit_lens import PixArtSpec, build_pixart, load
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> out = generate(lens, ["a polyp"], seeds=[0, 1], num_inference_steps=2, progress=False)
    >>> dict(out["image"].sizes)
    {'prompt': 1, 'seed': 2, 'branch': 1, 'y': 16, 'x': 16, 'rgb': 3}
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from ..trace.attrs import typed
from ..trace.runner import Hook, initial_noise, scheduler_timesteps, traced_generate
from ..validate import NonFiniteError, check_guidance, check_int, check_prompts, check_seeds, check_steps
from .base import Composite, EditContext, Guidance, Intervention, LatentEdit, SiteEdit, flatten
from .blend import Blend, check_blend
from .guide import GuidePass
from .steer import Steer

__all__ = ["generate", "reprompt", "scheduler_timesteps"]


def generate(
    lens: Any,
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

    Returns:
        Dataset with ``image (prompt, seed, branch, y, x, rgb)`` float32 in [0, 1], branch
        ``["original", "edited"]`` (the original and the edited image; ``["original"]`` without
        edits), and with `record_gates` ``gate (prompt, seed, step, layer, row, col)`` (a leading
        ``steer`` dim when several edits record one); with blending, ``blend_mask (prompt, seed,
        blend_step, latent_y, latent_x)``, the mask m after every step. Attrs hold provenance and
        every setting (``edits``: each intervention's settings).
    """
    prompts, seeds = check_prompts(prompts), check_seeds(seeds)
    edits = _as_edits(edits, steer, blend)
    num_inference_steps, guidance_scale, batch_size = _validate(
        lens, edits, num_inference_steps, guidance_scale, record_gates, batch_size)
    branches = ["original", "edited"] if edits else ["original"]
    cells = [(p, s) for p in range(len(prompts)) for s in range(len(seeds))]
    per_call = batch_size or 4
    plan = _Plan(lens, edits, num_inference_steps, record_gates)

    height, width = lens.pipeline_kwargs["height"], lens.pipeline_kwargs["width"]
    images = np.zeros((len(prompts), len(seeds), len(branches), height, width, 3), np.float32)
    records: dict[str, np.ndarray] = {}

    chunks = [cells[i : i + per_call] for i in range(0, len(cells), per_call)]
    for chunk in tqdm(chunks, desc="generate", unit="batch", disable=not progress):
        row_prompts = [prompts[p] for p, _ in chunk for _ in branches]
        row_seeds = [seeds[s] for _, s in chunk for _ in branches]
        edited = [i * len(branches) + 1 for i in range(len(chunk))] if edits else []
        out_images, chunk_records = plan.run(row_prompts, row_seeds, edited, guidance_scale)
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
        timesteps = scheduler_timesteps(lens, num_inference_steps)
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
    lens: Any,
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
) -> xr.Dataset:
    """The re-prompting baseline as pairs: the `source` and `target` prompts from the same seed.

    Laid out like a `generate` result so the same metrics apply: branch ``"original"`` is the
    source prompt's image, ``"edited"`` the target prompt's (the counterfactual). Both come from
    one batched pass; `edits` act on the target branch as `generate` applies them to an edited one
    (e.g. `AttentionRegulation` to put the target's pathology in a region, `Confine` to keep the
    source image outside it), and `blend` too.

    Returns:
        Dataset with ``image (prompt, seed, branch, y, x, rgb)``, prompt ``[source]`` (and ``energy``
        when an edit corrects latents); attrs name the target prompt and every edit's settings.
    """
    check_prompts([source, target])  # two different strings
    seeds = check_seeds(seeds)
    edits = _as_edits(edits, None, blend)
    num_inference_steps, guidance_scale, batch_size = _validate(
        lens, edits, num_inference_steps, guidance_scale, False, batch_size, same_prompt_ok=True)
    plan = _Plan(lens, edits, num_inference_steps, False)
    height, width = lens.pipeline_kwargs["height"], lens.pipeline_kwargs["width"]
    images = np.zeros((1, len(seeds), 2, height, width, 3), np.float32)
    per_call = batch_size or 4
    chunks = [seeds[i : i + per_call] for i in range(0, len(seeds), per_call)]
    done, energy = 0, []
    for chunk in tqdm(chunks, desc="reprompt", unit="batch", disable=not progress):
        out, records = plan.run([source, target] * len(chunk), [s for s in chunk for _ in range(2)],
                                [2 * i + 1 for i in range(len(chunk))], guidance_scale)
        images[0, done : done + len(chunk)] = out.reshape(len(chunk), 2, height, width, 3)
        if "energy" in records:
            energy.append(records["energy"])  # (edits, pairs, guided steps)
        done += len(chunk)
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


class _Plan:
    """How a list of edits runs: one hook per site edit, one step-end pass for latent edits, and
    where their records go. The runner's half: the edits never see rows they do not edit."""

    def __init__(self, lens: Any, edits: Sequence[Intervention], T: int, record: bool) -> None:
        self.lens, self.T = lens, T
        self.edits = list(edits)
        self.record = record
        parts = flatten(edits)
        site_edits = [e for e in parts if isinstance(e, SiteEdit)]
        self.site_edits = [e for e in site_edits if not e.is_identity or (record and e.record)]
        self.latent_edits = [e for e in parts if isinstance(e, LatentEdit) and not e.is_identity]
        self.guides = [e for e in parts if isinstance(e, Guidance) and not e.is_identity]
        self._site_recorders = [e for e in site_edits if record and e.record]
        self.layers = sorted({l for e in self._site_recorders for l in e.edit_layers(lens)})
        self.steps = sorted({t for e in self._site_recorders for t in e.edit_steps(T)})
        self._latent_recorders = [e for e in self.latent_edits if e.record]
        self.guided_steps = sorted({t for g in self.guides for t in g.guided_steps(T)})

    def recording(self, name: str) -> list[Intervention]:
        return [e for e in self._site_recorders + self._latent_recorders if e.record == name]

    @staticmethod
    def names(edits: Sequence[Intervention]) -> list[str]:
        return [getattr(e, "name", "") or f"{type(e).__name__.lower()}{k}" for k, e in enumerate(edits)]

    def run(self, row_prompts: list[str], row_seeds: list[int], edited_rows: list[int],
            guidance_scale: float, *, latents: torch.Tensor | None = None, replay: torch.Tensor | None = None,
            scheduler: Any = None, output_type: str = "np", twin_rows: list[int] | None = None,
            seeded: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One pipeline call; row ``edited_rows[i]`` is edited, row ``edited_rows[i] - 1`` is its twin
        (or ``twin_rows[i]``; a row that is its own twin leaves the original branch out of the batch, for
        edits that never read it).

        `latents` start the rows instead of their seeds' noise; `replay` ``(steps, pairs, C, h, w)``
        sets the twins' latents after each step (an inverted trajectory replayed on the original
        branch); `scheduler` replaces the pipeline's for this call; `seeded=False` says the rows' seeds mean
        nothing (inverted images), so edits with one mask per seed refuse them. Returns the images
        ``(rows, H, W, 3)`` (with ``output_type="latent"`` the final latents) and each record
        ``(edits, pairs, ...)``.
        """
        n_rows, pairs = len(row_prompts), len(edited_rows)
        edited = torch.tensor(edited_rows, dtype=torch.long)
        twins = edited - 1 if twin_rows is None else torch.tensor(twin_rows, dtype=torch.long)
        guided = guidance_scale > 1
        step_index = {t: i for i, t in enumerate(self.steps)}
        layer_index = {l: j for j, l in enumerate(self.layers)}
        tokens = self.lens.token_grid[0] * self.lens.token_grid[1]
        gate_edits = self.recording("gate")
        gates = torch.zeros(len(gate_edits), pairs, len(self.steps), len(self.layers), tokens)
        pair_seeds = tuple(int(row_seeds[r]) for r in edited_rows) if seeded else ()
        pair_prompts = tuple(row_prompts[r] for r in edited_rows)

        def context(step: int, layer: int = -1, site: str = "", halves: tuple[str, ...] = ("cond",),
                    original: Any = None) -> EditContext:
            return EditContext(step, layer, site, halves, pairs, original=original, seeds=pair_seeds,
                               prompts=pair_prompts, num_inference_steps=self.T, lens=self.lens)

        def hook_for(edit: SiteEdit) -> Hook:
            halves = _halves(edit.halves, guided)
            blocks = [("uncond", "cond").index(h) if guided else 0 for h in halves]
            rows = torch.cat([edited + b * n_rows for b in blocks])
            twin_rows = torch.cat([twins + b * n_rows for b in blocks])
            slot = gate_edits.index(edit) if edit in gate_edits else None
            cond_block = halves.index("cond") if "cond" in halves else len(halves) - 1

            def visit(step: int, layer: int, h: torch.Tensor) -> torch.Tensor | None:
                ctx = context(step, layer, edit.site, halves, original=lambda: h[twin_rows])
                new, recorded = (None, None) if edit.is_identity and slot is None else edit.apply(h[rows], ctx)
                if edit.is_identity:
                    new = None  # strength zero: the run stays bit-identical, only the record is kept
                if slot is not None and recorded is not None:
                    part = recorded[cond_block * pairs : (cond_block + 1) * pairs]  # (pairs, tokens)
                    gates[slot, :, step_index[step], layer_index[layer]] = part.detach().float().cpu()
                if new is None:
                    return None
                out = h.clone()
                out[rows] = new
                return out

            return Hook(edit.site, tuple(edit.edit_layers(self.lens)), visit, frozenset(edit.edit_steps(self.T)))

        masks: list[list[torch.Tensor]] = [[] for _ in self._latent_recorders]
        energies: list[list[torch.Tensor]] = [[] for _ in self.guides]
        blending = bool(self.latent_edits and edited_rows)
        guide = GuidePass(self.lens, scheduler, pair_prompts, self.T, self.guides) if self.guides and edited_rows else None

        def correct(step: int, latents: torch.Tensor) -> None:  # before step `step`, in place
            for k, edit in enumerate(self.guides):
                if step in edit.guided_steps(self.T):
                    latents[edited], recorded = edit.correct(step, latents[edited], guide.forward(step),
                                                             context(step))
                    energies[k].append(recorded.float().cpu())

        def step_end(step: int, latents: torch.Tensor) -> None:  # latents (rows, C, H, W), edited in place
            if replay is not None:
                latents[twins] = replay[step].to(latents.dtype)
            if blending:
                for edit in self.latent_edits:
                    latents[edited], recorded = edit.apply_latents(step, latents[twins], latents[edited], context(step))
                    if edit in self._latent_recorders and recorded is not None:
                        masks[self._latent_recorders.index(edit)].append(recorded.detach().float().cpu())
            if guide is not None and step + 1 < self.T:
                correct(step + 1, latents)
            if not bool(torch.isfinite(latents).all()):  # one reduction per step: cheap next to the step
                self.refuse_non_finite(f"the latents after step {step} of {self.T}", torch.isfinite(
                    latents.flatten(1)).all(1).cpu().numpy(), edited_rows, guidance_scale)

        starting = [e for e in self.latent_edits if e.changes_initial] if edited_rows else []
        guide_first = guide is not None and 0 in self.guided_steps  # the first correction acts on z_T
        if starting or guide_first:  # z_T is edited: only then are the seeds' noises drawn here
            latents = initial_noise(self.lens, row_seeds) if latents is None else latents.clone()
        for edit in starting:  # latent drifting
            latents[edited] = edit.apply_initial(latents[edited], context(0))
        with guide.exposed() if guide is not None else nullcontext():
            if guide_first:
                correct(0, latents)
            result = traced_generate(
                self.lens, row_prompts, row_seeds, num_inference_steps=self.T, guidance_scale=guidance_scale,
                hooks=[hook_for(e) for e in self.site_edits], output_type=output_type, step_end=step_end,
                latents=latents, scheduler=scheduler,
            )
        images = result.images  # (rows, H, W, 3), or latents (rows, C, h, w)
        images = images.float().cpu().numpy() if isinstance(images, torch.Tensor) else images.astype(np.float32)
        if not np.isfinite(images).all():
            self.refuse_non_finite("the decoded images", np.isfinite(images.reshape(n_rows, -1)).all(1),
                                   edited_rows, guidance_scale)
        records: dict[str, np.ndarray] = {}
        if gate_edits:
            records["gate"] = gates.numpy()
        if self._latent_recorders and edited_rows:
            records["blend_mask"] = torch.stack([torch.stack(m, dim=1) for m in masks]).numpy()  # (edits, pairs, steps, H, W)
        if self.guides and edited_rows:
            steps = self.guided_steps
            energy = torch.full((len(self.guides), pairs, len(steps)), float("nan"))
            for k, edit in enumerate(self.guides):
                for values, step in zip(energies[k], edit.guided_steps(self.T)):
                    energy[k, :, steps.index(step)] = values
            records["energy"] = energy.numpy()  # (edits, pairs, guided steps)
        return images, records

    def refuse_non_finite(self, what: str, finite_rows: np.ndarray, edited_rows: list[int],
                          guidance_scale: float) -> None:
        """Raise `NonFiniteError` for NaN/inf in `what`, naming the settings that caused it."""
        bad = [int(i) for i in np.flatnonzero(~finite_rows)]
        if bad and set(bad) <= set(edited_rows):
            settings = ", ".join(repr(e) for e in self.edits)
            raise NonFiniteError(
                f"{what} hold NaN or inf in the edited branch only: the edits are too strong for this model "
                f"({settings}); lower the strength (e.g. Steer alpha) and run again. No result was kept."
            )
        raise NonFiniteError(
            f"{what} hold NaN or inf in the unedited run itself (guidance_scale={guidance_scale:g}, "
            f"{self.T} steps): the model or its settings diverge; check the weights, dtype and guidance_scale. "
            f"No result was kept."
        )


def _halves(halves: str, guided: bool) -> tuple[str, ...]:
    if not guided:
        if halves == "uncond":
            raise ValueError("halves='uncond' needs classifier-free guidance (guidance_scale > 1)")
        return ("cond",)
    return {"both": ("uncond", "cond"), "cond": ("cond",), "uncond": ("uncond",)}[halves]


def _add_record(data: dict, coords: dict, name: str, dims: tuple, values: np.ndarray, labels: list[str]) -> None:
    if len(labels) == 1:
        data[name] = (dims, values[0])
    else:
        dim = "steer" if name == "gate" else f"{name}_edit"
        coords[dim] = labels
        data[name] = ((dim,) + dims, values)


def _as_edits(edits: Any, steer: Any, blend: float) -> list[Intervention]:
    steers = [] if steer is None else [steer] if isinstance(steer, Steer) else list(steer)
    for st in steers:
        if not isinstance(st, Steer):
            raise TypeError(f"steer= takes Steer values (or a list of them), got {type(st).__name__}")
    given = [] if edits is None else [edits] if isinstance(edits, Intervention) else list(edits)
    for edit in given:
        if not isinstance(edit, (SiteEdit, LatentEdit, Guidance, Composite)):
            raise TypeError(f"edits= takes interventions (Steer, Reweight, AttentionRegulation, Blend, ...), "
                            f"got {type(edit).__name__}")
    threshold = check_blend(blend)
    return steers + given + ([Blend(threshold)] if threshold else [])


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
