"""The inversion-based baselines as methods: Plug-and-Play (``pnp``) and h-Edit-D (``hedit``).

Each edits the *original* images of the very seeds MedSteer uses: the source prompt's image from the
study's own sampler (what `generate` returns as the original branch), DDIM-inverted under the source
prompt and edited toward the target prompt by `dit_lens.inversion.edit`. Rows are paired by seed
with every other method's, and the background metrics measure what inversion and editing together
changed, reconstruction error included.

Examples:
    >>> from dit_lens.methods import get
    >>> get("pnp").cell_name(0, get("pnp").settings())
    'pnp_p0_fw0-0.5_aw0-1_tf0.8_ta0.5_i50'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import xarray as xr

from ..interventions.generate import generate
from ..inversion.editors import edit
from .axes import Axis, check_count, check_fraction, check_real, layer_window, window_layers
from .pair import ConceptPair
from .registry import Method, MethodContext, register

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["HEDIT", "INVERSION_STEPS", "PNP", "originals"]


#: DDIM steps of the inversion and the edit (shared by every inversion-based method).
INVERSION_STEPS = Axis("inversion_steps", default=(50,), parse=int, check=check_count, key="i",
                       help="DDIM steps of the inversion and the edit")

PNP_AXES = (
    layer_window("feature_window", default=((0.0, 0.5),), key="fw", flag="feature-windows",
                 help="PnP: blocks whose outputs are injected, START:STOP (fractions of the depth)"),
    layer_window("attention_window", default=((0.0, 1.0),), key="aw", flag="attention-windows",
                 help="PnP: blocks whose self-attention weights are injected, START:STOP"),
    Axis("feature_fraction", default=(0.8,), parse=float, check=check_fraction, key="tf",
         help="PnP τ_f: fraction of the first steps with feature injection"),
    Axis("attention_fraction", default=(0.5,), parse=float, check=check_fraction, key="ta",
         help="PnP τ_A: fraction of the first steps with self-attention injection"),
    INVERSION_STEPS,
)

HEDIT_AXES = (
    Axis("source_guidance", default=(4.5,), parse=float, check=check_real, key="sg",
         help="h-Edit ŵ_orig: guidance of the source prediction in the editing term"),
    Axis("iterations", default=(1,), parse=int, check=check_count, key="k",
         help="h-Edit K: editing iterations per step"),
    Axis("skip", default=(0.3,), parse=float, check=check_fraction, key="sk",
         help="h-Edit: fraction of the first steps left unedited"),
    INVERSION_STEPS,
)


def originals(lens: Lens, pair: ConceptPair, seeds: Sequence[int], context: MethodContext) -> np.ndarray:
    """The source prompt's images of `seeds` ``(seeds, H, W, 3)``, as every method's original branch has them."""
    out = generate(lens, pair.source_prompt, seeds=seeds, num_inference_steps=context.num_inference_steps,
                   guidance_scale=context.guidance_scale, batch_size=context.batch_size, progress=context.progress)
    return out["image"].isel(prompt=0, branch=0).values


def _pairs(lens: Lens, pair: ConceptPair, seeds: Sequence[int], context: MethodContext, method: str,
           **settings: Any) -> xr.Dataset:
    images = originals(lens, pair, seeds, context)
    out = edit(lens, images, source=pair.source_prompt, target=pair.target_prompt, method=method,
               num_inference_steps=settings.pop("inversion_steps"), guidance_scale=context.guidance_scale,
               batch_size=context.batch_size or 8, progress=context.progress, seeds=list(seeds), **settings)
    out.attrs.update(originals_steps=context.num_inference_steps, originals_guidance=context.guidance_scale)
    return out


def _run_pnp(lens: Lens, pair: ConceptPair, seeds: Sequence[int], settings: dict, *, context: MethodContext) -> xr.Dataset:
    return _pairs(lens, pair, seeds, context, "pnp", inversion_steps=settings["inversion_steps"],
                  feature_fraction=settings["feature_fraction"], attention_fraction=settings["attention_fraction"],
                  feature_layers=window_layers(settings["feature_window"], lens.num_layers),
                  attention_layers=window_layers(settings["attention_window"], lens.num_layers))


def _run_hedit(lens: Lens, pair: ConceptPair, seeds: Sequence[int], settings: dict, *, context: MethodContext) -> xr.Dataset:
    return _pairs(lens, pair, seeds, context, "hedit", inversion_steps=settings["inversion_steps"],
                  source_guidance=settings["source_guidance"], iterations=settings["iterations"], skip=settings["skip"])


PNP = register(Method("pnp", PNP_AXES, _run_pnp,
                      description="Plug-and-Play: invert the original, inject its features into the target's run"))
HEDIT = register(Method("hedit", HEDIT_AXES, _run_hedit,
                        description="h-Edit-D: invert the original, reconstruction path plus a target editing term"))
