"""CaptureStore: creation, resume bookkeeping, identity checks, corruption, cache location."""

import numpy as np
import pytest
import xarray as xr

from dit_lens.trace.store import CaptureStore, CaptureStoreError, VariableSpec, cache_root, content_key


def make(path, identity=None, shape=(2, 3, 4)):
    prompts, seeds = ["a polyp", "normal"][: shape[0]], list(range(shape[1]))
    template = xr.Dataset(coords={"prompt": prompts, "seed": seeds})
    spec = VariableSpec("attn2", ("prompt", "seed", "channel"), shape, (1, 1, shape[2]))
    return CaptureStore.open(path, template, spec, identity=identity or {"steps": 2},
                             attrs={"model_fingerprint": "abc"})


def files(path):
    return {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_cells_are_written_marked_and_read_back_with_plain_xarray(tmp_path):
    store = make(tmp_path / "s.zarr")
    assert store.missing() == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    store.write((1, 2), np.arange(4.0))
    with pytest.raises(CaptureStoreError, match=r"cells \[\(0, 0\)\] were not all written"):
        store.mark_done([(1, 2), (0, 0)])  # (0, 0) was never written: nothing is marked
    assert len(store.missing()) == 6
    store.write((0, 0), np.full(4, np.nan))  # NaN is never stored as a finished result
    with pytest.raises(CaptureStoreError, match=r"cells \[\(0, 0\)\] .* holds NaN or inf values"):
        store.mark_done([(1, 2), (0, 0)])
    store.mark_done([(1, 2)])
    assert store.verify() == {}
    reopened = make(tmp_path / "s.zarr")
    assert reopened.missing() == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    ds = xr.open_zarr(tmp_path / "s.zarr")
    assert ds.attrs["model_fingerprint"] == "abc" and ds.attrs["identity"] == {"steps": 2}
    assert ds.attn2.dims == ("prompt", "seed", "channel")
    assert ds.attn2.sel(prompt="normal", seed=2).values.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert np.isnan(ds.attn2.sel(prompt="normal", seed=0).values).all()  # never written
    assert np.isnan(ds.attn2.sel(prompt="a polyp", seed=0).values).all()  # written as NaN, not done
    assert "done" not in reopened.dataset()
    assert not list(tmp_path.glob(".*tmp"))  # the build folder was moved into place


def test_identity_is_compared_and_the_store_never_changed(tmp_path):
    store = make(tmp_path / "s.zarr", {"steps": 2, "scheduler": {"beta": 0.1, "order": 2}})
    store.write((0, 0), np.ones(4))
    store.mark_done([(0, 0)])
    before = files(tmp_path / "s.zarr")
    with pytest.raises(CaptureStoreError, match=r"scheduler\.beta: store has 0\.1, asked for 0\.2"):
        make(tmp_path / "s.zarr", {"steps": 2, "scheduler": {"beta": 0.2, "order": 2}})
    with pytest.raises(CaptureStoreError, match="incompatible"):
        make(tmp_path / "s.zarr", {"steps": 3})
    assert files(tmp_path / "s.zarr") == before


def test_identity_survives_json_round_trip(tmp_path):
    identity = {"layers": (0, 1), "clip": float("-inf"), "n": np.int64(3)}
    make(tmp_path / "s.zarr", identity)
    assert make(tmp_path / "s.zarr", identity).missing()  # reopens: same identity


def test_shape_mismatch_under_same_identity_is_corrupt(tmp_path):
    make(tmp_path / "s.zarr")
    with pytest.raises(CaptureStoreError, match="corrupt"):
        make(tmp_path / "s.zarr", shape=(2, 3, 5))


def test_unreadable_and_foreign_folders_are_errors(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(CaptureStoreError, match="not a readable Zarr store"):
        make(tmp_path / "plain")
    xr.Dataset({"v": ("x", [1.0])}).to_zarr(tmp_path / "other.zarr", zarr_format=2)
    with pytest.raises(CaptureStoreError, match="not a dit-lens capture store"):
        make(tmp_path / "other.zarr")
    assert (tmp_path / "plain" / "x.bin").read_bytes() == b"\x00\x01"


def test_cache_root_and_content_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("DIT_LENS_CACHE")
    assert cache_root().name in ("cache", "dit-lens")
    assert content_key({"a": 1, "b": [2]}) == content_key({"b": [2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_variable_spec_validates():
    with pytest.raises(ValueError, match="same length"):
        VariableSpec("attn2", ("prompt", "seed"), (1, 1, 1), (1, 1, 1))
    with pytest.raises(ValueError, match="start with"):
        VariableSpec("attn2", ("seed", "prompt"), (1, 1), (1, 1))
