import numpy as np
import pytest

from dit_lens.experiments.downstream import DownstreamConfig, f1_score, roc_auc


def test_auc_equals_the_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = np.round(rng.uniform(size=60), 1)  # ties included
    labels = rng.integers(0, 2, size=60)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(scores, labels) == pytest.approx(pairwise)
    assert roc_auc(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0])) == 1.0
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_auc(np.array([0.1, 0.2]), np.array([1, 1]))


def test_f1():
    scores, labels = np.array([0.9, 0.7, 0.2, 0.6]), np.array([1, 0, 1, 0])
    # predictions 1,1,0,1: tp 1, fp 2, fn 1
    assert f1_score(scores, labels) == pytest.approx(2 / (2 + 2 + 1))
    assert f1_score(np.zeros(3), np.array([1, 0, 1])) == 0.0


def test_config_validation():
    with pytest.raises(ValueError, match="real_per_class"):
        DownstreamConfig(real_per_class=0)
    with pytest.raises(ValueError, match="train_seeds"):
        DownstreamConfig(train_seeds=())
    with pytest.raises(ValueError, match="blend must be"):
        DownstreamConfig(blend=1.2)
    assert DownstreamConfig(blend=0.3).context()["blend"] == 0.3  # part of the folder key
    with pytest.raises(ValueError, match="inversion_steps must be an integer >= 1"):
        DownstreamConfig(inversion_steps=0)
    with pytest.raises(ValueError, match="inversion_steps must be an integer"):
        DownstreamConfig(inversion_steps=2.5)


def test_config_key_covers_every_setting_but_the_seeds_and_the_model():
    from types import SimpleNamespace

    lens = SimpleNamespace(fingerprint="model-a")
    cfg = DownstreamConfig()
    assert DownstreamConfig(inversion_steps=10).key(lens) != cfg.key(lens)
    assert DownstreamConfig(alpha=1.0).key(lens) != cfg.key(lens)
    assert DownstreamConfig(train_seeds=(3,)).key(lens) == cfg.key(lens)
    assert cfg.key(SimpleNamespace(fingerprint="model-b")) != cfg.key(lens)


def test_default_inversion_steps_are_the_registered_methods_default():
    from dit_lens.methods import get

    assert get("pnp").settings({})["inversion_steps"] == DownstreamConfig().inversion_steps
    assert get("hedit").settings({})["inversion_steps"] == DownstreamConfig().inversion_steps == 50


def test_config_refuses_unknown_or_positive_test_negatives():
    with pytest.raises(ValueError, match="not world classes"):
        DownstreamConfig(test_negatives=("normal colon",))
    with pytest.raises(ValueError, match="other than the source"):
        DownstreamConfig(test_negatives=("polyps",))


@pytest.fixture(scope="module")
def detector_lens():
    """A tiny model whose images the detector can take (32 × 32 latents), shared by this module's tests."""
    from dit_lens import load
    from dit_lens.model.builders import PixArtSpec, build_pixart

    return load(build_pixart(PixArtSpec(num_layers=2, num_heads=2, head_dim=8, sample_size=32, patch_size=4), seed=0))


TINY = dict(real_per_class=3, synthetic_per_class=2, test_per_class=3, train_seeds=(0, 1), detector_steps=4,
            vector_seeds=1, num_inference_steps=2, inversion_steps=2,
            test_negatives=("normal cecum", "ulcerative colitis"))


def test_run_downstream_end_to_end_resumes_and_refuses_another_run(tmp_path, detector_lens):
    import xarray as xr

    from dit_lens.experiments.downstream import run_downstream

    lens = detector_lens
    cfg = DownstreamConfig(**TINY)
    result = run_downstream(cfg, lens, tmp_path, progress=False)
    assert isinstance(result, xr.Dataset)
    assert list(result["arm"].values) == ["real", "reprompt", "pnp", "hedit", "medsteer"]
    assert result["auc_per_seed"].shape == (5, 2) and result["auc_by_negative"].shape == (5, 2)
    assert ((result["auc"] >= 0) & (result["auc"] <= 1)).all()
    assert "6 polyps" in result.attrs["test"] and "ulcerative colitis" in result.attrs["test"]
    cells = sorted(p.name for p in (tmp_path / "cells").glob("*.json"))  # beside them: hidden lock files
    assert len(cells) == 10
    # each synthetic arm is its registered method's pairs: re-prompting is the reprompt baseline
    from dit_lens.interventions.generate import reprompt

    synthetic = np.load(tmp_path / "synthetic.npz")
    direct = reprompt(lens, "An endoscopic image of polyps", "An endoscopic image of normal cecum",
                      seeds=[20_000, 20_001], num_inference_steps=2, batch_size=8, progress=False)
    np.testing.assert_array_equal(synthetic["reprompt_steered"], direct["image"].sel(branch="edited").values[0])
    np.testing.assert_array_equal(synthetic["reprompt_unsteered"], direct["image"].sel(branch="original").values[0])
    assert not np.array_equal(synthetic["medsteer_steered"], synthetic["medsteer_unsteered"])
    # PnP and h-Edit: their registered methods at the default settings, `inversion_steps` from the config
    from dit_lens.methods import MethodContext, get
    from dit_lens.world.domain import endoscopy_pair

    direct = get("pnp").run(lens, endoscopy_pair("polyps", "normal cecum"), [20_000, 20_001], {"inversion_steps": 2},
                            context=MethodContext(num_inference_steps=2, batch_size=8))
    np.testing.assert_array_equal(synthetic["pnp_steered"], direct["image"].sel(branch="edited").values[0])
    np.testing.assert_array_equal(synthetic["pnp_unsteered"], direct["image"].sel(branch="original").values[0])
    np.testing.assert_array_equal(synthetic["hedit_unsteered"], synthetic["pnp_unsteered"])  # the same originals
    assert not np.array_equal(synthetic["hedit_steered"], synthetic["hedit_unsteered"])
    assert sorted(synthetic.files) == sorted(f"{arm}_{branch}" for arm in ("reprompt", "pnp", "hedit", "medsteer")
                                             for branch in ("unsteered", "steered"))
    # a re-run reuses every finished cell and the synthetic images
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()}
    again = run_downstream(cfg, lens, tmp_path, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()} == stamp
    xr.testing.assert_equal(again["auc"], result["auc"])
    from dit_lens import metrics as M

    for baseline in ("reprompt", "pnp", "hedit"):  # paired by training seed, bootstrap intervals
        name = f"auc_gain_medsteer_vs_{baseline}"
        assert np.isfinite(float(result[name]))
        gain = result["auc_per_seed"].sel(arm="medsteer") - result["auc_per_seed"].sel(arm=baseline)
        expected = M.estimate(gain.values)
        assert float(result[name]) == pytest.approx(float(gain.mean())) == pytest.approx(expected.value)
        assert (float(result[f"{name}_low"]), float(result[f"{name}_high"])) == pytest.approx((expected.low, expected.high))
    # more training seeds reuse the finished ones
    more = run_downstream(DownstreamConfig(**{**cfg.__dict__, "train_seeds": (0, 1, 2)}), lens, tmp_path, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir() if p in stamp} == stamp
    assert len(list((tmp_path / "cells").iterdir())) == 15 and more["auc_per_seed"].shape == (5, 3)
    cells = sorted(p.name for p in (tmp_path / "cells").glob("*.json"))
    with pytest.raises(ValueError, match="downstream made for other settings"):
        run_downstream(DownstreamConfig(**{**cfg.__dict__, "alpha": 1.0}), lens, tmp_path, progress=False)
    with pytest.raises(ValueError, match="other settings"):  # the PnP and h-Edit pairs depend on it
        run_downstream(DownstreamConfig(**{**cfg.__dict__, "inversion_steps": 3}), lens, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == cells


ARMS_ = ("reprompt", "pnp", "hedit", "medsteer")


def _sealed_set(folder, arrays, arms=ARMS_):
    """A synthetic set written as this version writes one: the arrays and their sealed record."""
    from dit_lens.storage import digest, write_record

    np.savez_compressed(folder / "synthetic.npz", **arrays)
    write_record(folder / "synthetic.json", {"arms": list(arms), "arrays_digest": digest({}, arrays)})


@pytest.mark.parametrize("layout", ["per_arm", "source_steered_target"])
def test_a_set_of_an_earlier_version_is_refused_and_left_as_it_is(tmp_path, detector_lens, layout):
    """Sets stored before the sealed record (fewer arms with a .digest file, or the layout before the methods
    registry) are caches: refused with the files to delete, never completed or changed."""
    from dit_lens.storage import claimed
    from dit_lens.experiments.downstream import identity, run_downstream

    cfg = DownstreamConfig(**TINY)
    claimed(tmp_path, "downstream", identity=identity(cfg, detector_lens))  # a folder dit-lens made for it
    images = np.full((2, 32, 32, 3), 0.5, np.float32)
    if layout == "per_arm":
        np.savez_compressed(tmp_path / "synthetic.npz", **{f"{arm}_{b}": images for arm in ("reprompt", "medsteer")
                                                           for b in ("unsteered", "steered")})
        (tmp_path / "synthetic.npz.digest").write_text("blake2b:0")
    else:
        np.savez_compressed(tmp_path / "synthetic.npz", source=images, steered=images, target=images)
    stored = lambda: {p.name: p.read_bytes() for p in tmp_path.glob("synthetic*")}  # noqa: E731
    before = stored()
    with pytest.raises(ValueError, match=r"synthetic.npz has no record synthetic.json.*earlier dit-lens.*delete "
                                         r".*synthetic.npz and synthetic.json.*Nothing was changed"):
        run_downstream(cfg, detector_lens, tmp_path, progress=False)
    assert stored() == before and not (tmp_path / "cells").exists()


def test_a_stored_set_that_does_not_fit_the_config_or_its_record_is_refused_not_changed(tmp_path, detector_lens):
    from dit_lens.storage import claimed
    from dit_lens.experiments.downstream import identity, run_downstream

    cfg = DownstreamConfig(**TINY)
    claimed(tmp_path, "downstream", identity=identity(cfg, detector_lens))  # a folder dit-lens made for it
    path = tmp_path / "synthetic.npz"
    names = [f"{arm}_{b}" for arm in ARMS_ for b in ("unsteered", "steered")]
    wrong = np.full((3, 32, 32, 3), 0.5, np.float32)  # three pairs, the config asks for two
    _sealed_set(tmp_path, {name: wrong for name in names})
    content = path.read_bytes()
    with pytest.raises(ValueError, match="synthetic_per_class = 2 needs; delete"):
        run_downstream(cfg, detector_lens, tmp_path, progress=False)
    assert path.read_bytes() == content and not (tmp_path / "cells").exists()
    right = np.full((2, 32, 32, 3), 0.5, np.float32)
    _sealed_set(tmp_path, {name: right for name in names[:-1]})  # medsteer_steered missing
    with pytest.raises(ValueError, match="not the arms"):
        run_downstream(cfg, detector_lens, tmp_path, progress=False)
    _sealed_set(tmp_path, {name: right for name in names})
    np.savez_compressed(path, **{name: right + (name == names[0]) for name in names})  # changed after sealing
    content = path.read_bytes()
    with pytest.raises(ValueError, match="fails its digest"):
        run_downstream(cfg, detector_lens, tmp_path, progress=False)
    assert path.read_bytes() == content and not (tmp_path / "cells").exists()


def test_downstream_files_are_checked_against_their_digests(tmp_path):
    import json

    from dit_lens.experiments.downstream import _read_record, _write_record

    path = tmp_path / "cells" / "medsteer_seed0.json"
    record = {"auc": 0.9, "f1": 0.8, "auc_by_negative": {"normal cecum": 0.95}}
    _write_record(path, record)
    assert _read_record(path) == record
    data = json.loads(path.read_text())
    data["auc"] = 0.99  # an edited number that still parses
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"downstream cell .*medsteer_seed0\.json fails its digest"):
        _read_record(path)
    path.write_text('{"auc": ')
    with pytest.raises(ValueError, match=r"medsteer_seed0\.json is unreadable or truncated.*delete that file"):
        _read_record(path)
