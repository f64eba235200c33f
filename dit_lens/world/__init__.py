"""The embedded endoscopy world: procedural images, a trained PixArt-alpha, an oracle and a segmenter.

`dit_lens.load("embedded")` opens the pipeline; `load_oracle` / `load_segmenter` the judges.
Nothing is loaded at import time.
"""

from .judges import load_oracle, load_segmenter
from .procedural import CONTEXTS, LABELS, Samples, caption, render

__all__ = ["CONTEXTS", "LABELS", "Samples", "caption", "load_oracle", "load_segmenter", "render"]
