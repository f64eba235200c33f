"""Typed attrs: results keep numbers as numbers, lists as lists and settings as dicts.

Every result dit-lens makes (captures, vectors, generated pairs, edits, attention maps, studies)
records its provenance in ``attrs``. Values are stored as what they are, in the JSON types that Zarr
attrs keep: a seed list is a list of ints, an edit's settings a dict, a study's floors a dict of
floats. `typed` turns a value into that form (tuples become lists, NumPy scalars Python numbers,
non-finite floats strings, so a value reads back from a Zarr store equal to what was written).
`read` reads a structured attr from any dit-lens result: results made before attrs were typed
hold such values as JSON strings, and `read` decodes those. The model that made a result is recorded
under the keys in `PROVENANCE` (what ``Lens.provenance()`` returns). Importing this module registers
the result accessors (``ds.lens``, ``result.study``: `dit_lens.accessors`), so every result a
dit-lens function returns carries them.

netCDF keeps no nested attrs: before ``to_netcdf``, turn dict and list-of-dict values into JSON
strings (``{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in ds.attrs.items()}``);
`read` reads them back.

Examples:
    >>> attrs = {"seeds": typed((0, 1)), "settings": typed({"alpha": np.float32(3.0)})}
    >>> attrs
    {'seeds': [0, 1], 'settings': {'alpha': 3.0}}
    >>> read({"seeds": "[0, 1]"}, "seeds")  # as older results hold it
    [0, 1]
    >>> read({}, "seeds", [])
    []
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np

__all__ = ["PROVENANCE", "read", "typed"]

#: The attrs that name the model a result was made with and the dit-lens version (``Lens.provenance()``).
PROVENANCE = ("model_source", "model_fingerprint", "model_class", "denoiser_class", "lora", "num_layers", "width",
              "dit_lens_version")


def typed(value: Any) -> Any:
    """`value` as it reads back from JSON attrs (tuples -> lists, NumPy -> Python, non-finite -> str)."""
    if isinstance(value, Mapping):
        return {str(k): typed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [typed(v) for v in value]
    if isinstance(value, np.generic):
        return typed(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def read(attrs: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """The structured attr `key` (a list or dict) of a result, or `default` when it has none. A JSON
    string, as results made before attrs were typed hold such values, is decoded."""
    value = attrs.get(key, default)
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
