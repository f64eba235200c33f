"""The MedSteer method: the source prompt's image, and the same run steered along the concept vector.

Settings: where (layer ``window``, fractions of the depth), when (step window ``steps``, fractions of
the denoising steps), ``alpha``, the update variant (``renormalize``), latent ``blend`` and the
number of ``vector_seeds`` per prompt of the concept vector, which comes from the context's
`Vectors` (so captures are made once per pair and reused).

Examples:
    >>> from dit_lens.methods import get
    >>> [(a.name, a.flag, a.default) for a in get("medsteer").axes][:2]
    [('window', 'windows', ((0.0, 1.0),)), ('steps', 'step-windows', ((0.0, 1.0),))]
    >>> get("medsteer").cell_name(0, {"window": (0.0, 1.0), "steps": (0.0, 1.0), "alpha": 3.0,
    ...                                "renormalize": False, "blend": 0.0, "vector_seeds": 32})
    'p0_w0-1_t0-1_a3_r0_n32'
"""

from __future__ import annotations

from typing import Any, Sequence

import xarray as xr

from ..interventions.generate import generate
from ..interventions.steer import Steer
from .axes import (BLEND, Axis, check_count, check_flag, check_real, check_window, layer_window, parse_flag,
                   parse_window, window_label, window_layers, window_steps)
from .pair import ConceptPair
from .registry import VECTOR_SEEDS, Method, MethodContext, register

__all__ = ["MEDSTEER", "medsteer_steer"]


def _steps(window: tuple, lens: Any, num_inference_steps: int) -> list[int] | str:
    return window_steps(window, num_inference_steps) or "all"


AXES = (
    layer_window("window", default=((0.0, 1.0),), key="w", flag="windows",
                 help="layer windows START:STOP (fractions of the depth)"),
    Axis("steps", default=((0.0, 1.0),), parse=parse_window, check=check_window, key="t", label=window_label,
         flag="step-windows", resolve=_steps,
         help="when to steer: step windows START:STOP (fractions of the steps; 0:1 = all)"),
    Axis("alpha", default=(2.5,), parse=float, check=check_real, key="a", flag="alphas", help="steering strengths"),
    Axis("renormalize", default=(False,), parse=parse_flag, check=check_flag, key="r",
         help="update variants (true = the authors' renormalised update)"),
    BLEND,
    Axis(VECTOR_SEEDS, default=(16,), parse=int, check=check_count, key="n", fixed=True,
         help="seeds per prompt for the concept vector"),
)


def medsteer_steer(lens: Any, pair: ConceptPair, settings: dict, context: MethodContext) -> Steer:
    """The `Steer` of one setting: the pair's vector from its first ``vector_seeds`` seeds."""
    if context.vectors is None:
        raise ValueError("medsteer needs concept vectors: pass MethodContext(vectors=Vectors(lens, seeds=...))")
    return Steer(
        context.vectors(pair, settings[VECTOR_SEEDS]), alpha=settings["alpha"],
        layers=window_layers(settings["window"], lens.num_layers),
        steps=window_steps(settings["steps"], context.num_inference_steps),
        renormalize=settings["renormalize"], name=pair.name,
    )


def _run(lens: Any, pair: ConceptPair, seeds: Sequence[int], settings: dict, *, context: MethodContext) -> xr.Dataset:
    return generate(lens, pair.source_prompt, seeds=seeds, steer=medsteer_steer(lens, pair, settings, context),
                    num_inference_steps=context.num_inference_steps, guidance_scale=context.guidance_scale,
                    record_gates=context.record_gates, blend=settings["blend"], batch_size=context.batch_size,
                    progress=context.progress)


def _extras(lens: Any, pair: ConceptPair, settings: dict, *, context: MethodContext) -> dict:
    """The vector's mean cosine (over steps and layers) to the vector from every captured seed."""
    vector = context.vectors(pair, settings[VECTOR_SEEDS])
    return {"vector_cosine_to_largest": float((vector * context.vectors(pair)).sum("channel").mean())}


#: Cells keep the names they had before methods existed (no prefix).
MEDSTEER = register(Method("medsteer", AXES, _run, extras=_extras, cell_prefix="",
                           description="steer the source prompt's run along the concept vector (MedSteer)"))
