"""Declarative studies: a `Study` value (`declaration`), its cells (`cells`), `run_study` (`run`) and the
command line (`cli`). The methods a study compares come from `dit_lens.methods`, what it measures from
`dit_lens.metrics`."""

from ..methods import ConceptPair, window_label, window_layers, window_steps
from .declaration import DEFAULT_FLOORS, Study, floors, pick_settings
from .run import run_study
from ..metrics import STANDARD_METRICS, Judged, Metric

__all__ = ["ConceptPair", "DEFAULT_FLOORS", "Judged", "Metric", "STANDARD_METRICS", "Study", "floors",
           "pick_settings", "run_study", "window_label", "window_layers", "window_steps"]
