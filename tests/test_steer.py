import json

import numpy as np
import pytest
import torch
import xarray as xr

from dit_lens.interventions.steer import Steer, steer_tokens


def unit_vector(steps=4, layers=3, channels=16, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(steps, layers, channels)).astype(np.float32)
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    return xr.DataArray(v, dims=("step", "layer", "channel"), coords={"step": range(steps), "layer": range(layers)})


def test_update_removes_only_the_positive_component():
    torch.manual_seed(0)
    h = torch.randn(2, 10, 8)
    v = torch.nn.functional.normalize(torch.randn(8), dim=0)
    new, gate = steer_tokens(h, v, alpha=1.0)
    dots = h @ v
    assert torch.equal(gate, dots.clamp(min=0))
    positive = dots > 0
    # alpha = 1 removes the aligned component exactly; negative tokens pass bit-for-bit
    torch.testing.assert_close((new @ v)[positive], torch.zeros(int(positive.sum())), atol=1e-6, rtol=0)
    assert torch.equal(new[~positive], h[~positive])
    # the orthogonal part is kept
    ortho = lambda x: x - (x @ v).unsqueeze(-1) * v
    torch.testing.assert_close(ortho(new), ortho(h), atol=1e-5, rtol=1e-5)


def test_renormalize_keeps_token_norms_and_alpha_zero_is_identity():
    torch.manual_seed(1)
    h = torch.randn(3, 7, 8)
    v = torch.nn.functional.normalize(torch.randn(8), dim=0)
    new, _ = steer_tokens(h, v, alpha=2.5, renormalize=True)
    torch.testing.assert_close(new.norm(dim=-1), h.norm(dim=-1))
    assert not torch.allclose(new, h)
    for renorm in (False, True):
        same, _ = steer_tokens(h, v, alpha=0.0, renormalize=renorm)
        assert torch.equal(same, h)


def test_steer_validates_its_fields():
    vec = unit_vector()
    with pytest.raises(ValueError, match="alpha"):
        Steer(vec, alpha=float("nan"))
    with pytest.raises(ValueError, match=r"layers \[5\] are not in the vector"):
        Steer(vec, layers=[1, 5])
    with pytest.raises(ValueError, match="empty"):
        Steer(vec, steps=[])
    bad = vec.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Steer(bad)
    with pytest.raises(ValueError, match="dims"):
        Steer(vec.transpose("layer", "step", "channel"))


def test_steer_checks_fit_with_the_model(tiny_lens):
    Steer(unit_vector()).check(tiny_lens, 4)
    with pytest.raises(ValueError, match="16 wide"):
        Steer(unit_vector(channels=12)).check(tiny_lens, 4)
    with pytest.raises(ValueError, match="model has 3 blocks"):
        Steer(unit_vector(layers=5), layers=[4]).check(tiny_lens, 4)
    with pytest.raises(ValueError, match=r"indexed by step position.*compute the vector with num_inference_steps=4"):
        Steer(unit_vector(steps=2)).check(tiny_lens, 4)
    Steer(unit_vector(steps=2), reuse_last_step=True).check(tiny_lens, 4)


def test_steer_is_a_printable_saveable_value(tmp_path):
    steer = Steer(unit_vector(), alpha=2, layers=(2, 1), renormalize=True, name="polyps−normal cecum")
    assert repr(steer) == (
        "Steer('polyps−normal cecum', alpha=2, site=attn2, layers=[1, 2], steps=all, renormalize=True, "
        "vector=4 steps × 3 layers × 16 channels)"
    )
    json.dumps(steer.to_dict())
    back = Steer.from_dict(steer.to_dict())
    assert repr(back) == repr(steer) and back.vector_digest == steer.vector_digest
    np.testing.assert_array_equal(back.vector.values, steer.vector.values)
    path = steer.save(tmp_path / "steer.json")
    assert Steer.load(path).settings() == steer.settings()
    with pytest.raises(FileExistsError):
        steer.save(path)
    data = steer.to_dict()
    data["vector"]["data"][0][0][0] += 0.5
    with pytest.raises(ValueError, match="corrupt"):
        Steer.from_dict(data)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"the saved Steer .*bad.json is unreadable or truncated"):
        Steer.load(tmp_path / "bad.json")


def test_a_saved_steer_loads_equal_and_other_settings_differ(tmp_path):
    steer = Steer(unit_vector(), alpha=2.0, layers=[1])
    steer.save(tmp_path / "s.json")
    loaded = Steer.load(tmp_path / "s.json")
    assert loaded == steer and hash(loaded) == hash(steer)
    assert Steer(unit_vector(), alpha=2.5, layers=[1]) != steer
    assert Steer(unit_vector(seed=1), alpha=2.0, layers=[1]) != steer


def steered(lens, steer, seeds=(0,), **kwargs):
    from dit_lens.interventions.generate import generate

    out = generate(lens, "a red polyp", seeds=list(seeds), steer=steer, num_inference_steps=4, progress=False, **kwargs)
    return out.isel(prompt=0)


def test_one_cell_steers_as_its_one_layer_one_step_window(tiny_lens):
    vec = unit_vector(channels=16)
    cell = steered(tiny_lens, Steer(vec, alpha=6.0, cells=[(1, 1)]))["image"]
    window = steered(tiny_lens, Steer(vec, alpha=6.0, layers=(1,), steps=(1,)))["image"]
    assert np.array_equal(cell.sel(branch="edited").values, window.sel(branch="edited").values)
    assert not np.array_equal(cell.sel(branch="edited").values, cell.sel(branch="original").values)


def test_cells_steer_those_cells_and_no_others(tiny_lens):
    vec = unit_vector(channels=16)
    # (on this model and vector the gates are open at layer 1 in steps 0-2 and at layer 2 in steps 2-3)
    cells = steered(tiny_lens, Steer(vec, alpha=6.0, cells=[(2, 2), (0, 1)]), record_gates=True)
    # each cell's window alone, applied one after the other: the same edit at the same two cells
    each = steered(tiny_lens, [Steer(vec, alpha=6.0, layers=(1,), steps=(0,)),
                               Steer(vec, alpha=6.0, layers=(2,), steps=(2,))])["image"]
    assert np.array_equal(cells["image"].sel(branch="edited").values, each.sel(branch="edited").values)
    # the windows' product also steers (0, 2) and (2, 1)
    product = steered(tiny_lens, Steer(vec, alpha=6.0, layers=(1, 2), steps=(0, 2)))["image"]
    assert not np.array_equal(cells["image"].sel(branch="edited").values, product.sel(branch="edited").values)
    gate = cells["gate"].isel(seed=0)  # recorded where steered, nothing elsewhere
    assert gate.sel(step=2, layer=2).values.any() and gate.sel(step=0, layer=1).values.any()
    assert not gate.sel(step=2, layer=1).values.any()


def test_cells_at_alpha_zero_leave_the_run_bit_identical(tiny_lens):
    out = steered(tiny_lens, Steer(unit_vector(channels=16), alpha=0.0, cells=[(0, 0), (3, 2)]), seeds=(0, 1))["image"]
    assert np.array_equal(out.sel(branch="edited").values, out.sel(branch="original").values)


def test_cells_are_validated(tiny_lens):
    vec = unit_vector()
    with pytest.raises(ValueError, match="either cells or the layers and steps windows"):
        Steer(vec, cells=[(0, 1)], layers=[1])
    with pytest.raises(ValueError, match="either cells or the layers and steps windows"):
        Steer(vec, cells=[(0, 1)], steps=[0])
    with pytest.raises(ValueError, match="Steer.cells is empty"):
        Steer(vec, cells=[])
    with pytest.raises(ValueError, match=r"layers \[7\] that are not in the vector"):
        Steer(vec, cells=[(0, 1), (0, 7)])
    for bad in ([(0, 1, 2)], [(0.5, 1)], [(True, 1)], ["01"], [3]):
        with pytest.raises(ValueError, match=r"\(step, layer\) pairs of integers"):
            Steer(vec, cells=bad)
    with pytest.raises(ValueError, match="list of"):
        Steer(vec, cells="01")
    with pytest.raises(ValueError, match="steps must be >= 0"):
        Steer(vec, cells=[(-1, 0)])
    with pytest.raises(ValueError, match=r"cells \[\[3, 0\]\] go beyond the run's 3 steps"):
        Steer(vec, cells=[(0, 1), (3, 0)]).check(tiny_lens, 3)
    Steer(vec, cells=[(0, 1), (3, 0)]).check(tiny_lens, 4)


def test_cells_are_part_of_the_value(tmp_path):
    steer = Steer(unit_vector(), alpha=2, cells=[(np.int64(3), 2), (0, 1), (0, 1)])
    assert steer.cells == ((0, 1), (3, 2))
    assert repr(steer) == ("Steer(alpha=2, site=attn2, cells=[(0, 1), (3, 2)], renormalize=False, "
                           "vector=4 steps × 3 layers × 16 channels)")
    assert steer.settings()["cells"] == [[0, 1], [3, 2]]
    assert steer.steered_layers() == [1, 2] and steer.steered_steps(4) == [0, 3] and steer.steered_steps(2) == [0]
    json.dumps(steer.to_dict())
    loaded = Steer.load(steer.save(tmp_path / "cells.json"))
    assert loaded == steer and hash(loaded) == hash(steer) and loaded.cells == steer.cells
    assert steer != Steer(unit_vector(), alpha=2, cells=[(0, 1)])
    assert steer != Steer(unit_vector(), alpha=2, layers=[1, 2], steps=[0, 3])
    # a steer saved before cells existed has no such key, and loads as the windows it was
    windows = Steer(unit_vector(), alpha=2, layers=[1])
    old = windows.to_dict()
    assert "cells" not in old
    assert Steer.from_dict(old) == windows and Steer.from_dict(old).cells is None
