"""Fault cases of capture stores: values that diverged, store paths that are links or files, and chunks
holding NaN. Nothing wrong is ever stored as done or served."""

import os

import numpy as np
import pytest
import xarray as xr
import zarr

from dit_lens import capture
from dit_lens.validate import NonFiniteError
from dit_lens.trace.store import CaptureStoreError, DamagedStoreError

PROMPTS = ["a polyp", "normal mucosa"]


@pytest.mark.parametrize("reduce", ["mean", None])
def test_a_diverged_run_is_refused_and_nothing_is_stored_as_done(tiny_lens, tmp_path, reduce):
    store = tmp_path / "nan.zarr"
    with pytest.raises(NonFiniteError, match=r"NaN or inf .* nothing of these runs was stored: lower guidance_scale"):
        capture(tiny_lens, PROMPTS, seeds=[0, 1], num_inference_steps=2, guidance_scale=1e308, store=store,
                reduce=reduce)
    done = xr.open_zarr(store)["done"].values
    assert not done.any()  # asked again, the cells are computed again, never served from the store
    with pytest.raises(NonFiniteError):
        capture(tiny_lens, PROMPTS, seeds=[0, 1], num_inference_steps=2, guidance_scale=1e308, store=store,
                reduce=reduce)


def test_a_done_cell_holding_nan_is_refused_then_repaired(tiny_lens, tmp_path):
    store = tmp_path / "s.zarr"
    first = capture(tiny_lens, PROMPTS, seeds=[0], num_inference_steps=2, store=store).load()
    group = zarr.open_group(str(store), mode="r+", zarr_format=2)
    group["attn2"][1, 0, 0, 0] = np.nan  # a value that diverged, or was never written, in a finished cell
    with pytest.raises(DamagedStoreError, match=r"NaN or inf.*repair=True"):
        capture(tiny_lens, PROMPTS, seeds=[0], num_inference_steps=2, store=store)
    repaired = capture(tiny_lens, PROMPTS, seeds=[0], num_inference_steps=2, store=store, repair=True).load()
    np.testing.assert_array_equal(repaired.attn2.values, first.attn2.values)


def test_a_dangling_link_as_store_is_refused_clearly(tiny_lens, tmp_path):
    link = tmp_path / "store.zarr"
    os.symlink(tmp_path / "gone" / "elsewhere.zarr", link)
    with pytest.raises(CaptureStoreError, match=r"store .*store.zarr is a link to .*elsewhere.zarr, which does not exist"):
        capture(tiny_lens, PROMPTS, seeds=[0], num_inference_steps=2, store=link)
    assert link.is_symlink() and not (tmp_path / "gone").exists()


def test_a_file_as_store_is_refused_untouched(tiny_lens, tmp_path):
    path = tmp_path / "notes.zarr"
    path.write_text("mine")
    with pytest.raises(CaptureStoreError, match=r"is a file, not a capture store"):
        capture(tiny_lens, PROMPTS, seeds=[0], num_inference_steps=2, store=path)
    assert path.read_text() == "mine"


def test_the_progress_bars_of_a_concept_vector_say_which_side_they_capture(tiny_lens, capsys, monkeypatch):
    from dit_lens import concept_vector

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    concept_vector(tiny_lens, positive=["a polyp"], negative=["normal mucosa"], seeds=[0], num_inference_steps=2)
    err = capsys.readouterr().err
    assert "capture attn2 (positive prompts)" in err and "capture attn2 (negative prompts)" in err
