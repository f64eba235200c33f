"""How a run applies `Guidance` edits: differentiable calls of the denoiser that the traced run does not see.

A latent correction needs the model's attention at the latents it is about to denoise, with gradients
back to those latents. `GuidePass` makes that call for the edited rows (their conditional prompts, the
run's timestep at that step) through `dit_lens.trace.denoiser.Denoiser`, whose calls nnsight does not
count as steps of the traced run, and reads the cross-attention weights of the layers the edits need
through plain PyTorch forward hooks on dit-lens' attention processor (`dit_lens.trace.attention`),
removed after every call. Parameters are never given gradients (``torch.autograd.grad`` takes only the
latents), and nothing else of the run leaves inference mode.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..trace.attention import exposed_weights
from ..trace.denoiser import Denoiser
from .base import Guidance

__all__ = ["GuidePass"]


class GuidePass:
    """Differentiable forward passes for the `Guidance` edits of one pipeline call.

    Args:
        lens: The `dit_lens.Lens` being run.
        scheduler: The scheduler the call runs with (None: the pipeline's own).
        prompts: The edited branch's prompt of each pair.
        num_inference_steps: Steps T of the run.
        guides: The guidance edits (their ``layers_needed`` say which attention weights to read).
    """

    def __init__(self, lens: Any, scheduler: Any, prompts: Sequence[str], num_inference_steps: int,
                 guides: Sequence[Guidance]) -> None:
        scheduler = copy.deepcopy(scheduler or lens.pipeline.scheduler)
        if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
            raise ValueError(f"the latent correction runs on samplers whose latents are the model's input as they "
                             f"are; {type(scheduler).__name__} scales them (init_noise_sigma "
                             f"{float(scheduler.init_noise_sigma):g}); use a DDIM or DPM-Solver scheduler")
        scheduler.set_timesteps(num_inference_steps, device="cpu")
        self.timesteps = scheduler.timesteps[:num_inference_steps].tolist()
        self.lens = lens
        self.denoiser = Denoiser(lens, prompts)
        self.layers = sorted({layer for g in guides for layer in g.layers_needed(lens)})
        self.site = lens.family.cross_attention_site

    def exposed(self):
        """The context the whole run needs: dit-lens' processor on the cross-attention the edits read."""
        return exposed_weights(self.lens, [(self.site, layer) for layer in self.layers])

    def forward(self, step: int) -> Callable[[torch.Tensor], dict[int, torch.Tensor]]:
        """``f(z)``: the cross-attention weights ``{layer: (pairs, heads, queries, keys)}`` at latents
        ``z (pairs, C, h, w)`` and the timestep of `step`, differentiable with respect to z."""

        def run(z: torch.Tensor) -> dict[int, torch.Tensor]:
            seen: dict[int, torch.Tensor] = {}
            with self._reading(seen):
                self.denoiser.call(z, self.timesteps[step], list(range(z.shape[0])))
            return seen

        return run

    @contextmanager
    def _reading(self, seen: dict[int, torch.Tensor]) -> Iterator[None]:
        with ExitStack() as stack:
            for layer in self.layers:
                module = getattr(self.lens.blocks[layer], self.site).processor.weights
                handle = module.register_forward_hook(lambda _m, _i, out, layer=layer: seen.__setitem__(layer, out))
                stack.callback(handle.remove)
            yield

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Each row's initial noise, drawn from its seed's generator exactly as the pipeline draws it."""
        pipe = self.lens.pipeline
        shape = (len(seeds), pipe.transformer.config.in_channels,
                 self.lens.pipeline_kwargs["height"] // pipe.vae_scale_factor,
                 self.lens.pipeline_kwargs["width"] // pipe.vae_scale_factor)
        return randn_tensor(shape, generator=[self.lens.generator(s) for s in seeds], device=self.lens.device,
                            dtype=self.denoiser.embeds.dtype)
