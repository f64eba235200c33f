"""Typed attrs: values keep their types through a Zarr store, and older JSON-string attrs still read."""

import json

import numpy as np
import pytest
import xarray as xr

from dit_lens.trace.attrs import read, typed
from dit_lens.views.describe import describe_result


def test_typed_values_read_back_from_zarr_as_written(tmp_path):
    attrs = {
        "seeds": typed((3, np.int64(4))),
        "edits": typed([{"type": "Steer", "alpha": np.float32(2.5), "layers": (0, 1), "region": None}]),
        "floors": typed({"flip_rate": 0.9}),
        "nan": typed(float("nan")),
    }
    assert attrs["seeds"] == [3, 4] and isinstance(attrs["edits"][0]["alpha"], float)
    assert attrs["nan"] == "nan"
    xr.Dataset({"x": ("i", [1.0])}, attrs=attrs).to_zarr(tmp_path / "a.zarr", zarr_format=2)
    assert xr.open_zarr(tmp_path / "a.zarr").attrs == attrs


def test_read_decodes_json_strings_of_older_results_and_leaves_plain_text():
    old = {"seeds": json.dumps([1, 2]), "edits": json.dumps([{"type": "Steer", "alpha": 3.0}]),
           "note": "[not json", "prompt": "an image"}
    assert read(old, "seeds") == [1, 2]
    assert read(old, "edits")[0]["alpha"] == 3.0
    assert read(old, "note") == "[not json" and read(old, "prompt") == "an image"
    assert read(old, "missing", []) == [] and read(old, "missing") is None


@pytest.mark.parametrize("encode", [typed, json.dumps])
def test_describe_reads_typed_and_json_string_edits(encode):
    edits = [{"type": "Steer", "name": "polyps", "site": "attn2", "layers": [0, 1, 2], "steps": None, "alpha": 3.0}]
    out = xr.Dataset(attrs={"edits": encode(edits), "num_inference_steps": 20, "guidance_scale": 4.5})
    text = describe_result(out)
    assert text == "MedSteer 'polyps': α=3 at attn2, layers 0-2, all steps, paper update (20 steps, guidance 4.5)"
