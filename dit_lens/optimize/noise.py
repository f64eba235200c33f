"""Initial-noise optimisation: per seed, a z_T near the seed's own noise that the objective likes better.

A fine-tuned model may generate a rare class unreliably: some seeds give the prompted lesion, others a
look-alike. `optimize_noise` moves each seed's initial noise ε along the gradient of an objective of the
generated image (`class_probability`: the oracle's log-probability of the prompted class) and returns
an `OptimizedNoise`, a latent edit that starts the edited branch of `generate` from the optimised noise
while its original twin starts from ε. How it works:

- **Differentiable sampling.** The pipeline's own loop, rewritten in torch
  (`dit_lens.sampling.DifferentiableSampler`): its transformer, a copy of its sampler at `grad_steps`
  steps, classifier-free guidance as the pipeline does it, the VAE decode and postprocess.
  With ``grad_steps = num_inference_steps`` (the default) it is the very run `generate` makes (same
  images up to batching rounding), so what was optimised is what comes out; fewer steps are cheaper but
  only approximate it (a seed the short run judges fixed may not be on the real one). Each
  transformer call is checkpointed (by default), so memory holds one step's activations. Gradients are
  taken with respect to the noise only: the model's weights are in eval mode with ``requires_grad=False``
  for the call and put back afterwards, also on error.
- **Plausibility.** A sample of N(0, I) in D dimensions lies near the sphere of radius √D and points in
  no special direction. Each seed's noise is kept on the sphere of its own draw, ‖z‖ = ‖ε‖: every
  iteration rotates z by `lr` radians along the tangent part of the gradient (a geodesic step, so the
  gradient's size does not matter), and never farther than `max_angle` radians from ε (a trust region:
  cos(z, ε) ≥ cos(max_angle)). The best iterate seen is kept; with a `target` a seed stops once reached.
  `OptimizedNoise.report` measures the result per seed: norm ratio, cosine to ε, a Kolmogorov-Smirnov
  test of the entries against N(0, 1), their mean, std and neighbour correlation.

Examples:
    >>> from dit_lens import load, generate
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=1)))
    >>> def brightness(images):  # (N, 3, H, W) in [0, 1] -> (N,)
    ...     return images.mean(dim=(1, 2, 3))
    >>> z = optimize_noise(lens, "a polyp", seeds=[0, 1], objective=brightness, iterations=3,
    ...                    num_inference_steps=2, progress=False)
    >>> z
    OptimizedNoise('a polyp', seeds=[0, 1], objective=brightness, 3 iterations)
    >>> report = z.report()  # per seed; the objective is measured on the differentiable run
    >>> bool((report["after"] > report["before"]).all()), [round(float(r), 5) for r in report["norm_ratio"]]
    (True, [1.0, 1.0])
    >>> out = generate(lens, "a polyp", seeds=[0, 1], edits=[z], num_inference_steps=2, progress=False)
    >>> image = out["image"].sel(prompt="a polyp")  # original: from each seed's noise; edited: from z
    >>> bool(image.sel(branch="edited").mean() > image.sel(branch="original").mean())
    True
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..interventions.noise_edit import OptimizedNoise
from ..model.lens import Lens
from ..sampling.loop import DifferentiableSampler, frozen
from ..trace.attention import exposed_weights
from ..trace.runner import initial_noise
from ..validate import NonFiniteError, check_guidance, check_int, check_seeds, check_steps, is_real
__all__ = ["optimize_noise"]

#: An objective: images ``(N, 3, H, W)`` float in [0, 1] (as `generate` returns them) -> scores ``(N,)``
#: to maximise, differentiable in torch.
Objective = Callable[[torch.Tensor], torch.Tensor]


def optimize_noise(
    lens: Lens,
    prompt: str,
    *,
    seeds: Sequence[int],
    objective: Objective,
    iterations: int = 20,
    lr: float = 0.05,
    max_angle: float | None = 0.25,
    target: float | None = None,
    num_inference_steps: int = 20,
    grad_steps: int | None = None,
    guidance_scale: float = 4.5,
    batch_size: int | None = None,
    checkpoint: bool = True,
    progress: bool = True,
) -> "OptimizedNoise":
    """Optimise each seed's initial noise for `objective` on the sphere of its own draw.

    Args:
        lens: From `dit_lens.load` (a PixArt pipeline).
        prompt: The prompt the images are generated from.
        seeds: Seeds whose noise ε (`dit_lens.trace.runner.initial_noise`) to start from.
        objective: Images ``(N, 3, H, W)`` float in [0, 1] -> ``(N,)`` scores to maximise, in torch
            (e.g. `class_probability`; any callable), or an attention objective
            (`attention_concentration`), for which the differentiable run stops after the last step it
            reads (`dit_lens.optimize.objectives`).
        iterations: Gradient steps per seed (0: only measure the objective at ε).
        lr: Angle in radians each step rotates the noise by (0 leaves it).
        max_angle: Largest angle in radians between z and ε (None: no trust region).
        target: Stop a seed once its objective reaches this (in the objective's units; for
            `class_probability`, log p, e.g. ``math.log(0.9)``). None: always run `iterations`.
        num_inference_steps: Steps T of the runs the noise is for.
        grad_steps: Sampler steps of the differentiable run (None: T, the real run; fewer is cheaper).
        guidance_scale: Classifier-free guidance scale of the runs.
        batch_size: Seeds optimised together (default 4).
        checkpoint: Recompute each transformer call in the backward pass, so memory holds one step's
            activations instead of every step's; False is faster (about 30% on the embedded world) where
            they all fit. The result is the same either way.
        progress: Show a progress bar over iterations.

    Returns:
        An `OptimizedNoise` for ``generate(lens, prompt, seeds=seeds, edits=[it])``.
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"optimize_noise takes one prompt (a non-empty string), got {prompt!r}")
    seeds = check_seeds(seeds)
    reads = getattr(objective, "reads", "images")
    if reads not in ("images", "attention") or (reads == "images" and not callable(objective)) or \
            (reads == "attention" and not callable(getattr(objective, "score", None))):
        raise ValueError(f"objective must be a callable images (N, 3, H, W) in [0, 1] -> scores (N,), such as "
                         f"class_probability(dit_lens.load_oracle(), 'polyps'), or an attention objective such as "
                         f"attention_concentration('polyps'); got {type(objective).__name__}")
    iterations = check_int(iterations, "iterations", minimum=0)
    lr = _angle(lr, "lr", allow_zero=True)
    max_angle = None if max_angle is None else _angle(max_angle, "max_angle")
    if target is not None and (not is_real(target) or not math.isfinite(float(target))):
        raise ValueError(f"target must be a finite number in the objective's units or None, got {target!r}")
    T = check_steps(num_inference_steps, lens.pipeline.scheduler)
    steps = T if grad_steps is None else check_steps(grad_steps, lens.pipeline.scheduler, name="grad_steps")
    if steps > T:
        raise ValueError(f"grad_steps={steps} is more than num_inference_steps={T}; pass grad_steps <= {T} "
                         f"(or None for the real run)")
    guidance_scale = check_guidance(guidance_scale)
    per_call = 4 if batch_size is None else check_int(batch_size, "batch_size", minimum=1)
    if not isinstance(checkpoint, bool):
        raise ValueError(f"checkpoint must be True or False, got {checkpoint!r}")

    chunks = [seeds[i : i + per_call] for i in range(0, len(seeds), per_call)]
    found: list[dict[str, torch.Tensor]] = []
    modules = [m for m in lens.pipeline.components.values() if isinstance(m, torch.nn.Module)]
    with frozen(modules), _reading(lens, objective), tqdm(total=len(chunks) * iterations, desc="optimize_noise",
                                                         unit="it", disable=not progress) as bar:
        sampler = _sampler(lens, prompt, steps, guidance_scale, checkpoint, objective)
        for chunk in chunks:
            found.append(_optimise(sampler, chunk, objective, iterations, lr, max_angle, target, bar))
    part = {k: torch.cat([f[k] for f in found]) for k in found[0]}
    eps = part["eps"].double().flatten(1)  # (seeds, D)
    noise = part["noise"].double().flatten(1)
    return OptimizedNoise(
        prompt, tuple(seeds), part["noise"].cpu().numpy(), objective=_name(objective),
        before=tuple(part["before"].tolist()), after=tuple(part["after"].tolist()),
        best_iteration=tuple(int(i) for i in part["best_iteration"]),
        norm_ratio=tuple((noise.norm(dim=1) / eps.norm(dim=1)).tolist()),
        cosine=tuple(torch.nn.functional.cosine_similarity(noise, eps, dim=1).tolist()),
        iterations=iterations, lr=lr, max_angle=max_angle, target=None if target is None else float(target),
        num_inference_steps=T, grad_steps=steps, guidance_scale=guidance_scale, model_fingerprint=lens.fingerprint,
    )


def _optimise(sampler: DifferentiableSampler, seeds: list[int], objective: Objective, iterations: int, lr: float,
              max_angle: float | None, target: float | None, bar: Any) -> dict[str, torch.Tensor]:
    """Geodesic ascent for one batch of seeds; the best iterate of each and its objective."""
    eps = initial_noise(sampler.lens, seeds)  # (n, C, h, w)
    z, best = eps.clone(), eps.clone()
    best_iteration = torch.zeros(len(seeds), dtype=torch.long)
    before = best_score = None
    if target is not None or iterations == 0:  # no gradients: a seed already at the target never needs one
        before, _ = _evaluate(sampler, eps, seeds, objective, with_grad=False)
        best_score = before.clone()
    active = torch.ones(len(seeds), dtype=torch.bool) if target is None else before < target

    def keep(rows: torch.Tensor, score: torch.Tensor, i: int) -> None:  # the best iterate of each seed so far
        higher = score > best_score[rows]
        best[rows[higher]], best_score[rows[higher]], best_iteration[rows[higher]] = z[rows[higher]], score[higher], i

    for i in range(iterations):
        rows = torch.nonzero(active)[:, 0]
        if len(rows) == 0:
            bar.update(iterations - i)  # every seed stopped early
            break
        score, grad = _evaluate(sampler, z[rows], [seeds[r] for r in rows], objective, with_grad=True)
        if before is None:  # the first iteration sees every seed
            before, best_score = score, score.clone()
        keep(rows, score, i)
        z[rows], moved = _rotate(z[rows], grad, eps[rows], lr, max_angle)
        active[rows[~moved | (score >= target if target is not None else False)]] = False
        bar.update(1)
    rows = torch.nonzero(active)[:, 0]
    if iterations and len(rows):  # the last step's noise, not yet measured
        score, _ = _evaluate(sampler, z[rows], [seeds[r] for r in rows], objective, with_grad=False)
        keep(rows, score, iterations)
    return {"eps": eps, "noise": best, "before": before, "after": best_score, "best_iteration": best_iteration}


def _evaluate(sampler: DifferentiableSampler, z: torch.Tensor, seeds: list[int], objective: Objective,
              with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The objective at noise ``z (m, C, h, w)`` as float64 ``(m,)`` on the CPU, and its gradient ``(m, C, h, w)``."""
    z = z.detach().clone().requires_grad_(with_grad)
    with torch.set_grad_enabled(with_grad):
        score = _score(sampler, objective, z, seeds)
        if not isinstance(score, torch.Tensor) or tuple(score.shape) != (len(seeds),):
            got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            raise ValueError(f"the objective must return a torch tensor with one score per image, shape "
                             f"({len(seeds)},); got {got}")
        bad = [s for s, ok in zip(seeds, torch.isfinite(score.detach()).tolist()) if not ok]
        if bad:
            raise NonFiniteError(f"the objective returned NaN or inf for seeds {bad}; make it finite for every image "
                                 f"(e.g. a log-probability via log_softmax, not log of a probability that can be 0)")
        if not with_grad:
            return score.detach().double().cpu(), None
        if not score.requires_grad:
            raise ValueError("the objective's scores do not depend on the images through torch operations (made "
                             "with numpy, .item() or under torch.no_grad?); compute them in torch so they have a "
                             "gradient")
        (grad,) = torch.autograd.grad(score.sum(), z)
    if not bool(torch.isfinite(grad).all()):
        raise NonFiniteError("the objective's gradient holds NaN or inf; make the objective smooth in the images")
    return score.detach().double().cpu(), grad


def _rotate(z: torch.Tensor, grad: torch.Tensor, eps: torch.Tensor, lr: float,
            max_angle: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One geodesic ascent step of angle `lr` on each row's sphere ‖z‖ = ‖ε‖, kept within `max_angle` of ε.

    Returns the new rows and which rows moved (a row whose gradient has no tangent part cannot)."""
    shape, dtype = z.shape, z.dtype
    z, g, e = z.double().flatten(1), grad.double().flatten(1), eps.double().flatten(1)  # (m, D)
    radius = e.norm(dim=1, keepdim=True)
    here = z / z.norm(dim=1, keepdim=True)
    tangent = g - (g * here).sum(1, keepdim=True) * here
    size = tangent.norm(dim=1, keepdim=True)
    moved = size[:, 0] > 0 if lr > 0 else torch.zeros(len(z), dtype=torch.bool, device=z.device)
    new = torch.where(moved[:, None], math.cos(lr) * here + math.sin(lr) * tangent / size.clamp_min(1e-300), here)
    if max_angle is not None:
        home = e / radius
        cos = (new * home).sum(1, keepdim=True).clamp(-1.0, 1.0)
        away = new - cos * home  # the direction from ε towards the new point, tangent at ε
        away = away / away.norm(dim=1, keepdim=True).clamp_min(1e-300)
        edge = math.cos(max_angle) * home + math.sin(max_angle) * away
        new = torch.where(cos < math.cos(max_angle), edge, new)
    return (new * radius).reshape(shape).to(dtype), moved.cpu()


def _sampler(lens: Lens, prompt: str, steps: int, guidance_scale: float, checkpoint: bool,
             objective: Any) -> DifferentiableSampler:
    """The differentiable loop an objective needs: to the decoded image, or to the last step an attention
    objective reads, with its words' cross-attention kept."""
    if getattr(objective, "reads", "images") != "attention":
        return DifferentiableSampler(lens, prompt, steps, guidance_scale, checkpoint)
    return DifferentiableSampler(lens, prompt, steps, guidance_scale, checkpoint, words=objective.words,
                                 read_steps=objective.read_steps(steps), read_layers=objective.read_layers(lens))


def _score(sampler: DifferentiableSampler, objective: Any, z: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """The objective of the runs from noise ``z (m, C, h, w)``."""
    if getattr(objective, "reads", "images") != "attention":
        return objective(sampler.images(z, seeds))
    return objective.score(sampler.attention(z, seeds), seeds=seeds, grid=tuple(sampler.lens.token_grid))


def _reading(lens: Lens, objective: Any):
    """The context an objective needs for the whole optimisation: dit-lens' attention processor on the
    layers an attention objective reads (kept through the backward passes; put back after)."""
    if getattr(objective, "reads", "images") != "attention":
        return nullcontext()
    site = lens.family.cross_attention_site
    return exposed_weights(lens, [(site, layer) for layer in objective.read_layers(lens)])


def _angle(value: Any, name: str, allow_zero: bool = False) -> float:
    low = "0 <=" if allow_zero else "0 <"
    if not is_real(value) or not math.isfinite(float(value)) or not (0 <= value <= math.pi) or \
            (value == 0 and not allow_zero):
        raise ValueError(f"{name} is an angle in radians with {low} {name} <= pi, got {value!r}; e.g. {name}=0.1")
    return float(value)


def _name(objective: Any) -> str:
    """A stable description of the objective for provenance (no memory addresses)."""
    return getattr(objective, "name", None) or getattr(objective, "__qualname__", None) or type(objective).__name__
