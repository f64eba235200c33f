import pickle

import numpy as np
import pytest
import torch
import xarray as xr

from dit_lens.readouts.vector_files import export_authors, import_authors, load_vector, save_vector
from dit_lens.readouts.vectors import concept_vector

DIMS = ("prompt", "seed", "step", "layer", "channel")


def capture_like(values, prompts=None, seeds=None):
    p, s, t, l, c = values.shape
    return xr.Dataset(
        {"attn2": (DIMS, values)},
        coords={"prompt": prompts or [f"p{i}" for i in range(p)], "seed": seeds or list(range(s)),
                "step": range(t), "layer": range(l)},
        attrs={"model_fingerprint": "abc"},
    )


def test_vector_is_normalized_mean_difference():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(size=(2, 3, 4, 5, 6)), rng.normal(size=(3, 3, 4, 5, 6))
    vec = concept_vector(capture_like(pos), capture_like(neg))
    diff = pos.mean((0, 1)) - neg.mean((0, 1))
    expected = diff / np.linalg.norm(diff, axis=-1, keepdims=True)
    assert vec.dims == ("step", "layer", "channel")
    np.testing.assert_allclose(vec.values, expected, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vec.values, axis=-1), 1.0, rtol=1e-5)
    assert vec.attrs["model_fingerprint"] == "abc"
    assert "p0" in vec.attrs["positive_prompts"]


def test_mismatched_or_degenerate_captures_are_errors():
    rng = np.random.default_rng(0)
    a = capture_like(rng.normal(size=(1, 2, 4, 5, 6)))
    with pytest.raises(ValueError, match="differ along 'step'"):
        concept_vector(a, capture_like(rng.normal(size=(1, 2, 3, 5, 6))))
    with pytest.raises(ValueError, match="zero"):
        concept_vector(a, a)
    with pytest.raises(ValueError, match="no variable 'ff'"):
        concept_vector(a, a, site="ff")
    with pytest.raises(TypeError, match="ds_neg"):
        concept_vector(a, "not a dataset")
    with pytest.raises(ValueError, match="needs non-empty"):
        concept_vector(object(), positive=["x"], negative=[], seeds=[0])


def test_save_load_round_trip_keeps_provenance_and_refuses_overwrite(tmp_path):
    rng = np.random.default_rng(1)
    vec = concept_vector(capture_like(rng.normal(size=(1, 2, 3, 4, 5))), capture_like(rng.normal(size=(1, 2, 3, 4, 5))))
    path = save_vector(vec, tmp_path / "v.zarr")
    back = load_vector(path)
    np.testing.assert_array_equal(back.values, vec.values)
    assert back.attrs["model_fingerprint"] == "abc"
    with pytest.raises(FileExistsError):
        save_vector(vec, path)
    np.testing.assert_array_equal(load_vector(path).values, vec.values)  # untouched


def test_authors_format_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    vec = concept_vector(capture_like(rng.normal(size=(1, 2, 3, 4, 5))), capture_like(rng.normal(size=(1, 2, 3, 4, 5))))
    path = export_authors(vec, tmp_path / "vec.pkl")
    with open(path, "rb") as fh:
        raw = pickle.load(fh)
    assert sorted(raw) == [0, 1, 2] and len(raw[0]["blocks"]) == 4
    assert isinstance(raw[1]["blocks"][2], torch.Tensor)
    np.testing.assert_array_equal(raw[1]["blocks"][2].numpy(), vec.values[1, 2])
    np.testing.assert_array_equal(import_authors(path).values, vec.values)


def test_authors_format_with_numpy_blocks_and_bad_files(tmp_path):
    table = {s: {"blocks": [np.eye(3, dtype=np.float32)[(s + l) % 3] for l in range(2)]} for s in (1, 0)}
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(table))
    vec = import_authors(tmp_path / "a.pkl")
    assert vec.shape == (2, 2, 3) and float(vec.values[1, 1, 2]) == 1.0
    (tmp_path / "b.pkl").write_bytes(pickle.dumps({0: [1, 2]}))
    with pytest.raises(ValueError, match="authors' format"):
        import_authors(tmp_path / "b.pkl")
    nan = {0: {"blocks": [np.full(3, np.nan, np.float32)]}}
    (tmp_path / "c.pkl").write_bytes(pickle.dumps(nan))
    with pytest.raises(ValueError, match="NaN"):
        import_authors(tmp_path / "c.pkl")


def test_vector_from_a_lens_matches_raw_hook_means(tiny_lens, tmp_path, monkeypatch):
    from reference import attn2_token_means

    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path))
    pos, neg, seeds, T = ["a red polyp", "a polyp"], ["normal mucosa", "a normal cecum"], [0, 1, 2], 3
    vec = concept_vector(tiny_lens, positive=pos, negative=neg, seeds=seeds, num_inference_steps=T, batch_size=2)
    mean = lambda prompts: np.mean([attn2_token_means(tiny_lens, p, s, T, 4.5) for p in prompts for s in seeds], axis=0)
    diff = mean(pos) - mean(neg)
    np.testing.assert_allclose(vec.values, diff / np.linalg.norm(diff, axis=-1, keepdims=True), rtol=1e-3, atol=1e-5)
    assert vec.attrs["model_fingerprint"] == tiny_lens.fingerprint
    assert "a red polyp" in vec.attrs["positive_prompts"]
