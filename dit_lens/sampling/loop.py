"""`DifferentiableSampler`: the pipeline's denoising loop and decode in plain torch, differentiable in the
initial noise.

The pipeline's own loop, rewritten: its transformer (through `dit_lens.sampling.denoiser.Denoiser`; the
learned-sigma half dropped), a copy of its sampler at `steps` steps, classifier-free guidance as the
pipeline mixes it, and the decode of `dit_lens.sampling.images`. At the pipeline's step count it is the very
run `dit_lens.generate` makes (same images up to batching rounding). Each transformer call can be
checkpointed, so memory holds one step's activations; `step` names the loop step of the call running now,
also while a checkpointed call is recomputed in the backward pass, so forward hooks can tell the steps
apart. `frozen` puts the model's weights out of the graph for such a run (eval mode,
``requires_grad=False``) and back afterwards.

Examples:
    >>> import torch
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> from dit_lens.trace.runner import initial_noise
    >>> lens = load(build_pixart(PixArtSpec(num_layers=1)))
    >>> sampler = DifferentiableSampler(lens, "a polyp", steps=2, guidance_scale=4.5)
    >>> z = initial_noise(lens, [0]).requires_grad_(True)
    >>> with frozen([lens.pipeline.transformer, lens.pipeline.vae]):
    ...     images = sampler.images(z, [0])  # (m, 3, H, W) in [0, 1]
    ...     (grad,) = torch.autograd.grad(images.mean(), z)
    >>> images.shape, grad.shape == z.shape
    (torch.Size([1, 3, 16, 16]), True)
    >>> sampler.step  # the backward pass recomputed the checkpointed calls, step 0 last
    0
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.utils.checkpoint

from ..model.lens import Lens
from ..model.tokens import word_tokens
from ..trace.runner import timestep_kwargs
from ..validate import check_guidance, check_int
from .denoiser import Denoiser, mix
from .images import decode_images

__all__ = ["DifferentiableSampler", "frozen"]


class DifferentiableSampler:
    """The pipeline's denoising loop and decode in plain torch, differentiable in the initial noise; with
    `words`, the loop up to the last step of `read_steps`, keeping the words' cross-attention weights.

    Args:
        lens: A `dit_lens.Lens` of a pipeline with a VAE.
        prompt: The prompt of the runs.
        steps: Sampler steps of the runs.
        guidance_scale: Classifier-free guidance scale (mixed as the pipeline mixes it, or embedded for a
            guidance-distilled model).
        checkpoint: Recompute each transformer call in the backward pass (memory for one step's activations).
        words: Words of the prompt whose cross-attention `attention` reads (refused if the prompt lacks one).
        read_steps: The steps `attention` reads (the run stops after the last).
        read_layers: The blocks `attention` reads; their cross-attention site must expose its weights
            (`dit_lens.trace.attention.exposed_weights`) while it runs.

    Attributes:
        step: The loop step of the transformer call running now (-1 before the first).
    """

    def __init__(self, lens: Lens, prompt: str, steps: int, guidance_scale: float, checkpoint: bool = True, *,
                 words: Sequence[str] = (), read_steps: Sequence[int] = (), read_layers: Sequence[int] = ()) -> None:
        pipe = lens.pipeline
        if getattr(pipe, "vae", None) is None:
            raise ValueError(f"the differentiable loop decodes with the pipeline's VAE; {type(pipe).__name__} has "
                             f"none: load the pipeline with its VAE")
        if not isinstance(checkpoint, bool):
            raise ValueError(f"checkpoint must be True or False, got {checkpoint!r}")
        self.lens, self.pipe = lens, pipe
        self.steps, self.guidance_scale = check_int(steps, "steps", minimum=1), check_guidance(guidance_scale)
        self.recompute, self.step = checkpoint, -1
        self.denoiser = Denoiser(lens, [prompt])
        self.words, self.read, self.layers = tuple(words), sorted(read_steps), list(read_layers)
        if self.words and not self.read:
            raise ValueError("the differentiable loop reads attention at read_steps: give at least one step")
        found = word_tokens(lens, prompt, list(self.words)) if self.words else {}  # refuses a word the prompt lacks
        self.keys = [torch.tensor(found[word], dtype=torch.long) for word in self.words]

    def images(self, z: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Images ``(m, 3, H, W)`` in [0, 1] generated from noise ``z (m, C, h, w)`` (`seeds`: each row's seed,
        for a sampler that draws from the pipeline's generators), as `dit_lens.generate` makes them."""
        return decode_images(self.lens, self._loop(z, seeds, None))

    def attention(self, z: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """The words' cross-attention maps of the runs from noise ``z (m, C, h, w)`` at the read steps and
        layers: ``(m, read steps · layers, queries, words)``, weights of the conditional rows averaged over
        heads and summed over each word's tokens. The loop stops after the last read step (no decode)."""
        if not self.words:
            raise ValueError("this DifferentiableSampler reads no attention: construct it with words= and "
                             "read_steps=")
        seen: list[torch.Tensor] = []
        self._loop(z, seeds, seen)
        return torch.stack(seen, 1)

    def _call(self, step: int, model_input: torch.Tensor, t: Any, which: list[int | None]) -> torch.Tensor:
        """The transformer call of loop step `step` (the checkpointed function: a recomputation sets it again)."""
        self.step = step
        return self.denoiser.call(model_input, t, which, self.guidance_scale)

    def _loop(self, z: torch.Tensor, seeds: Sequence[int], seen: list[torch.Tensor] | None) -> torch.Tensor:
        """The final latents; with `seen`, the read steps' weights appended to it and the loop stopped there."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(self.steps, device=z.device, **timestep_kwargs(self.lens, scheduler, self.steps))
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        extra = {}  # what the pipeline passes its scheduler's step (SD3 passes nothing)
        if hasattr(self.pipe, "prepare_extra_step_kwargs"):
            extra = self.pipe.prepare_extra_step_kwargs([self.lens.generator(s) for s in seeds], 0.0)
        m, guided = z.shape[0], self.lens.guided(self.guidance_scale)
        latents = z * getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching samplers do not scale
        scale = getattr(scheduler, "scale_model_input", lambda x, _t: x)
        for i, t in enumerate(scheduler.timesteps):
            model_input = scale(torch.cat([latents] * 2) if guided else latents, t)
            which = [None] * m + [0] * m if guided else [0] * m  # the empty prompt first, as the pipeline does
            if seen is not None and i in self.read:  # not recomputed: the weights are kept with their graph
                with self._hooks(seen, m if guided else 0):
                    pred = self._call(i, model_input, t, which)
                if i == self.read[-1]:
                    return latents  # nothing later is read
            elif self.recompute and torch.is_grad_enabled():
                pred = torch.utils.checkpoint.checkpoint(self._call, i, model_input, t, which, use_reentrant=False)
            else:
                pred = self._call(i, model_input, t, which)  # (rows, C, h, w)
            if guided:
                pred = mix(*pred.chunk(2), self.guidance_scale)
            out = scheduler.step(pred, t, latents, **extra, return_dict=False)
            latents = out[1] if self.steps == 1 and len(out) > 1 else out[0]  # PixArt: the denoised sample at one step
        return latents

    @contextmanager
    def _hooks(self, seen: list[torch.Tensor], first: int) -> Iterator[None]:
        """Forward hooks on the read layers' weights site that keep each word's map from the conditional
        rows: weights averaged over heads, summed over the word's tokens, ``(m, queries, words)``."""
        keys = [k.to(self.lens.device) for k in self.keys]

        def keep(_module: Any, _inputs: Any, weights: torch.Tensor) -> None:  # (rows, heads, queries, keys)
            heads = weights[first:].mean(1)  # (m, queries, keys)
            seen.append(torch.stack([heads[..., k].sum(-1) for k in keys], -1))

        site = self.lens.family.cross_attention_site
        handles = [self.lens.site_module(site, layer).processor.weights.register_forward_hook(keep)
                   for layer in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def frozen(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """`modules` in eval mode with ``requires_grad=False`` inside; every submodule's mode and every flag put back."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    flags = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    try:
        for module in modules:
            module.eval().requires_grad_(False)
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)
