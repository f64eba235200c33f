"""Interventions: values that change a run (`steer`, `blend`), applied in (original, edited) pairs
by `generate`."""
