"""What a result says was done to it, in words: every edit with its method, site, layers, steps and
strength, a steer's vector provenance, and the sampler. Read from the result's own attrs (what
`dit_lens.generate` recorded), never from the arguments a caller remembers, so a figure of a study's
picked setting and one of the demo cannot carry the same title.

Examples:
    >>> describe_edit({"type": "Steer", "name": "polyps -> normal cecum", "site": "attn2", "alpha": 3.0,
    ...                "layers": [0, 1, 2], "steps": None, "update": "paper", "halves": "both",
    ...                "vector_source": {"positive_prompts": ["a", "b"], "positive_seeds": [0, 1, 2],
    ...                                  "negative_prompts": ["c", "d"], "negative_seeds": [0, 1, 2]}})
    "MedSteer 'polyps -> normal cecum': α=3 at attn2, layers 0-2, all steps, paper update; vector from 2 positive vs 2 negative prompts × seeds 0-2"
    >>> describe_edit({"type": "LatentDrift", "delta": 0.1, "steps": None, "initial": True})
    'LatentDrift: delta=0.1, initial=True'
    >>> span([0, 1, 2, 5, 7, 8])
    '0-2, 5, 7-8'
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import xarray as xr

from ..trace.attrs import read

__all__ = ["describe_edit", "describe_result", "span"]

_HIDDEN = {"type", "record", "reads_original", "name", "vector_shape", "vector_digest", "model_fingerprint"}


def span(values: Sequence[int] | None, everything: str = "all") -> str:
    """Integers as runs: ``[0, 1, 2, 5]`` → ``"0-2, 5"``; None → `everything`."""
    if values is None:
        return everything
    values = sorted(int(v) for v in values)
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _steer(s: dict) -> str:
    name = f" {s['name']!r}" if s.get("name") else ""
    where = f"layers {span(s.get('layers'))}" if s.get("layers") is not None else "all layers"
    when = f"steps {span(s.get('steps'))}" if s.get("steps") is not None else "all steps"
    halves = "" if s.get("halves", "both") == "both" else f", {s['halves']} half"
    region = ", in a region" if s.get("region") else ""
    text = f"MedSteer{name}: α={s['alpha']:g} at {s['site']}, {where}, {when}, {s.get('update', 'paper')} update{halves}{region}"
    source = s.get("vector_source") or {}
    if source.get("positive_prompts") is not None:
        text += (f"; vector from {len(source['positive_prompts'])} positive vs {len(source['negative_prompts'])} "
                 f"negative prompts × seeds {span(source.get('positive_seeds'))}")
    return text


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "{...}" if len(json.dumps(value)) > 40 else json.dumps(value)
    if isinstance(value, list) and len(value) > 6:
        return f"[{len(value)} values]" if not all(isinstance(v, int) for v in value) else f"[{span(value)}]"
    return str(value)


def describe_edit(settings: dict) -> str:
    """One edit's settings (``Intervention.settings()``) in words."""
    if settings.get("type") == "Steer":
        return _steer(settings)
    shown = [f"{k}={_value(v)}" for k, v in settings.items() if k not in _HIDDEN and v is not None and v != []]
    name = f" {settings['name']!r}" if settings.get("name") else ""
    return f"{settings.get('type', 'edit')}{name}: " + ", ".join(shown) if shown else f"{settings.get('type', 'edit')}{name}"


def describe_result(out: xr.Dataset) -> str:
    """Every edit of a `generate` result and its sampler, in words (``"no edit"`` for a plain run)."""
    edits = read(out.attrs, "edits", [])
    if not edits and out.attrs.get("steers"):
        edits = read(out.attrs, "steers")
    words = "; ".join(describe_edit(e) for e in edits) or "no edit"
    extra = []
    if out.attrs.get("target_prompt"):
        extra.append(f"re-prompted to {out.attrs['target_prompt']!r}")
    if "num_inference_steps" in out.attrs:
        extra.append(f"{out.attrs['num_inference_steps']} steps, guidance {float(out.attrs.get('guidance_scale', 1)):g}")
    return words + (f" ({'; '.join(extra)})" if extra else "")
