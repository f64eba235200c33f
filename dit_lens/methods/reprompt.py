"""The re-prompting baseline: the source prompt's image and the target prompt's from the same seed.

Both come from one batched pass (`dit_lens.interventions.generate.reprompt`), so latent ``blend``
treats the target image as `generate` treats a steered one.

Examples:
    >>> from dit_lens.methods import get
    >>> get("reprompt").cell_name(2, {"blend": 0.3})
    'reprompt_p2_b0.3'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import xarray as xr

from ..interventions.generate import reprompt
from .axes import BLEND
from .pair import ConceptPair
from .registry import Method, MethodContext, register

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["REPROMPT"]


def _run(lens: Lens, pair: ConceptPair, seeds: Sequence[int], settings: dict, *, context: MethodContext) -> xr.Dataset:
    return reprompt(lens, pair.source_prompt, pair.target_prompt, seeds=seeds, blend=settings["blend"],
                    num_inference_steps=context.num_inference_steps, guidance_scale=context.guidance_scale,
                    batch_size=context.batch_size, progress=context.progress)


REPROMPT = register(Method("reprompt", (BLEND,), _run, description="the target prompt from the same seed"))
