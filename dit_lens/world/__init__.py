"""The embedded endoscopy world: procedural images, a trained PixArt-alpha, an oracle and two segmenters,
and the endoscopy domain (`domain`: prompt templates, dye classes and metrics) the engine takes as values.

`dit_lens.load("embedded")` opens the pipeline; `load_oracle` / `load_segmenter` (lesions) /
`load_anatomy_segmenter` (lumen, pyloric ring or z-line) the judges.
Nothing is loaded at import time. The experiments run on the world live in `dit_lens.experiments`.
"""

from .data import world_split, write_world_split
from .judges import load_anatomy_segmenter, load_oracle, load_segmenter
from .procedural import CONTEXTS, LABELS, Samples, caption, render
from .domain import (DYE_CLASSES, DYE_FLOORS, DYE_METRICS, ENDOSCOPY_CONTEXTS, MIN_LESION_PIXELS, PROMPT_TEMPLATE,
                     endoscopy_pair)

__all__ = ["CONTEXTS", "DYE_CLASSES", "DYE_FLOORS", "DYE_METRICS", "ENDOSCOPY_CONTEXTS", "LABELS", "MIN_LESION_PIXELS",
           "PROMPT_TEMPLATE", "Samples", "caption", "endoscopy_pair", "load_anatomy_segmenter", "load_oracle",
           "load_segmenter", "render", "world_split", "write_world_split"]
