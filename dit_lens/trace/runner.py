"""nnsight plumbing shared by capture and steering: run the real denoising loop, visit sites.

`traced_generate` runs the pipeline's own ``__call__`` (through the nnsight ``DiffusionModel`` in
``lens.model``) for a batch of (prompt, seed) runs and calls a Python function on a site's output at
every denoising step and every requested layer, in execution order. The function may return a
tensor to replace the output (steering) or ``None`` to leave it alone (capture). nnsight removes its
hooks when the trace ends, also when the visit raises. `check_prompts` and `check_seeds` validate
the (prompt, seed) grid that capture and steering both take.

Examples:
    >>> from dit_lens import PixArtSpec, build_pixart, load
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> shapes = []
    >>> result = traced_generate(lens, ["a polyp"], [0], num_inference_steps=2, guidance_scale=4.5,
    ...     site="attn2", layers=(0, 1),
    ...     visit=lambda step, i, out: shapes.append((step, i, tuple(out.shape))))
    >>> shapes  # (step, layer index, (2 * batch, tokens, C)): guidance doubles the batch
    [(0, 0, (2, 16, 16)), (0, 1, (2, 16, 16)), (1, 0, (2, 16, 16)), (1, 1, (2, 16, 16))]
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..model.sites import site_module

__all__ = [
    "Visit",
    "branch_rows",
    "check_prompts",
    "check_seeds",
    "is_int",
    "traced_generate",
]

#: ``visit(step, layer_index, output)`` -> replacement output or None.
Visit = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]


def traced_generate(
    lens: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    site: str,
    layers: Sequence[int],
    visit: Visit,
    output_type: str = "latent",
    step_end: Callable[[int, torch.Tensor], None] | None = None,
) -> Any:
    """Run ``lens.pipeline``'s denoising loop for runs ``(prompts[i], seeds[i])`` as one batch.

    Run i is the plain call ``lens.pipeline(prompts[i], generator=lens.generator(seeds[i]), ...)``:
    each run draws its initial noise from its own generator, so batching changes values only by
    float rounding.

    Args:
        lens: A `dit_lens.Lens`.
        prompts: One prompt per run.
        seeds: One seed per run.
        num_inference_steps: Denoising steps T; `visit` sees steps 0 … T-1.
        guidance_scale: Classifier-free guidance scale; above 1 the site output holds the
            unconditional rows first, then the conditional rows (see `branch_rows`).
        site: A site of ``lens.family`` (``"attn2"``, ``"attn1"``, ``"ff"``, ``"block"``).
        layers: Block indices, strictly ascending (nnsight needs execution order).
        visit: Called as ``visit(step, index into layers, output)``.
        output_type: The pipeline's ``output_type``; the default skips the VAE decode, which no
            site depends on.
        step_end: Called as ``step_end(step, latents)`` after each denoising step with the
            loop's latents ``(runs, C, H, W)``; it may edit them in place (latent blending).

    Returns:
        The pipeline's output (``.images``), as the plain call returns it.
    """
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(
            f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds"
        )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"layers must be strictly ascending (execution order), got {list(layers)}")
    envoys = [site_module(lens.model, lens.family, site, layer) for layer in layers]
    steps = int(num_inference_steps)
    extra = {} if step_end is None else {"callback": lambda step, _t, latents: step_end(int(step), latents)}
    with lens.model.generate(
        list(prompts),
        generator=[lens.generator(seed) for seed in seeds],
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        output_type=output_type,
        **extra,
        **lens.pipeline_kwargs,
    ) as tracer:
        for step in tracer.iter[:steps]:  # bounded: code after an unbounded iter never runs
            for index, envoy in enumerate(envoys):
                replacement = visit(int(step), index, envoy.output)  # (rows, tokens, C)
                if replacement is not None:
                    envoy.output = replacement
        result = lens.model.output.save()
    return result


def branch_rows(output: torch.Tensor, branch: str, batch: int, guided: bool) -> torch.Tensor:
    """Pick the rows of one guidance branch from a site output over a batch of `batch` runs.

    Args:
        output: ``(2 * batch, ...)`` when `guided` (unconditional rows first), else
            ``(batch, ...)``.
        branch: ``"cond"``, ``"uncond"``, or ``"both"`` (stacked as ``[cond, uncond]`` on dim 1).
        batch: Number of runs.
        guided: Whether classifier-free guidance doubled the batch.

    Returns:
        ``(batch, ...)``, or ``(batch, 2, ...)`` for ``"both"``.
    """
    if not guided:
        if branch != "cond":
            raise ValueError(f"branch {branch!r} needs classifier-free guidance (scale > 1)")
        return output
    uncond, cond = output[:batch], output[batch:]
    if branch == "cond":
        return cond
    if branch == "uncond":
        return uncond
    if branch == "both":
        return torch.stack([cond, uncond], dim=1)  # (batch, 2, ...)
    raise ValueError(f"unknown branch {branch!r}; choose 'cond', 'uncond' or 'both'")


def check_prompts(prompts: Any) -> list[str]:
    """`prompts` as a list of unique strings (one string is one prompt); ValueError otherwise."""
    if isinstance(prompts, str):
        prompts = [prompts]
    try:
        prompts = list(prompts)
    except TypeError:
        kind = type(prompts).__name__
        raise ValueError(f"prompts must be a list of strings, got {kind}") from None
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt, e.g. prompts=['a polyp']")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must all be strings; got {bad[:3]!r}")
    if len(set(prompts)) != len(prompts):
        raise ValueError("prompts has duplicates; list each prompt once (they label the data)")
    return prompts


def check_seeds(seeds: Any) -> list[int]:
    """`seeds` as a list of unique ints in [0, 2**63); ValueError otherwise."""
    if isinstance(seeds, (int, np.integer)):
        raise ValueError(
            f"seeds must be a list of integers; pass seeds=range({seeds}) or seeds=[{seeds}]"
        )
    try:
        seeds = list(seeds)
    except TypeError:
        raise ValueError(f"seeds must be a list of integers, got {type(seeds).__name__}") from None
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed, e.g. seeds=range(8)")
    for seed in seeds:
        if not is_int(seed) or not 0 <= seed < 2**63:
            raise ValueError(f"seeds must be integers in [0, 2**63), got {seed!r}")
    if len(set(int(s) for s in seeds)) != len(seeds):
        raise ValueError("seeds has duplicates; list each seed once (they label the data)")
    return [int(s) for s in seeds]


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
