"""Interventions: values that change a run, and `generate`, which applies them in (original, edited)
pairs.

- `base`: the protocol (`SiteEdit`, `LatentEdit`, `EditContext`), `register` / `from_dict`, and
  `Reweight`, an attention-weight edit;
- `steer`: `Steer`, MedSteer's gated removal along a concept vector (a site edit);
- `blend`: `Blend`, latent blending (a latent edit);
- `generate`: pairs from one batched pass, and the re-prompting baseline laid out the same way.
"""

from .base import EditContext, Intervention, LatentEdit, Reweight, SiteEdit, from_dict, register
from .blend import Blend
from .steer import Steer

__all__ = ["Blend", "EditContext", "Intervention", "LatentEdit", "Reweight", "SiteEdit", "Steer", "from_dict",
           "register"]
