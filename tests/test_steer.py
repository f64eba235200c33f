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
