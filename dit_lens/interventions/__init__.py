"""Interventions: values that change a run, and `generate`, which applies them in (original, edited)
pairs.

- `base`: the protocol (`SiteEdit`, `LatentEdit`, `Guidance`, `Composite`, `EditContext`),
  `register` / `from_dict`;
- `reweight`: `Reweight`, an attention-weight edit (the smallest site edit);
- `steer`: `Steer`, MedSteer's gated removal along a concept vector (a site edit), optionally in a region;
- `blend`: `Blend`, latent blending (a latent edit);
- `drift`: `LatentDrift`, latent drifting: a constant δ added to every reverse step and to z_T;
- `feature`: `FeatureEdit`, scaling, clamping or ablating sparse-autoencoder features (a site edit);
- `inject`: `Inject`, copying the original branch's site output (everywhere, or outside a region);
- `region`: `Region` masks (image or token grid, shared or per seed) and `Confine`, which keeps the
  original outside a region;
- `noise_edit`: `OptimizedNoise`, the latent edit that starts the edited branch from optimised initial
  noise (made by `dit_lens.optimize_noise`; its objectives are in `dit_lens.optimize`);
- `regulate`: `AttentionRegulation`, mask-guided attention regulation, and its modules;
- `guide`: how a run makes the differentiable denoiser calls a `Guidance` edit needs;
- `plan`: `Plan`, the runner: a list of edits as hooks, a step-end pass and corrections in one pipeline call;
- `generate`: pairs from one batched pass, and the re-prompting baseline laid out the same way.
"""

from .base import Composite, EditContext, Guidance, Intervention, LatentEdit, SiteEdit, from_dict, register
from .blend import Blend
from .drift import LatentDrift
from .feature import FeatureEdit
from .inject import Inject
from .noise_edit import OptimizedNoise
from .region import Confine, Region
from .reweight import Reweight
from .regulate import AttentionRegulation, EnergyGuidance, GateSelfAttention, RegionReweight
from .steer import Steer

__all__ = ["AttentionRegulation", "Blend", "Composite", "Confine", "EditContext", "EnergyGuidance", "FeatureEdit",
           "GateSelfAttention", "Guidance", "Inject", "Intervention", "LatentDrift", "LatentEdit", "OptimizedNoise",
           "Region", "RegionReweight", "Reweight", "SiteEdit", "Steer", "from_dict", "register"]
