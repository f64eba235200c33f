"""Optimisation through the differentiable loop (`dit_lens.sampling.DifferentiableSampler`).

- `noise`: `optimize_noise`, initial-noise optimisation on the sphere of each seed's own draw, which
  returns the latent edit `dit_lens.OptimizedNoise` (`dit_lens.interventions.noise_edit`);
- `objectives`: what it maximises: an objective of the generated image (`class_probability`) or of the
  prompted words' attention (`attention_concentration`).
"""

from ..interventions.noise_edit import OptimizedNoise
from .noise import optimize_noise
from .objectives import AttentionConcentration, ClassProbability, attention_concentration, class_probability

__all__ = ["AttentionConcentration", "ClassProbability", "OptimizedNoise", "attention_concentration",
           "class_probability", "optimize_noise"]
