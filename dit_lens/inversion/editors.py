"""`edit`: counterfactuals of given images by inversion-based editors, laid out as (original, edited) pairs.

Every editor starts from the images' DDIM inversion under the source prompt (`invert`) and denoises
with the same DDIM sampler:

- ``"pnp"`` (Plug-and-Play, ported to DiTs): a source branch replays the inverted trajectory level by
  level, and for the first τ_f of the steps its block outputs, and for the first τ_A its
  self-attention weights, are injected into the edited branch (`dit_lens.interventions.inject.Inject`)
  at chosen layers; the edited branch denoises under the target prompt. Runs through the pipeline's
  own nnsight-hooked loop, with the same site and attention-weight edits as everything else.
- ``"hedit"`` (h-Edit, deterministic variant h-Edit-D, implicit form): the reconstruction path keeps
  the inversion residual u_t; at each step the edit adds c_t·(ε̂_tar − ε̂_src) evaluated at the new
  latent, `iterations` times. Its update needs predictions at two timesteps per step, which the
  pipeline's loop does not make, so it calls the denoiser directly (`GuidedDenoiser`); it has no site edits.
- ``"reprompt"``: regenerate the inverted noise under the target prompt.
- ``"medsteer"``: regenerate the inverted noise under the source prompt with a `Steer` (and any other
  interventions in ``edits``).

Examples:
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> images = np.full((1, 16, 16, 3), 0.5, np.float32)
    >>> out = edit(lens, images, source="a polyp", target="a normal cecum", method="pnp",
    ...            num_inference_steps=3, progress=False)
    >>> dict(out["image"].sizes), out["branch"].values.tolist()
    ({'prompt': 1, 'seed': 1, 'branch': 2, 'y': 16, 'x': 16, 'rgb': 3}, ['original', 'edited'])
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Sequence

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from ..interventions.base import Intervention, SiteEdit
from ..interventions.plan import Plan, as_edits
from ..interventions.inject import Inject
from ..model.lens import Lens
from ..trace.attrs import typed
from ..validate import NonFiniteError, check_fraction, check_guidance, check_int, check_real, check_seeds
from ..sampling.ddim import GuidedDenoiser, alpha_bars, ddim_move, inversion_scheduler, to_epsilon
from ..sampling.images import check_images, decode
from .trajectory import check_trajectory, invert

__all__ = ["EDITORS", "HEdit", "PnP", "edit"]


def _layers(name: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, numbers.Integral) else tuple(value)
    if not values or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{name} must be block indices >= 0 (or None for all), got {value!r}")
    return tuple(sorted({int(v) for v in values}))


@dataclass(frozen=True)
class PnP:
    """Plug-and-Play feature and self-attention injection from the replayed source branch.

    Attributes:
        feature_fraction: τ_f, the fraction of the steps (from the start) whose block outputs are injected.
        attention_fraction: τ_A, the same for the self-attention weights.
        feature_layers: Blocks whose outputs are injected (``None``: the first half of the depth).
        attention_layers: Blocks whose self-attention weights are injected (``None``: all).

    A DiT block's output *is* the residual stream, so injecting it at blocks a…b is injecting it at b
    alone, and injecting it at the last block hands the edited branch the source's prediction
    outright (an exact reconstruction for those steps). Where to inject is therefore a depth; the
    default, the first half, was measured by a sweep on the embedded world (`studies/concept_pairs.py
    --methods pnp --feature-windows ...`), since DiT blocks do not map onto the UNet decoder layers
    PnP was published on.
    """

    feature_fraction: float = 0.8
    attention_fraction: float = 0.5
    feature_layers: tuple[int, ...] | None = None
    attention_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_fraction", check_fraction(self.feature_fraction, "PnP.feature_fraction"))
        object.__setattr__(self, "attention_fraction", check_fraction(self.attention_fraction, "PnP.attention_fraction"))
        object.__setattr__(self, "feature_layers", _layers("PnP.feature_layers", self.feature_layers))
        object.__setattr__(self, "attention_layers", _layers("PnP.attention_layers", self.attention_layers))

    def interventions(self, T: int, num_layers: int, family: Any = None) -> list[Inject]:
        """The two injections for a run of T steps (the first ⌊τ·T⌋ steps each) on a model of `num_layers` blocks
        (of `family`: one without softmax self-attention weights is refused unless ``attention_fraction=0``)."""
        features = self.feature_layers if self.feature_layers is not None else tuple(range(max(1, num_layers // 2)))
        out = [Inject("block", features, tuple(range(math.floor(self.feature_fraction * T))))]
        if self.attention_fraction > 0:
            if family is not None and "attn1.weights" not in family.sites:
                raise ValueError(f"PnP injects the self-attention weights (attn1.weights), which {family.label or family.name} "
                                 f"does not expose (its self-attention is linear or joint); pass attention_fraction=0 "
                                 f"to inject the block features alone")
            out.append(Inject("attn1.weights", self.attention_layers, tuple(range(math.floor(self.attention_fraction * T)))))
        return out


@dataclass(frozen=True)
class HEdit:
    """h-Edit-D (deterministic, implicit form): reconstruction by the inversion residual plus an editing term.

    Attributes:
        source_guidance: ŵ_orig, the guidance of the source prediction in the editing term (``None``:
            the target's guidance w_edit, which is `edit`'s ``guidance_scale``; its authors advise keeping
            the two close, and on the embedded world ŵ_orig = w_edit flipped most: 0.875 vs 0.812 at
            3.0 and 0.250 at 1.0, polyps → normal cecum, 16 pairs, skip 0.3).
        base_guidance: The guidance of the reconstruction path's source prediction (published: 1).
        iterations: K, editing iterations per step at the new latent.
        skip: Fraction of the first steps left unedited (the run starts from the inverted latent there).
        weight_reconstruction: Pull toward the reconstruction in iterations after the first.

    After skipped steps the run starts from the inverted latent as it is (the published implicit form
    also applies one editing correction to that latent first; dit-lens does not).
    """

    source_guidance: float | None = None
    base_guidance: float = 1.0
    iterations: int = 1
    skip: float = 0.3
    weight_reconstruction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("source_guidance", "base_guidance"):
            if getattr(self, name) is not None or name == "base_guidance":
                object.__setattr__(self, name, check_guidance(getattr(self, name), name=f"HEdit.{name}"))
        object.__setattr__(self, "iterations", check_int(self.iterations, "HEdit.iterations", minimum=1))
        object.__setattr__(self, "skip", check_fraction(self.skip, "HEdit.skip"))
        object.__setattr__(self, "weight_reconstruction",
                           check_real(self.weight_reconstruction, "HEdit.weight_reconstruction", minimum=0))


#: The editors `edit` runs, by name.
EDITORS = ("pnp", "hedit", "reprompt", "medsteer")


def edit(
    lens: Lens,
    images: Any,
    *,
    source: str,
    target: str | None = None,
    method: str = "pnp",
    num_inference_steps: int = 50,
    guidance_scale: float = 4.5,
    inversion_guidance: float = 1.0,
    refine: int = 0,
    trajectory: xr.Dataset | None = None,
    edits: Intervention | Sequence[Intervention] | None = None,
    steer: Any = None,
    batch_size: int = 8,
    progress: bool = True,
    seeds: Sequence[int] | None = None,
    **settings: Any,
) -> xr.Dataset:
    """Make the counterfactual of each image: invert it under `source`, then edit toward `target`.

    Args:
        lens: From `dit_lens.load`.
        images: ``(n, H, W, 3)`` RGB at the model's size, float in [0, 1] or uint8.
        source: The prompt that describes the images (inverted under).
        target: The counterfactual's prompt (``"pnp"``, ``"hedit"``, ``"reprompt"``).
        method: One of `EDITORS`.
        num_inference_steps: DDIM steps T of the inversion and the edit.
        guidance_scale: Classifier-free guidance of the edited branch (h-Edit: w_edit).
        inversion_guidance: Guidance while inverting (1: conditional only).
        refine: Fixed-point iterations per inversion step (0: plain DDIM inversion, as published).
        trajectory: An inversion of these images from `invert` to reuse (skips inverting again).
        edits: ``"medsteer"`` (and ``"reprompt"``): interventions on the edited branch.
        steer: ``"medsteer"``: the `Steer` (shorthand put before `edits`).
        batch_size: Images per call.
        progress: Show progress bars.
        seeds: The ``seed`` label of each image's pair (default 0 … N − 1): the seeds that made
            generated images, or any distinct numbers for your own.
        **settings: The editor's own: `PnP` or `HEdit` fields.

    Returns:
        Dataset with ``image (prompt, seed, branch, y, x, rgb)``, the layout `dit_lens.generate` and
        `dit_lens.metrics.as_pairs` give, so every metric and figure reads it: ``prompt`` is
        `source`, branch ``["original", "edited"]`` (the input and its counterfactual); attrs hold the
        method, every setting, both prompts and provenance.
    """
    if method not in EDITORS:
        raise ValueError(f"unknown editor {method!r}; choose one of {list(EDITORS)}")
    if method == "hedit":
        lens.family.needs("h-Edit (its update is derived for DDPM noise schedules)")
    images = check_images(images, lens)
    if method in ("pnp", "hedit", "reprompt"):
        if not isinstance(target, str) or not target:
            raise ValueError(f"method {method!r} needs a target prompt")
        if target == source and method != "hedit":
            raise ValueError("target is the source prompt: nothing to edit toward")
    labels = list(range(len(images))) if seeds is None else check_seeds(seeds)
    if len(labels) != len(images):
        raise ValueError(f"seeds labels each image's pair: {len(images)} images need {len(images)} seeds, got "
                         f"{len(labels)}")
    T = check_int(num_inference_steps, "num_inference_steps", minimum=1)
    guidance = check_guidance(guidance_scale)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    interventions = as_edits(edits, steer, 0.0)
    if method == "medsteer" and not any(isinstance(e, SiteEdit) for e in interventions):
        raise ValueError("method 'medsteer' needs steer=Steer(...) (or site edits in edits=)")
    if method in ("pnp", "hedit") and interventions:
        raise ValueError(f"method {method!r} takes its own settings, not edits=/steer=")
    config = {"pnp": PnP, "hedit": HEdit}.get(method)
    if config is None and settings:
        raise ValueError(f"method {method!r} has no settings {sorted(settings)}")
    editor = config(**settings) if config else None
    if trajectory is None:
        trajectory = invert(lens, images, source, num_inference_steps=T, guidance_scale=inversion_guidance,
                            refine=refine, batch_size=batch_size, progress=progress)
    else:
        check_trajectory(lens, trajectory)
        if int(trajectory.attrs["num_inference_steps"]) != T or trajectory.sizes["item"] != len(images):
            raise ValueError(f"the trajectory holds {trajectory.sizes['item']} images over "
                             f"{trajectory.attrs['num_inference_steps']} steps; this edit asks {len(images)} over {T}")
        if trajectory.attrs["prompt"] != source:
            raise ValueError(f"the trajectory was inverted under {trajectory.attrs['prompt']!r}, not the source prompt "
                             f"{source!r}; invert under the source prompt or pass source={trajectory.attrs['prompt']!r}")
        if not np.array_equal(trajectory["input"].values, images):
            raise ValueError("the trajectory was inverted from other images than the ones given; pass the same images")
    for e in interventions:
        e.check(lens, T)

    latents = torch.from_numpy(trajectory["latent"].values.copy())  # (n, T + 1, C, h, w)
    ddim = inversion_scheduler(lens, T)  # DDIM, or the flow-matching Euler sampler
    if method == "hedit":
        denoiser = GuidedDenoiser(lens, [source, target], ddim.config.prediction_type)
        run = partial(_hedit, denoiser, ddim, cfg=editor, w_edit=guidance, T=T)
    else:
        extra = editor.interventions(T, lens.num_layers, lens.family) if method == "pnp" else interventions
        plan = Plan(lens, list(extra), T, False)
        prompt = source if method == "medsteer" else target
        run = partial(_through_pipeline, plan, ddim, replay_prompt=trajectory.attrs["prompt"], prompt=prompt,
                      guidance=guidance)
    chunks = range(0, len(images), batch_size)
    edited = [run(latents[start : start + batch_size])
              for start in tqdm(chunks, desc=f"edit ({method})", unit="batch", disable=not progress)]
    out_images = decode(lens, torch.cat(edited))
    if not np.isfinite(out_images).all():
        raise NonFiniteError(f"the edited images hold NaN or inf ({method}, {settings}); no result was kept")
    pairs = np.stack([images, out_images], axis=1)[None]  # (1, N, 2, H, W, 3)
    ds = xr.Dataset({"image": (("prompt", "seed", "branch", "y", "x", "rgb"), pairs)},
                    coords={"prompt": [source], "seed": labels, "branch": ["original", "edited"]})
    ds.attrs.update(lens.provenance())
    ds.attrs.update(method=method, source_prompt=source, target_prompt=target or "", num_inference_steps=T,
                    guidance_scale=guidance, inversion_guidance=float(trajectory.attrs["guidance_scale"]),
                    refine=int(trajectory.attrs.get("refine", 0)), sampler=trajectory.attrs["sampler"],
                    settings=typed(_resolved(editor, guidance)),
                    edits=typed([e.settings() for e in interventions]))
    return ds


def _resolved(editor: PnP | HEdit | None, guidance: float) -> dict:
    """The editor's settings as they ran (h-Edit's ŵ_orig defaults to the edit's guidance)."""
    if editor is None:
        return {}
    settings = asdict(editor)
    if isinstance(editor, HEdit) and editor.source_guidance is None:
        settings["source_guidance"] = guidance
    return settings


def _through_pipeline(plan: Plan, ddim: Any, latents: torch.Tensor, replay_prompt: str, prompt: str,
                      guidance: float) -> torch.Tensor:
    """Rows [source branch, edited branch] per image through the pipeline's hooked loop: both start at the
    inverted noise; the source branch replays the trajectory; returns the edited rows' final latents.
    When no edit reads the source branch (re-prompting, steering), only the edited rows run."""
    n = latents.shape[0]
    if not any(e.reads_original and not e.is_identity for e in plan.edits):  # no source branch needed
        final, _ = plan.run([prompt] * n, [0] * n, list(range(n)), guidance, latents=latents[:, 0].clone(),
                            scheduler=ddim, output_type="latent", twin_rows=list(range(n)), seeded=False)
        return torch.from_numpy(final)
    start = latents[:, 0].repeat_interleave(2, dim=0)  # (2n, C, h, w)
    replay = latents[:, 1:].transpose(0, 1)  # (T, n, C, h, w): the level after each step
    final, _ = plan.run([replay_prompt, prompt] * n, [0] * (2 * n), [2 * i + 1 for i in range(n)], guidance,
                        latents=start, replay=replay, scheduler=ddim, output_type="latent", seeded=False)
    return torch.from_numpy(final[1::2])


@torch.no_grad()
def _hedit(denoiser: GuidedDenoiser, ddim: Any, latents: torch.Tensor, cfg: HEdit, w_edit: float, T: int) -> torch.Tensor:
    """h-Edit-D on one chunk: `latents` ``(n, T + 1, C, h, w)`` is the inverted trajectory; the denoiser's
    prompts are ``[source, target]``."""
    levels = alpha_bars(ddim).tolist()
    cumprod = ddim.alphas_cumprod.double()
    n = latents.shape[0]
    traj = latents.double()
    first = min(round(cfg.skip * T), T)
    w_source = w_edit if cfg.source_guidance is None else cfg.source_guidance
    x = traj[:, first].clone()

    def rms(v: torch.Tensor) -> torch.Tensor:
        return v.pow(2).flatten(1).mean(1).sqrt().view(-1, 1, 1, 1)

    for i in range(first, T):
        t, a, a_next = int(ddim.timesteps[i]), levels[i], levels[i + 1]
        eps = denoiser.epsilon(torch.cat([traj[:, i], x]), t, 0, cfg.base_guidance, a)  # source prediction on both paths
        residual = traj[:, i + 1] - ddim_move(traj[:, i], eps[:n], a, a_next)  # u_t: what the DDIM step misses
        base = ddim_move(x, eps[n:], a, a_next) + residual
        t_next = int(ddim.timesteps[i + 1]) if i + 1 < T else 0
        a_eval = float(cumprod[t_next])
        coeff = (1 - a_next) ** 0.5 - (1 - a) ** 0.5 * (a_next / a) ** 0.5  # c_t of the deterministic case
        x = base
        for k in range(cfg.iterations):
            raw = denoiser.raw(torch.cat([x, x, x]).float(), t_next, [None] * n + [0] * n + [1] * n).double()
            null, src, tar = (to_epsilon(r, x, a_eval, denoiser.prediction_type) for r in raw.chunk(3))
            correction = (null + w_edit * (tar - null)) - (null + w_source * (src - null))
            rec = x
            if k > 0 and cfg.weight_reconstruction > 0:  # pull back toward the reconstruction (L1 gradient)
                grad = torch.sign(x - base) / x[0].numel()
                rho = rms(correction) / (rms(grad) + 1e-8) * cfg.weight_reconstruction
                rec = x - rho * grad
            x = rec + coeff * correction
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteError(f"h-Edit diverged (NaN or inf) at step {i} of {T} ({cfg}); lower guidance_scale "
                                 f"or source_guidance")
    return x.float()
