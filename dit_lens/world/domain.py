"""The endoscopy domain: prompt templates, dye classes and the metrics that only make sense here.

The study engine speaks of labels, prompt templates and classifiers; what is endoscopy-specific
lives with the world and is passed to it as values: `endoscopy_pair` builds a `ConceptPair` with
the world's phrasings, `DYE_METRICS` are extra metrics a study declares, `DYE_FLOORS` what a dye
setting must reach to be picked.

Examples:
    >>> endoscopy_pair("polyps", "normal cecum").source_prompt
    'An endoscopic image of polyps'
    >>> [m.name for m in DYE_METRICS]
    ['dye_detection_rate', 'polyp_kept']
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xarray as xr

from ..methods.pair import ConceptPair
from ..metrics import Judged, Metric
from .procedural import CONTEXTS

__all__ = ["ENDOSCOPY_CONTEXTS", "PROMPT_TEMPLATE", "DYE_CLASSES", "MIN_LESION_PIXELS", "DYE_METRICS", "DYE_FLOORS",
           "endoscopy_pair", "dyed", "dye_detection_rate", "polyp_kept"]

#: Context phrasings varied across the contrastive prompts of a vector ("{}" is the label): the
#: phrasings the embedded world was trained with.
ENDOSCOPY_CONTEXTS = CONTEXTS
#: The generation prompt.
PROMPT_TEMPLATE = "An endoscopic image of {}"
#: Classes in which the tissue is stained.
DYE_CLASSES = ("dyed lifted polyps", "dyed resection margins")
#: A steered image "keeps the polyp" when the segmenter still finds at least this many pixels.
MIN_LESION_PIXELS = 16


def endoscopy_pair(source: str, target: str) -> ConceptPair:
    """A concept pair phrased as the embedded world's captions."""
    return ConceptPair(source, target, contexts=ENDOSCOPY_CONTEXTS, prompt=PROMPT_TEMPLATE)


def dyed(probs: xr.DataArray, *, branch: str = "edited", dye_classes: Sequence[str] = DYE_CLASSES) -> xr.DataArray:
    """1.0 where the `branch` image is still classified as a dyed class ``(prompt, seed)``.

    The dye detection rate is ``estimate(dyed(probs))``.
    """
    labels = [str(c) for c in probs["class"].values]
    dye_classes = list(dye_classes)
    if not dye_classes or not set(dye_classes) <= set(labels):
        raise ValueError(f"dye classes {dye_classes} must be among the classifier's labels {labels}")
    predicted = probs.sel(branch=branch).idxmax("class")
    return predicted.isin(dye_classes).astype(np.float64).rename("dyed")


def dye_detection_rate(judged: Judged) -> xr.DataArray:
    """Per pair: the counterfactual is still classified as dyed (lower is better)."""
    return dyed(judged.probs)


def polyp_kept(judged: Judged) -> xr.DataArray:
    """Per pair: the counterfactual reads as polyps and the segmenter still finds the lesion."""
    predicted = judged.probs.sel(branch="edited").idxmax("class")
    lesion = judged.masks.sel(branch="edited").sum(("y", "x")) >= MIN_LESION_PIXELS
    return ((predicted == "polyps") & lesion).astype(np.float64).rename("polyp_kept")


#: Extra metrics of a dye study: `Study(..., metrics=DYE_METRICS, require=DYE_FLOORS)`.
DYE_METRICS = (Metric("dye_detection_rate", dye_detection_rate), Metric("polyp_kept", polyp_kept))
#: A dye setting must flip and keep the polyp.
DYE_FLOORS = {"flip_rate": 0.8, "polyp_kept": 0.8}
