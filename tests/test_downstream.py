import numpy as np
import pytest

from dit_lens.world.downstream import DownstreamConfig, f1_score, roc_auc


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


def test_config_refuses_unknown_or_positive_test_negatives():
    with pytest.raises(ValueError, match="not world classes"):
        DownstreamConfig(test_negatives=("normal colon",))
    with pytest.raises(ValueError, match="other than the source"):
        DownstreamConfig(test_negatives=("polyps",))


def test_run_downstream_end_to_end_resumes_and_refuses_another_run(tmp_path):
    import xarray as xr

    from dit_lens import load
    from dit_lens.model.builders import PixArtSpec, build_pixart
    from dit_lens.world.downstream import run_downstream

    lens = load(build_pixart(PixArtSpec(num_layers=2, num_heads=2, head_dim=8, sample_size=32, patch_size=4), seed=0))
    cfg = DownstreamConfig(real_per_class=3, synthetic_per_class=2, test_per_class=3, train_seeds=(0, 1),
                           detector_steps=4, vector_seeds=1, num_inference_steps=2,
                           test_negatives=("normal cecum", "ulcerative colitis"))
    result = run_downstream(cfg, lens, tmp_path, progress=False)
    assert isinstance(result, xr.Dataset)
    assert list(result["arm"].values) == ["real", "reprompt", "medsteer"]
    assert result["auc_per_seed"].shape == (3, 2) and result["auc_by_negative"].shape == (3, 2)
    assert ((result["auc"] >= 0) & (result["auc"] <= 1)).all()
    assert "6 polyps" in result.attrs["test"] and "ulcerative colitis" in result.attrs["test"]
    cells = sorted(p.name for p in (tmp_path / "cells").glob("*.json"))  # beside them: hidden lock files
    assert len(cells) == 6
    # each synthetic arm is its registered method's pairs: re-prompting is the reprompt baseline
    from dit_lens.interventions.generate import reprompt

    synthetic = np.load(tmp_path / "synthetic.npz")
    direct = reprompt(lens, "An endoscopic image of polyps", "An endoscopic image of normal cecum",
                      seeds=[20_000, 20_001], num_inference_steps=2, batch_size=8, progress=False)
    np.testing.assert_array_equal(synthetic["reprompt_steered"], direct["image"].sel(branch="steered").values[0])
    np.testing.assert_array_equal(synthetic["reprompt_unsteered"], direct["image"].sel(branch="unsteered").values[0])
    assert not np.array_equal(synthetic["medsteer_steered"], synthetic["medsteer_unsteered"])
    # a re-run reuses every finished cell and the synthetic images
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()}
    again = run_downstream(cfg, lens, tmp_path, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()} == stamp
    xr.testing.assert_equal(again["auc"], result["auc"])
    assert np.isfinite(float(result["auc_gain_medsteer_vs_reprompt"]))
    gain = result["auc_per_seed"].sel(arm="medsteer") - result["auc_per_seed"].sel(arm="reprompt")
    assert float(result["auc_gain_medsteer_vs_reprompt"]) == pytest.approx(float(gain.mean()))
    # more training seeds reuse the finished ones
    more = run_downstream(DownstreamConfig(**{**cfg.__dict__, "train_seeds": (0, 1, 2)}), lens, tmp_path, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir() if p in stamp} == stamp
    assert len(list((tmp_path / "cells").iterdir())) == 9 and more["auc_per_seed"].shape == (3, 3)
    cells = sorted(p.name for p in (tmp_path / "cells").glob("*.json"))
    with pytest.raises(ValueError, match="another downstream run"):
        run_downstream(DownstreamConfig(**{**cfg.__dict__, "alpha": 1.0}), lens, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == cells


def test_synthetic_sets_written_before_the_methods_registry_are_read_back(tmp_path):
    from dit_lens.world.downstream import _read_synthetic

    source, steered, target = (np.full((2, 4, 4, 3), v, np.float32) for v in (0.1, 0.2, 0.3))
    np.savez_compressed(tmp_path / "synthetic.npz", source=source, steered=steered, target=target)
    arms = _read_synthetic(tmp_path / "synthetic.npz")
    assert [float(a[0, 0, 0, 0]) for a in arms["reprompt"]] == pytest.approx([0.1, 0.3])
    assert [float(a[0, 0, 0, 0]) for a in arms["medsteer"]] == pytest.approx([0.1, 0.2])


def test_downstream_files_are_checked_against_their_digests(tmp_path):
    import json

    from dit_lens.world.downstream import _read_record, _write_record

    path = tmp_path / "cells" / "medsteer_seed0.json"
    record = {"auc": 0.9, "f1": 0.8, "auc_by_negative": {"normal cecum": 0.95}}
    _write_record(path, record)
    assert _read_record(path) == record
    data = json.loads(path.read_text())
    data["record"]["auc"] = 0.99  # an edited number that still parses
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="fails its checksum"):
        _read_record(path)
    path.write_text('{"auc": ')
    with pytest.raises(ValueError, match="unreadable"):
        _read_record(path)
