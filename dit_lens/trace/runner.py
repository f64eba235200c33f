"""The one nnsight loop: run the real denoising loop and visit sites through hooks.

`traced_generate` runs the pipeline's own ``__call__`` (through the nnsight ``DiffusionModel`` in
``lens.model``) for a batch of (prompt, seed) runs. Each `Hook` names a site, the layers and steps
where it runs and a function called on the site's output there; the function may return a tensor to
replace the output (an edit) or ``None`` to leave it alone (a read). Hooks from any number of callers
run in one pass, visited in execution order (step, layer, then the block's own site order), in the
order they were given at one site. A heads site (``"attn2.heads"``) is the input of its attention's output
projection, read and replaced there. Weights sites (``"attn2.weights"``) get dit-lens' attention
processor on exactly the layers they name (`dit_lens.trace.attention`); nnsight removes its hooks and
the processors are put back when the run ends, also when it raises. `check_prompts`, `check_seeds` and
`is_int` (re-exported from `dit_lens.validate`) validate the (prompt, seed) grid that capture and
generation both take; every run refuses a step count its sampler cannot run and a guidance scale below 1.

Examples:
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> shapes = []
    >>> read = Hook("attn2", (0, 1), lambda step, layer, out: shapes.append((step, layer, tuple(out.shape))))
    >>> result = traced_generate(lens, ["a polyp"], [0], num_inference_steps=2, guidance_scale=4.5, hooks=[read])
    >>> shapes  # (step, layer, (2 * batch, tokens, C)): guidance doubles the batch
    [(0, 0, (2, 16, 16)), (0, 1, (2, 16, 16)), (1, 0, (2, 16, 16)), (1, 1, (2, 16, 16))]
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..model.lens import Lens
from ..model.sites import site_module
from ..model.where import At
from ..validate import check_guidance, check_prompts, check_seeds, check_steps, is_int
from .attention import exposed_weights

__all__ = [
    "initial_noise",
    "Hook",
    "Visit",
    "branch_rows",
    "check_prompts",
    "check_seeds",
    "is_int",
    "scheduler_timesteps",
    "traced_generate",
]

#: ``visit(step, layer, output)`` -> replacement output or None.
Visit = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class Hook:
    """Call `visit` on `site`'s output at `layers` and `steps` of a traced run.

    Attributes:
        site: A site of the model's family (``"attn2"``, ``"attn1"``, ``"ff"``, ``"block"``,
            ``"attn1.weights"``, ``"attn2.weights"``, ``"attn1.heads"``, ``"attn2.heads"``).
        layers: Block indices.
        visit: ``visit(step, layer, output)``; returns a replacement or ``None``.
        steps: Denoising steps (``None``: every step).
    """

    site: str
    layers: tuple[int, ...]
    visit: Visit
    steps: frozenset[int] | None = None

    def __post_init__(self) -> None:
        layers = tuple(int(layer) for layer in self.layers)
        if not layers or any(layer < 0 for layer in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"Hook.layers must be distinct block indices >= 0, got {list(self.layers)}")
        object.__setattr__(self, "layers", layers)
        if self.steps is not None:
            object.__setattr__(self, "steps", frozenset(int(t) for t in self.steps))

    def runs_at(self, step: int) -> bool:
        return self.steps is None or step in self.steps


def traced_generate(
    lens: Lens,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    hooks: Iterable[Hook] = (),
    output_type: str = "latent",
    step_end: Callable[[int, torch.Tensor], None] | None = None,
    latents: torch.Tensor | None = None,
    scheduler: Any = None,
) -> Any:
    """Run ``lens.pipeline``'s denoising loop for runs ``(prompts[i], seeds[i])`` as one batch.

    Run i is the plain call ``lens.pipeline(prompts[i], generator=lens.generator(seeds[i]), ...)``:
    each run draws its initial noise from its own generator, so batching changes values only by
    float rounding.

    Args:
        lens: A `dit_lens.Lens`.
        prompts: One prompt per run.
        seeds: One seed per run.
        num_inference_steps: Denoising steps T; hooks see steps 0 … T-1.
        guidance_scale: Classifier-free guidance scale; above 1 a site output holds the
            unconditional rows first, then the conditional rows (see `branch_rows`).
        hooks: What to read or edit, and where.
        output_type: The pipeline's ``output_type``; the default skips the VAE decode, which no
            site depends on.
        step_end: Called as ``step_end(step, latents)`` after each denoising step with the
            loop's latents ``(runs, C, H, W)``; it may edit them in place (latent edits).
        latents: Initial latents ``(runs, C, H, W)`` instead of the seeds' noise (e.g. an inverted
            image's); the seeds' generators are still passed for samplers that draw noise.
        scheduler: A scheduler to run this call with instead of the pipeline's own (put back after
            the call, also when it raises), e.g. the DDIM sampler of `dit_lens.inversion`.

    Returns:
        The pipeline's output (``.images``), as the plain call returns it.
    """
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(
            f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds"
        )
    hooks = list(hooks)
    family = lens.family
    for hook in hooks:  # site in the family, blocks that exist and have it (Flux's two lists); a hook's steps
        At(hook.site, hook.layers, steps=()).resolve(lens, 0, name="Hook")  # past the run are never visited
    steps = check_steps(num_inference_steps, scheduler or lens.pipeline.scheduler)
    guidance_scale = check_guidance(guidance_scale)
    points = sorted({(layer, lens.part(layer).rank(h.site), h.site) for h in hooks for layer in h.layers})
    at_point = {(layer, site): [h for h in hooks if h.site == site and layer in h.layers] for layer, _, site in points}
    weights = {(family.attention_of(site), layer) for layer, _, site in points if family.attention_of(site)}
    extra = {} if step_end is None else _step_callback(lens, step_end)
    if latents is not None:
        if latents.shape[0] != len(prompts):
            raise ValueError(f"latents hold {latents.shape[0]} runs for {len(prompts)} prompts")
        extra["latents"] = family.pack_latents(latents)  # Flux's loop holds packed 2×2 patches
    with exposed_weights(lens, weights), _scheduler(lens, scheduler):
        envoys = {(layer, site): site_module(lens.model, family, site, layer, lens.split) for layer, _, site in points}
        parts = {layer: lens.part(layer) for layer, _, _ in points}
        text = lens.text_tokens()  # text tokens before the image tokens of a sequence site
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
                step = int(step)
                for layer, _, site in points:
                    active = [h for h in at_point[(layer, site)] if h.runs_at(step)]
                    if not active:
                        continue
                    envoy, part = envoys[(layer, site)], parts[layer]
                    heads = part.heads_of(site) is not None  # a heads site is its module's input
                    whole = envoy.input if heads else envoy.output  # the site's tensor, or a tuple holding it
                    output, replaced = part.read(site, whole, text), False  # (rows, tokens, C); weights (rows, heads, q, k)
                    for hook in active:
                        new = hook.visit(step, layer, output)
                        if new is not None:
                            output, replaced = new, True
                    if replaced and heads:
                        envoy.input = output
                    elif replaced:
                        envoy.output = part.write(site, whole, output, text)
            result = lens.model.output.save()
    if output_type == "latent" and family.pack > 1:  # (rows, C, h, w), as every other family returns them
        result.images = family.unpack_latents(result.images, lens.token_grid)
    return result


def _step_callback(lens: Lens, step_end: Callable[[int, torch.Tensor], None]) -> dict:
    """`step_end` as the pipeline's own per-step callback: ``callback`` (PixArt) or
    ``callback_on_step_end`` (SANA and newer pipelines), which sees the same latents tensor."""
    import inspect

    accepted = inspect.signature(type(lens.pipeline).__call__).parameters
    if "callback" in accepted:
        return {"callback": lambda step, _t, lat: step_end(int(step), lat)}
    family = lens.family

    def on_step_end(_pipe: Any, step: int, _t: Any, tensors: dict) -> dict:
        if family.pack == 1:
            step_end(int(step), tensors["latents"])  # edits it in place
            return {"latents": tensors["latents"]}
        latents = family.unpack_latents(tensors["latents"], lens.token_grid)  # step_end sees (rows, C, h, w)
        step_end(int(step), latents)
        return {"latents": family.pack_latents(latents).to(tensors["latents"].dtype)}

    return {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": ["latents"]}


@contextmanager
def _scheduler(lens: Lens, scheduler: Any):
    """Run the pipeline with `scheduler` (None: its own) and put its own back afterwards."""
    if scheduler is None:
        yield
        return
    own = lens.pipeline.scheduler
    lens.pipeline.scheduler = scheduler
    try:
        yield
    finally:
        lens.pipeline.scheduler = own


def scheduler_timesteps(lens: Lens, num_inference_steps: int, scheduler: Any = None) -> Any:
    """The timestep value at each transformer call of a run of T steps (numpy, its dtype), of `scheduler`
    (None: the pipeline's own)."""
    scheduler = copy.deepcopy(scheduler or lens.pipeline.scheduler)
    scheduler.set_timesteps(num_inference_steps, device="cpu", **timestep_kwargs(lens, scheduler, num_inference_steps))
    return scheduler.timesteps[:num_inference_steps].cpu().numpy()


def timestep_kwargs(lens: Lens, scheduler: Any, num_inference_steps: int) -> dict:
    """What the pipeline passes ``scheduler.set_timesteps`` besides the step count: Flux's noise levels
    ``linspace(1, 1/T, T)`` (`Family.linear_sigmas`), and a resolution-dependent shift ``mu`` where the sampler
    shifts dynamically (linear in the image-token count, as diffusers' ``calculate_shift``)."""
    import numpy as np

    config, kwargs = scheduler.config, {}
    if lens.family.linear_sigmas and not config.get("use_flow_sigmas"):
        kwargs["sigmas"] = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    if config.get("use_dynamic_shifting"):
        tokens = lens.token_grid[0] * lens.token_grid[1]
        base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (high - low) / (top - base)
        kwargs["mu"] = tokens * slope + (low - slope * base)
    return kwargs


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


def initial_noise(lens: Lens, seeds: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Each row's initial noise ``(rows, C, h, w)``, drawn from its seed's generator exactly as the pipeline's
    ``prepare_latents`` draws it (in the family's `Family.noise_dtype`, else the prompt embeddings' dtype, unless
    `dtype` is given)."""
    pipe = lens.pipeline
    channels = pipe.transformer.config.in_channels // lens.family.pack ** 2  # Flux packs 2×2 patches into a token
    shape = (len(seeds), channels, lens.pipeline_kwargs["height"] // pipe.vae_scale_factor,
             lens.pipeline_kwargs["width"] // pipe.vae_scale_factor)
    if dtype is None and lens.family.noise_dtype is not None:
        dtype = getattr(torch, lens.family.noise_dtype)
    if dtype is None:
        dtype = (pipe.text_encoder if pipe.text_encoder is not None else pipe.transformer).dtype
    return randn_tensor(shape, generator=[lens.generator(s) for s in seeds], device=lens.device, dtype=dtype)
