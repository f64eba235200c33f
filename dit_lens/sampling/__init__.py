"""Sampling outside the traced loop: the pipeline's transformer called directly, guidance mixing, the
deterministic samplers inversion runs backwards, the differentiable loop, and the one decode.

- `denoiser`: `Denoiser`, the transformer called as the pipeline's loop calls it; `mix`, classifier-free guidance;
- `ddim`: the DDIM sampler and its helpers (`ddim_scheduler`, `inversion_scheduler`, `ddim_move`,
  `to_epsilon`, `alpha_bars`), `GuidedDenoiser` (guided ε for inversion and h-Edit);
- `flow`: the flow-matching Euler sampler, run in either direction;
- `loop`: `DifferentiableSampler`, the pipeline's loop and decode in plain torch, and `frozen`;
- `images`: `check_images`, `encode`, `noised`, `noise_field`, `check_levels`, and the one decode (`decode_images` in torch, `decode` to numpy).
"""

from .ddim import GuidedDenoiser, ddim_scheduler, inversion_scheduler
from .denoiser import Denoiser, mix
from .images import check_images, check_levels, decode, decode_images, encode, noise_field, noised
from .loop import DifferentiableSampler, frozen

__all__ = ["Denoiser", "DifferentiableSampler", "GuidedDenoiser", "check_images", "check_levels", "ddim_scheduler", "decode",
           "decode_images", "encode", "frozen", "inversion_scheduler", "mix", "noise_field", "noised"]
