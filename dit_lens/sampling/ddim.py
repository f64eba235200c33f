"""The deterministic samplers that inversion runs backwards, and the guided denoiser calls they step with.

`ddim_scheduler` makes the DDIM scheduler (η = 0) of a pipeline from its own noise schedule and
prediction type (ε, v; PixArt-alpha's learned-sigma output is cut to its first half as the pipeline
does), with ``"leading"`` timestep spacing so that each DDIM step lands exactly on the next step's
timestep: a step is then invertible up to the one approximation DDIM inversion makes (the model's
prediction at the current latent stands in for the one at the next). Samplers that cannot be run
backwards deterministically are refused with the reason (`check_invertible`).

`inversion_scheduler` picks DDIM, or the flow-matching Euler sampler (`dit_lens.sampling.flow`) for
families that sample by flow matching. `GuidedDenoiser` is the `dit_lens.sampling.denoiser.Denoiser` with
classifier-free guidance mixed in and the prediction converted to ε, for the loops the pipeline has no
place for: the inversion itself and h-Edit's extra evaluations.

Examples:
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=1)))
    >>> sampler = ddim_scheduler(lens, 4)
    >>> sampler.timesteps.tolist()  # each step ends on the next step's timestep
    [750, 500, 250, 0]
    >>> ddim_move(torch.ones(1), torch.zeros(1), 0.25, 1.0)  # no noise predicted: x̂₀ = x / √ᾱ
    tensor([2.])
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..model.lens import Lens
from ..validate import check_int
from .denoiser import Denoiser, mix

__all__ = ["GuidedDenoiser", "alpha_bars", "check_invertible", "ddim_move", "ddim_scheduler", "inversion_scheduler",
           "to_epsilon"]

#: Scheduler classes that draw fresh noise at every step: their runs have no deterministic inverse.
_STOCHASTIC = ("DDPMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
               "DDPMWuerstchenScheduler", "LCMScheduler", "TCDScheduler", "CMStochasticIterativeScheduler")


def check_invertible(scheduler: Any) -> None:
    """Refuse a scheduler whose schedule DDIM inversion cannot run backwards, saying why.

    Any discrete-time (β-schedule) scheduler is accepted as the *source of the noise schedule*: the
    inversion always runs the deterministic DDIM step on it. Refused: flow-matching schedulers (a
    rectified flow has no ᾱ schedule; it needs RF-inversion), schedules with zero terminal SNR
    (ᾱ_T = 0 leaves x̂₀ undefined at the first step), sample clipping or thresholding (not one-to-one),
    and prediction types other than ε, v and x₀.
    """
    name = type(scheduler).__name__
    config = scheduler.config
    if "FlowMatch" in name or config.get("use_flow_sigmas"):
        raise ValueError(f"the pipeline's sampler {name} is a flow-matching sampler: DDIM inversion needs a "
                         f"discrete ᾱ noise schedule (rectified flows invert with RF-inversion, not supported)")
    if "beta_start" not in config and config.get("trained_betas") is None:
        raise ValueError(f"the sampler {name} has no β noise schedule, so there is no DDIM step to invert")
    if config.get("rescale_betas_zero_snr"):
        raise ValueError(f"the sampler {name} rescales betas to zero terminal SNR: ᾱ_T = 0 leaves the first DDIM "
                         f"step's x̂₀ undefined, so the inversion cannot reach it; use a schedule without it")
    if config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction type {config.get('prediction_type')!r} of {name} cannot be converted to "
                         f"a noise prediction; DDIM inversion needs 'epsilon', 'v_prediction' or 'sample'")


def ddim_scheduler(lens: Lens, num_inference_steps: int, scheduler: Any = None) -> Any:
    """The deterministic DDIM scheduler (η = 0) over `scheduler`'s noise schedule (default: the
    pipeline's), set to `num_inference_steps` steps.

    Refuses stochastic samplers given explicitly (``scheduler=DDPMScheduler(...)``): the noise they draw
    at every step has no inverse.
    """
    from diffusers import DDIMScheduler

    T = check_int(num_inference_steps, "num_inference_steps", minimum=1)
    lens.family.needs("DDIM inversion (invert, regenerate, and the PnP and h-Edit editors)")
    base = lens.pipeline.scheduler if scheduler is None else scheduler
    if scheduler is not None and type(scheduler).__name__ in _STOCHASTIC:
        raise ValueError(f"{type(scheduler).__name__} draws fresh noise at every step, so its runs cannot be "
                         f"inverted deterministically; invert with the deterministic DDIM sampler (leave scheduler "
                         f"unset: dit-lens builds it from the pipeline's noise schedule)")
    check_invertible(base)
    config = dict(base.config)
    if T > config["num_train_timesteps"]:
        raise ValueError(f"num_inference_steps={T} exceeds the schedule's {config['num_train_timesteps']} "
                         f"training timesteps")
    ddim = DDIMScheduler.from_config(config, timestep_spacing="leading", steps_offset=0, clip_sample=False,
                                     thresholding=False, set_alpha_to_one=True,
                                     prediction_type=config.get("prediction_type", "epsilon"))
    ddim.set_timesteps(T, device="cpu")
    return ddim


def inversion_scheduler(lens: Lens, num_inference_steps: int, scheduler: Any = None) -> Any:
    """The deterministic sampler inversion runs backwards and the editors forwards: DDIM over the noise
    schedule, or the flow-matching Euler sampler for families that sample by flow matching."""
    if lens.family.sampling == "flow":
        from .flow import flow_scheduler

        return flow_scheduler(lens, num_inference_steps, scheduler)
    return ddim_scheduler(lens, num_inference_steps, scheduler)


def alpha_bars(ddim: Any) -> torch.Tensor:
    """ᾱ at every level of a run, float64: ``[ᾱ(t_0), …, ᾱ(t_{T-1}), 1]`` (the last is the clean image)."""
    cumprod = ddim.alphas_cumprod.double()
    return torch.cat([cumprod[ddim.timesteps.long()], torch.ones(1, dtype=torch.float64)])


def to_epsilon(output: torch.Tensor, latents: torch.Tensor, alpha_bar: float, prediction_type: str) -> torch.Tensor:
    """The model's prediction as ε̂ (noise), whatever it predicts (ε, v or x₀)."""
    a, s = alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return a * output + s * latents
    return (latents - a * output) / s  # "sample": the model predicts x0


def ddim_move(latents: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """The deterministic DDIM update from noise level ᾱ_from to ᾱ_to (either direction), given ε̂."""
    x0 = (latents - (1 - alpha_from) ** 0.5 * eps) / alpha_from ** 0.5
    return alpha_to ** 0.5 * x0 + (1 - alpha_to) ** 0.5 * eps


class GuidedDenoiser(Denoiser):
    """`dit_lens.sampling.denoiser.Denoiser` with the guided ε that inversion and h-Edit step with.

    Args:
        lens: A PixArt-family `dit_lens.Lens`.
        prompts: The prompts whose embeddings calls use (indices into them pick a row's prompt).
        prediction_type: What the model predicts (the sampler's ``prediction_type``), for `epsilon`.
    """

    def __init__(self, lens: Lens, prompts: Sequence[str], prediction_type: str = "epsilon") -> None:
        super().__init__(lens, prompts)
        self.prediction_type = prediction_type

    def guided(self, latents: torch.Tensor, timestep: Any, prompt: int, guidance: float) -> torch.Tensor:
        """The model's prediction (float64) at `latents` under prompt index `prompt` with classifier-free
        guidance `guidance` (1: the conditional prediction alone): ε, v or x₀ as trained, or a flow's velocity."""
        n = latents.shape[0]
        if not self.lens.family.cfg:  # guidance-distilled: one call, the scale an input of the model
            return self.raw(latents.float(), timestep, [prompt] * n, guidance).double()
        if guidance == 1.0:
            return self.raw(latents.float(), timestep, [prompt] * n).double()
        both = self.raw(torch.cat([latents, latents]).float(), timestep, [None] * n + [prompt] * n).double()
        return mix(both[:n], both[n:], guidance)

    def epsilon(self, latents: torch.Tensor, timestep: int, prompt: int, guidance: float,
                alpha_bar: float) -> torch.Tensor:
        """ε̂ (float64) at `latents` under prompt index `prompt` with classifier-free guidance `guidance`
        (1: the conditional prediction alone), the model taken to be at noise level `alpha_bar`."""
        raw = self.guided(latents, timestep, prompt, guidance)
        return to_epsilon(raw, latents.double(), alpha_bar, self.prediction_type)
