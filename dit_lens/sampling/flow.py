"""The flow-matching sampler that inversion runs backwards, for families that sample by flow matching
(SANA, SD3).

A rectified flow moves a latent from noise (σ = 1) to the image (σ = 0) along the model's velocity
v̂ ≈ ε − x₀: the Euler step of ``FlowMatchEulerDiscreteScheduler`` is ``z_{i+1} = z_i + (σ_{i+1} − σ_i)·v̂(z_i, t_i)``.
Inversion runs it backwards, ``z_i = z_{i+1} − (σ_{i+1} − σ_i)·v̂(z_{i+1}, t_i)``, taking the velocity at
the known latent instead of the unknown one: the same one approximation DDIM inversion makes (and, as
there, ``refine`` fixed-point iterations solve the step exactly). Regeneration and the editors then run
the pipeline's own loop with the same Euler sampler, so replaying the trajectory reconstructs the input.

Examples:
    >>> from dit_lens import load
    >>> from dit_lens.model.sana import SanaSpec, build_sana
    >>> lens = load(build_sana(SanaSpec(num_layers=1)))
    >>> sampler = flow_scheduler(lens, 4)
    >>> [round(s, 3) for s in sampler.sigmas.tolist()]  # σ at each level, the clean image last
    [1.0, 0.858, 0.602, 0.009, 0.0]
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..model.lens import Lens
from ..validate import check_int

__all__ = ["flow_move", "flow_scheduler"]


def flow_scheduler(lens: Lens, num_inference_steps: int, scheduler: Any = None) -> Any:
    """The deterministic flow-matching Euler sampler (default: a copy of the pipeline's) set to
    `num_inference_steps` steps; samplers it cannot run backwards are refused with the reason."""
    T = check_int(num_inference_steps, "num_inference_steps", minimum=1)
    lens.family.needs("flow-matching inversion", sampling="flow")
    base = lens.pipeline.scheduler if scheduler is None else scheduler
    name = type(base).__name__
    if name != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"flow-matching inversion runs the Euler step of FlowMatchEulerDiscreteScheduler backwards; "
                         f"the sampler is a {name}. Pass scheduler=FlowMatchEulerDiscreteScheduler(shift=...) with "
                         f"the model's shift (the same sampler then regenerates and edits)")
    if base.config.get("stochastic_sampling"):
        raise ValueError(f"{name} with stochastic sampling has no deterministic step to invert; use "
                         f"stochastic_sampling=False")
    from ..trace.runner import timestep_kwargs

    sampler = copy.deepcopy(base)
    sampler.set_timesteps(T, device="cpu", **timestep_kwargs(lens, sampler, T))  # the pipeline's schedule
    if hasattr(sampler, "set_begin_index"):
        sampler.set_begin_index(0)
    return sampler


def flow_move(latents: torch.Tensor, velocity: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """The Euler update from noise level σ_from to σ_to (either direction), given the velocity."""
    return latents + (sigma_to - sigma_from) * velocity
