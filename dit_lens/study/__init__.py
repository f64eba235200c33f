"""Declarative studies: a `Study` value (`declaration`), its cells (`cells`), metrics (`metrics`) and
command line (`cli`)."""

from .declaration import (
    DYE_METRICS,
    ENDOSCOPY_CONTEXTS,
    SETTING_AXES,
    STEER_METRICS,
    ConceptPair,
    Study,
    floors,
    pick_settings,
    run_study,
    window_label,
    window_layers,
    window_steps,
)

__all__ = ["DYE_METRICS", "ENDOSCOPY_CONTEXTS", "SETTING_AXES", "STEER_METRICS", "ConceptPair", "Study", "floors",
           "pick_settings", "run_study", "window_label", "window_layers", "window_steps"]
