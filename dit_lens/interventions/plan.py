"""The runner's half of an edited run: `Plan` turns a list of interventions into hooks on the traced
pipeline call, a step-end pass for latent edits and latent corrections before chosen steps, and the
records they return (gates, blend masks, energies). Rows are laid out in (twin, edited) pairs; an edit
sees only its edited rows, and its twin's output through ``EditContext.original``.

`dit_lens.interventions.generate` and the inversion editors both run through it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..model.lens import Lens
from ..trace.runner import Hook, initial_noise, traced_generate
from ..validate import NonFiniteError
from .base import Composite, EditContext, Guidance, Intervention, LatentEdit, SiteEdit, flatten
from .blend import Blend, check_blend
from .guide import GuidePass
from .steer import Steer

__all__ = ["Plan", "Rows", "StepEnd", "as_edits"]


class Plan:
    """How a list of edits runs: one hook per site edit, one step-end pass for latent edits, and
    where their records go. The runner's half: the edits never see rows they do not edit."""

    def __init__(self, lens: Lens, edits: Sequence[Intervention], T: int, record: bool) -> None:
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
            seeded: bool = True, hooks: Sequence[Hook] = ()) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One pipeline call; row ``edited_rows[i]`` is edited, row ``edited_rows[i] - 1`` is its twin
        (or ``twin_rows[i]``; a row that is its own twin leaves the original branch out of the batch, for
        edits that never read it).

        `latents` start the rows instead of their seeds' noise; `replay` ``(steps, pairs, C, h, w)``
        sets the twins' latents after each step (an inverted trajectory replayed on the original
        branch); `scheduler` replaces the pipeline's for this call; `seeded=False` says the rows' seeds mean
        nothing (inverted images), so edits with one mask per seed refuse them; `hooks` are read after the
        edits at each site (a readout of the edited run). Returns the images
        ``(rows, H, W, 3)`` (with ``output_type="latent"`` the final latents) and each record
        ``(edits, pairs, ...)``.

        Three parts: the row layout (`Rows`), one hook per site edit (`site_hooks`), and the pass at each
        step's end (`StepEnd`: latent edits, replayed twins, guidance corrections, the finiteness check).
        """
        rows = Rows.layout(self, row_prompts, row_seeds, edited_rows, twin_rows, guidance_scale, seeded)
        gates = self.gate_buffer(rows)
        guide = (GuidePass(self.lens, scheduler, rows.pair_prompts, self.T, self.guides, guidance_scale)
                 if self.guides and edited_rows else None)
        step_end = StepEnd(self, rows, replay, guide, guidance_scale)
        starting = [e for e in self.latent_edits if e.changes_initial] if edited_rows else []
        guide_first = guide is not None and 0 in self.guided_steps  # the first correction acts on z_T
        if starting or guide_first:  # z_T is edited: only then are the seeds' noises drawn here
            latents = initial_noise(self.lens, row_seeds) if latents is None else latents.clone()
        for edit in starting:  # latent drifting
            latents[rows.edited] = edit.apply_initial(latents[rows.edited], rows.context(0))
        with guide.exposed() if guide is not None else nullcontext():
            if guide_first:
                step_end.correct(0, latents)
            result = traced_generate(
                self.lens, row_prompts, row_seeds, num_inference_steps=self.T, guidance_scale=guidance_scale,
                hooks=self.site_hooks(rows, gates) + list(hooks), output_type=output_type,
                step_end=step_end, latents=latents, scheduler=scheduler,
            )
        images = result.images  # (rows, H, W, 3), or latents (rows, C, h, w)
        images = images.float().cpu().numpy() if isinstance(images, torch.Tensor) else images.astype(np.float32)
        if not np.isfinite(images).all():
            self.refuse_non_finite("the decoded images", np.isfinite(images.reshape(rows.n, -1)).all(1),
                                   edited_rows, guidance_scale)
        records = {"gate": gates.numpy()} if self.recording("gate") else {}
        records.update(step_end.records())
        return images, records

    def gate_buffer(self, rows: "Rows") -> torch.Tensor:
        """``(gate edits, pairs, steps, layers, tokens)`` zeros for the gates the site edits record."""
        tokens = self.lens.token_grid[0] * self.lens.token_grid[1]
        return torch.zeros(len(self.recording("gate")), rows.pairs, len(self.steps), len(self.layers), tokens)

    def site_hooks(self, rows: "Rows", gates: torch.Tensor) -> list[Hook]:
        """One `Hook` per site edit: it edits the edit's rows (its guidance halves) and records its gates."""
        gate_edits = self.recording("gate")
        step_index = {t: i for i, t in enumerate(self.steps)}
        layer_index = {l: j for j, l in enumerate(self.layers)}

        def hook_for(edit: SiteEdit) -> Hook:
            halves = _halves(edit.halves, rows.guided)
            edit_rows, twin_rows = rows.of(halves)
            slot = gate_edits.index(edit) if edit in gate_edits else None
            cond_block = halves.index("cond") if "cond" in halves else len(halves) - 1

            def visit(step: int, layer: int, h: torch.Tensor) -> torch.Tensor | None:
                ctx = rows.context(step, layer, edit.site, halves, original=lambda: h[twin_rows])
                new, recorded = (None, None) if edit.is_identity and slot is None else edit.apply(h[edit_rows], ctx)
                if edit.is_identity:
                    new = None  # strength zero: the run stays bit-identical, only the record is kept
                if slot is not None and recorded is not None:
                    part = recorded[cond_block * rows.pairs : (cond_block + 1) * rows.pairs]  # (pairs, tokens)
                    gates[slot, :, step_index[step], layer_index[layer]] = part.detach().float().cpu()
                if new is None:
                    return None
                out = h.clone()
                out[edit_rows] = new
                return out

            return Hook(edit.site, tuple(edit.edit_layers(self.lens)), visit, frozenset(edit.edit_steps(self.T)))

        return [hook_for(e) for e in self.site_edits]

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


@dataclass(frozen=True)
class Rows:
    """The row layout of one pipeline call: which rows are edited and which is each one's twin.

    Attributes:
        n: Rows in the call (per guidance half).
        edited: Edited rows ``(pairs,)``.
        twins: Each edited row's twin (its unedited original) ``(pairs,)``.
        guided: Whether the batch holds an unconditional half before the conditional one (then rows
            ``n..2n-1`` of the batch are the conditional rows).
        pair_seeds: The edited rows' seeds (empty when the rows' seeds mean nothing).
        pair_prompts: The edited rows' prompts.
        lens: The lens.
        T: Steps of the run.
    """

    n: int
    edited: torch.Tensor
    twins: torch.Tensor
    guided: bool
    pair_seeds: tuple[int, ...]
    pair_prompts: tuple[str, ...]
    lens: Lens
    T: int

    @classmethod
    def layout(cls, plan: Plan, row_prompts: list[str], row_seeds: list[int], edited_rows: list[int],
               twin_rows: list[int] | None, guidance_scale: float, seeded: bool) -> "Rows":
        edited = torch.tensor(edited_rows, dtype=torch.long)
        twins = edited - 1 if twin_rows is None else torch.tensor(twin_rows, dtype=torch.long)
        return cls(len(row_prompts), edited, twins, plan.lens.guided(guidance_scale),
                   tuple(int(row_seeds[r]) for r in edited_rows) if seeded else (),
                   tuple(row_prompts[r] for r in edited_rows), plan.lens, plan.T)

    @property
    def pairs(self) -> int:
        return len(self.edited)

    def of(self, halves: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The edited rows and their twins in the batch of the given guidance halves (uncond rows first)."""
        blocks = [("uncond", "cond").index(h) if self.guided else 0 for h in halves]
        return (torch.cat([self.edited + b * self.n for b in blocks]),
                torch.cat([self.twins + b * self.n for b in blocks]))

    def context(self, step: int, layer: int = -1, site: str = "", halves: tuple[str, ...] = ("cond",),
                original: Any = None) -> EditContext:
        return EditContext(step, layer, site, halves, self.pairs, original=original, seeds=self.pair_seeds,
                           prompts=self.pair_prompts, num_inference_steps=self.T, lens=self.lens)


class StepEnd:
    """The pass at the end of each step, on the latents in place: replayed twins, latent edits (and their
    masks), the guidance correction before the next step (and its energies), and the finiteness check."""

    def __init__(self, plan: Plan, rows: Rows, replay: torch.Tensor | None, guide: GuidePass | None,
                 guidance_scale: float) -> None:
        self.plan, self.rows, self.replay, self.guide = plan, rows, replay, guide
        self.guidance_scale = guidance_scale
        self.blending = bool(plan.latent_edits and rows.pairs)
        self.masks: list[list[torch.Tensor]] = [[] for _ in plan._latent_recorders]
        self.energies: list[list[torch.Tensor]] = [[] for _ in plan.guides]

    def correct(self, step: int, latents: torch.Tensor) -> None:  # before step `step`, in place
        plan, edited = self.plan, self.rows.edited
        for k, edit in enumerate(plan.guides):
            if step in edit.guided_steps(plan.T):
                latents[edited], recorded = edit.correct(step, latents[edited], self.guide.forward(step),
                                                         self.rows.context(step))
                self.energies[k].append(recorded.float().cpu())

    def __call__(self, step: int, latents: torch.Tensor) -> None:  # latents (rows, C, H, W), edited in place
        plan, rows = self.plan, self.rows
        if self.replay is not None:
            latents[rows.twins] = self.replay[step].to(latents.dtype)
        if self.blending:
            for edit in plan.latent_edits:
                latents[rows.edited], recorded = edit.apply_latents(step, latents[rows.twins], latents[rows.edited],
                                                                    rows.context(step))
                if edit in plan._latent_recorders and recorded is not None:
                    self.masks[plan._latent_recorders.index(edit)].append(recorded.detach().float().cpu())
        if self.guide is not None and step + 1 < plan.T:
            self.correct(step + 1, latents)
        if not bool(torch.isfinite(latents).all()):  # one reduction per step: cheap next to the step
            plan.refuse_non_finite(f"the latents after step {step} of {plan.T}", torch.isfinite(
                latents.flatten(1)).all(1).cpu().numpy(), rows.edited.tolist(), self.guidance_scale)

    def records(self) -> dict[str, np.ndarray]:
        """The blend masks ``(edits, pairs, steps, H, W)`` and energies ``(edits, pairs, guided steps)``."""
        plan, records = self.plan, {}
        if plan._latent_recorders and self.rows.pairs:
            records["blend_mask"] = torch.stack([torch.stack(m, dim=1) for m in self.masks]).numpy()
        if plan.guides and self.rows.pairs:
            steps = plan.guided_steps
            energy = torch.full((len(plan.guides), self.rows.pairs, len(steps)), float("nan"))
            for k, edit in enumerate(plan.guides):
                for values, step in zip(self.energies[k], edit.guided_steps(plan.T)):
                    energy[k, :, steps.index(step)] = values
            records["energy"] = energy.numpy()
        return records


def _halves(halves: str, guided: bool) -> tuple[str, ...]:
    if not guided:
        if halves == "uncond":
            raise ValueError("halves='uncond' needs classifier-free guidance (guidance_scale > 1, on a family that "
                             "runs an unconditional batch; guidance-distilled Flux has none)")
        return ("cond",)
    return {"both": ("uncond", "cond"), "cond": ("cond",), "uncond": ("uncond",)}[halves]


def as_edits(edits: Any, steer: Any, blend: float) -> list[Intervention]:
    """The edits of a run as one list: the `steer` values, then `edits`, then a `Blend` at `blend` (if > 0)."""
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
