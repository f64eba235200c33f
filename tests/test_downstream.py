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


def test_config_key_is_an_earlier_versions_at_the_default_inversion_steps():
    import hashlib
    import json
    from types import SimpleNamespace

    lens = SimpleNamespace(fingerprint="model-a")
    cfg = DownstreamConfig()
    earlier = {k: v for k, v in cfg.context().items() if k != "inversion_steps"}  # before PnP and h-Edit
    blob = json.dumps({"config": earlier, "model": "model-a"}, sort_keys=True)
    assert cfg.key(lens) == hashlib.blake2b(blob.encode(), digest_size=6).hexdigest()
    assert cfg.context()["inversion_steps"] == 50
    assert DownstreamConfig(inversion_steps=10).key(lens) != cfg.key(lens)
    assert DownstreamConfig(train_seeds=(3,)).key(lens) == cfg.key(lens)
    assert cfg.key(SimpleNamespace(fingerprint="model-b")) != cfg.key(lens)


def test_default_inversion_steps_are_the_registered_methods_default():
    from dit_lens.methods import get
    from dit_lens.experiments.downstream import LATER_FIELDS

    assert get("pnp").settings({})["inversion_steps"] == DownstreamConfig().inversion_steps
    assert get("hedit").settings({})["inversion_steps"] == LATER_FIELDS["inversion_steps"] == 50


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


@pytest.fixture(scope="module")
def fresh_default_steps(tmp_path_factory, detector_lens):
    """A folder run by this version at the default inversion steps (an earlier version's folder holds the default)."""
    from dit_lens.experiments.downstream import run_downstream

    import torch

    cfg = DownstreamConfig(**{**TINY, "inversion_steps": 50})
    folder = tmp_path_factory.mktemp("fresh")
    threads = torch.get_num_threads()  # one thread, as conftest's `one_torch_thread` gives each test
    torch.set_num_threads(1)
    try:
        run_downstream(cfg, detector_lens, folder, progress=False)
    finally:
        torch.set_num_threads(threads)
    return cfg, folder


@pytest.mark.parametrize("layout", ["per_arm", "source_steered_target"])
def test_a_folder_of_an_earlier_version_is_completed_not_overwritten(tmp_path, detector_lens, fresh_default_steps, layout):
    """A folder whose synthetic set was stored before PnP and h-Edit (arms real, reprompt, medsteer)
    keeps its cells and stored arrays; the missing arms are made and added."""
    import json
    import shutil

    from dit_lens.storage import MARKER
    from dit_lens.experiments.downstream import _digest, _digest_path, _read_synthetic, run_downstream

    lens = detector_lens
    cfg, fresh = fresh_default_steps
    made = dict(np.load(fresh / "synthetic.npz"))
    old = tmp_path / "old"  # what an earlier version left
    (old / "cells").mkdir(parents=True)
    for name in (MARKER, "downstream.json"):  # a folder dit-lens made, for the same settings
        shutil.copy(fresh / name, old)
    for arm in ("real", "reprompt", "medsteer"):
        for seed in (0, 1):
            shutil.copy(fresh / "cells" / f"{arm}_seed{seed}.json", old / "cells")
    if layout == "per_arm":
        stored = {k: v for k, v in made.items() if k.split("_")[0] in ("reprompt", "medsteer")}
    else:  # before the methods registry: one shared set of originals
        stored = {"source": made["medsteer_unsteered"], "steered": made["medsteer_steered"],
                  "target": made["reprompt_steered"]}
    np.savez_compressed(old / "synthetic.npz", **stored)
    if layout == "per_arm":
        _digest_path(old / "synthetic.npz").write_text(_digest((old / "synthetic.npz").read_bytes()))
    before = _read_synthetic(old / "synthetic.npz")
    assert sorted(before) == ["medsteer", "reprompt"]  # read, but not complete
    stamp = {p: p.stat().st_mtime_ns for p in (old / "cells").iterdir()}

    with pytest.raises(ValueError, match=r"other settings \(config.inversion_steps: 50 there, 2 now"):
        run_downstream(DownstreamConfig(**TINY), lens, old, progress=False)  # 2 inversion steps, not 50
    assert sorted(dict(np.load(old / "synthetic.npz"))) == sorted(stored)
    result = run_downstream(cfg, lens, old, progress=False)
    assert list(result["arm"].values) == ["real", "reprompt", "pnp", "hedit", "medsteer"]
    assert {p: p.stat().st_mtime_ns for p in (old / "cells").iterdir() if p in stamp} == stamp  # reused
    assert sorted(p.name for p in (old / "cells").glob("*.json")) == sorted(
        p.name for p in (fresh / "cells").glob("*.json"))
    completed = dict(np.load(old / "synthetic.npz"))
    for name, images in stored.items():  # every stored array kept as it was
        np.testing.assert_array_equal(completed[name], images)
    for name in ("pnp_unsteered", "pnp_steered", "hedit_unsteered", "hedit_steered"):  # made as a fresh run makes them
        np.testing.assert_allclose(completed[name], made[name], rtol=0, atol=1e-5)  # (CPU float rounding aside)
    assert sorted(completed) == sorted([*stored, "pnp_unsteered", "pnp_steered", "hedit_unsteered", "hedit_steered"])
    assert _digest_path(old / "synthetic.npz").read_text() == _digest((old / "synthetic.npz").read_bytes())
    after = _read_synthetic(old / "synthetic.npz")
    assert sorted(after) == ["hedit", "medsteer", "pnp", "reprompt"]
    for arm in before:
        for a, b in zip(after[arm], before[arm]):
            np.testing.assert_array_equal(a, b)
    assert json.loads((old / "downstream.json").read_text())["config"]["inversion_steps"] == 50
    # the reused cells give the fresh folder's numbers
    again = run_downstream(cfg, lens, fresh, progress=False)
    reused = ["real", "reprompt", "medsteer"]
    np.testing.assert_array_equal(result["auc_per_seed"].sel(arm=reused).values, again["auc_per_seed"].sel(arm=reused).values)


def test_a_stored_set_that_does_not_fit_the_config_is_refused_not_changed(tmp_path, detector_lens):
    from dit_lens.storage import claimed
    from dit_lens.experiments.downstream import _read_synthetic, identity, run_downstream

    cfg = DownstreamConfig(**TINY)
    claimed(tmp_path, "downstream", identity=identity(cfg, detector_lens))  # a folder dit-lens made for it
    images = np.full((2, 32, 32, 3), 0.5, np.float32)
    path = tmp_path / "synthetic.npz"
    np.savez_compressed(path, reprompt_unsteered=images, medsteer_unsteered=images, medsteer_steered=images)
    with pytest.raises(ValueError, match="reprompt_unsteered without reprompt_steered; delete it"):
        _read_synthetic(path)
    content = path.read_bytes()
    with pytest.raises(ValueError, match="reprompt_unsteered without reprompt_steered"):
        run_downstream(cfg, detector_lens, tmp_path, progress=False)
    assert path.read_bytes() == content and not (tmp_path / "cells").exists()
    wrong = np.full((3, 32, 32, 3), 0.5, np.float32)  # three pairs, the config asks for two
    names = [f"{arm}_{b}" for arm in ("reprompt", "pnp", "hedit", "medsteer") for b in ("unsteered", "steered")]
    np.savez_compressed(path, **{name: wrong for name in names})
    content = path.read_bytes()
    with pytest.raises(ValueError, match="synthetic_per_class = 2 needs; delete it"):
        run_downstream(cfg, detector_lens, tmp_path, progress=False)
    assert path.read_bytes() == content


def test_synthetic_sets_written_before_the_methods_registry_are_read_back(tmp_path):
    from dit_lens.experiments.downstream import _read_synthetic

    source, steered, target = (np.full((2, 4, 4, 3), v, np.float32) for v in (0.1, 0.2, 0.3))
    np.savez_compressed(tmp_path / "synthetic.npz", source=source, steered=steered, target=target)
    arms = _read_synthetic(tmp_path / "synthetic.npz")
    assert [float(a[0, 0, 0, 0]) for a in arms["reprompt"]] == pytest.approx([0.1, 0.3])
    assert [float(a[0, 0, 0, 0]) for a in arms["medsteer"]] == pytest.approx([0.1, 0.2])
    assert sorted(arms) == ["medsteer", "reprompt"]  # no PnP or h-Edit pairs: `run_downstream` makes them


def test_synthetic_sets_checked_against_their_digest(tmp_path):
    from dit_lens.experiments.downstream import _digest, _digest_path, _read_synthetic

    path = tmp_path / "synthetic.npz"
    np.savez_compressed(path, **{f"{arm}_{b}": np.zeros((1, 4, 4, 3), np.float32)
                                 for arm in ("reprompt", "pnp", "hedit", "medsteer") for b in ("unsteered", "steered")})
    _digest_path(path).write_text(_digest(path.read_bytes()))
    assert sorted(_read_synthetic(path)) == ["hedit", "medsteer", "pnp", "reprompt"]
    _digest_path(path).write_text(_digest(b"something else"))
    with pytest.raises(ValueError, match="fails its checksum"):
        _read_synthetic(path)


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
