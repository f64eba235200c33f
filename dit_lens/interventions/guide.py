"""Latent corrections: `EnergyGuidance` (attention regulation's module 4, `dit_lens.interventions.regulate`)
and how a run applies any `Guidance` edit, through differentiable calls of the denoiser that the traced
run does not see.

A latent correction needs the model's attention at the latents it is about to denoise, with gradients
back to those latents. `GuidePass` makes that call for the edited rows (their conditional prompts, the
run's timestep at that step) through `dit_lens.sampling.denoiser.Denoiser`, whose calls nnsight does not
count as steps of the traced run, and reads the cross-attention weights of the layers the edits need
through plain PyTorch forward hooks on dit-lens' attention processor (`dit_lens.trace.attention`),
removed after every call. Parameters are never given gradients (``torch.autograd.grad`` takes only the
latents), and nothing else of the run leaves inference mode.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..trace.attention import exposed_weights
from ..model.lens import Lens
from ..model.tokens import check_words, word_keys
from ..validate import check_nonnegative
from ..sampling.denoiser import Denoiser
from ..trace.runner import scheduler_timesteps
from .base import EditContext, Guidance, check_layers_fit, check_where, register
from .region import MaskedValue, Region, check_window, window_steps

__all__ = ["EnergyGuidance", "GuidePass"]


class GuidePass:
    """Differentiable forward passes for the `Guidance` edits of one pipeline call.

    Args:
        lens: The `dit_lens.Lens` being run.
        scheduler: The scheduler the call runs with (None: the pipeline's own).
        prompts: The edited branch's prompt of each pair.
        num_inference_steps: Steps T of the run.
        guides: The guidance edits (their ``layers_needed`` say which attention weights to read).
        guidance_scale: The run's guidance scale (an input of a guidance-distilled denoiser).
    """

    def __init__(self, lens: Lens, scheduler: Any, prompts: Sequence[str], num_inference_steps: int,
                 guides: Sequence[Guidance], guidance_scale: float | None = None) -> None:
        scheduler = scheduler or lens.pipeline.scheduler
        if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
            raise ValueError(f"the latent correction runs on samplers whose latents are the model's input as they "
                             f"are; {type(scheduler).__name__} scales them (init_noise_sigma "
                             f"{float(scheduler.init_noise_sigma):g}); use a DDIM or DPM-Solver scheduler")
        self.timesteps = scheduler_timesteps(lens, num_inference_steps, scheduler).tolist()
        self.lens = lens
        self.denoiser = Denoiser(lens, prompts, guidance=guidance_scale)  # Flux embeds the scale
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
                module = self.lens.site_module(self.site, layer).processor.weights
                handle = module.register_forward_hook(lambda _m, _i, out, layer=layer: seen.__setitem__(layer, out))
                stack.callback(handle.remove)
            yield


@register
@dataclass(frozen=True, eq=False)
class EnergyGuidance(MaskedValue, Guidance):
    """The latent correction: descend L = 1 − mean_k (attention mass of word k inside Ω) before each
    step in `window` (see the module docstring). ``step = 0`` is the identity."""

    record = "energy"
    words: tuple[str, ...] = ()
    region: Any = None
    step: float = 0.05
    window: tuple[float, float] = (0.0, 0.4)
    layers: tuple[int, ...] | None = None
    blur: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", check_words(self.words, "EnergyGuidance.words"))
        if not self.words:
            raise ValueError("EnergyGuidance.words is empty; name the pathology words whose attention to concentrate")
        object.__setattr__(self, "region", Region.of(self.region, "EnergyGuidance.region"))
        for attr in ("step", "blur"):
            object.__setattr__(self, attr, check_nonnegative(getattr(self, attr), f"EnergyGuidance.{attr}"))
        object.__setattr__(self, "window", check_window(self.window, "EnergyGuidance.window"))
        layers, _ = check_where("EnergyGuidance", self.layers, None, "both")
        object.__setattr__(self, "layers", layers)

    @property
    def is_identity(self) -> bool:
        return self.step == 0.0

    def guided_steps(self, num_inference_steps: int) -> list[int]:
        return window_steps(self.window, num_inference_steps)

    def layers_needed(self, lens: Lens) -> list[int]:
        return list(range(lens.num_layers)) if self.layers is None else list(self.layers)

    def check(self, lens: Lens, num_inference_steps: int) -> None:
        self.region.check(lens, "EnergyGuidance.region")
        check_layers_fit("EnergyGuidance", self.layers_needed(lens), lens)

    def energy(self, maps: dict[int, torch.Tensor], ctx: EditContext) -> torch.Tensor:
        """L per pair ``(pairs,)`` from cross-attention weights ``{layer: (pairs, heads, queries, keys)}``."""
        omega = self.region.focus(tuple(ctx.lens.token_grid), ctx.seeds, self.blur, ctx.pairs)
        mean = torch.stack([maps[layer] for layer in sorted(maps)]).mean(dim=(0, 2))  # (pairs, queries, keys)
        out = []
        for i, keys in enumerate(word_keys(ctx.lens, ctx.prompts, self.words)):
            a = mean[i][:, keys]  # (queries, words' tokens)
            inside = (a * omega[i].to(a)[:, None]).sum(0) / a.sum(0).clamp_min(torch.finfo(a.dtype).tiny)
            out.append(1 - inside.mean())
        return torch.stack(out)

    def correct(self, step: int, latents: torch.Tensor, forward: Callable[[torch.Tensor], dict],
                ctx: EditContext) -> tuple[torch.Tensor, torch.Tensor]:
        steps = self.guided_steps(ctx.num_inference_steps)
        size = self.step * (1 - steps.index(step) / len(steps))
        z = latents.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            energy = self.energy(forward(z), ctx)
            (grad,) = torch.autograd.grad(energy.sum(), z)
        rms = grad.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(torch.finfo(grad.dtype).tiny)
        return (latents - size * grad / rms).to(latents.dtype), energy.detach()
