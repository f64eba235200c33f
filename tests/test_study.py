import json

import numpy as np
import pytest
import xarray as xr

from dit_lens.study import ConceptPair, Study, pick_settings, run_study, window_layers, window_steps

LABELS = ["normal cecum", "polyps"]


class BrightnessOracle:
    """A real, simple classifier: bright images read as polyps."""

    labels = LABELS

    def __call__(self, images):
        p = 1 / (1 + np.exp(-(images.mean(axis=(1, 2, 3)) - 0.5) * 40))
        return np.stack([1 - p, p], axis=1)


def red_segmenter(images):
    return images[..., 0] > images[..., 1] + 0.2


@pytest.fixture
def study():
    return Study(
        "unit", pairs=(ConceptPair("polyps", "normal cecum", contexts=("An image of {}", "A photo of {}")),),
        windows=((0.0, 0.5), (0.0, 1.0)), alphas=(0.0, 3.0), vector_seeds=(2, 3), eval_seeds=3,
        num_inference_steps=3, baselines=("reprompt",),
    )


def test_window_layers_cover_the_depth():
    assert window_layers((0.25, 0.5), 28) == list(range(7, 14))
    assert window_layers((0.0, 1.0), 12) == list(range(12))
    assert window_layers((0.9, 0.95), 4) == [3]  # never empty


def test_window_steps_resolve_when_to_steer():
    assert window_steps((0.0, 1.0), 20) is None  # every step
    assert window_steps((0.5, 1.0), 20) == list(range(10, 20))
    assert window_steps((0.0, 0.25), 20) == list(range(5))


def test_a_step_window_steers_only_those_steps(tiny_lens, tmp_path):
    from dit_lens.study.cells import CellRunner

    s = Study("steps", pairs=(ConceptPair("polyps", "normal cecum", contexts=("An image of {}",)),),
              step_windows=((0.0, 1.0), (0.5, 1.0)), alphas=(3.0,), vector_seeds=(2,), eval_seeds=2,
              num_inference_steps=4)
    assert s.grid_shape()["steps"] == 2
    runner = CellRunner(s, tiny_lens, BrightnessOracle(), red_segmenter, tmp_path, progress=False)
    late = [c for c in runner.cells() if c["steps"] == (0.5, 1.0)][0]
    assert runner.steer(late).steps == (2, 3)
    result = run_study(s, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path, progress=False)
    assert list(result["steps"].values) == ["0–1", "0.5–1"]
    ssim = result["bg_ssim"].squeeze()
    assert np.isfinite(ssim).all() and not np.allclose(ssim.values[0], ssim.values[1])
    assert json.loads(result.attrs["step_window_steps"]) == {"0–1": "all", "0.5–1": [2, 3]}


def test_a_blend_axis_blends_its_cells_and_keeps_unblended_cell_names(tiny_lens, tmp_path):
    s = Study("blend", pairs=(ConceptPair("polyps", "normal cecum", contexts=("An image of {}",)),),
              alphas=(0.0, 3.0), blends=(0.0, 0.9), vector_seeds=(2,), eval_seeds=2, num_inference_steps=4,
              baselines=("reprompt",))
    assert s.grid_shape()["blend"] == 2
    result = run_study(s, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path, progress=False)
    assert list(result["blend"].values) == [0.0, 0.9]
    names = sorted(p.name for p in (tmp_path / "cells").glob("*.json"))
    assert names == ["p0_w0-1_t0-1_a0_r0_b0.9_n2.json", "p0_w0-1_t0-1_a0_r0_n2.json",
                     "p0_w0-1_t0-1_a3_r0_b0.9_n2.json", "p0_w0-1_t0-1_a3_r0_n2.json",
                     "reprompt_p0.json", "reprompt_p0_b0.9.json"]
    # the baseline is blended too: its row differs between blends and is constant along the steering axes
    rep = result["bg_psnr"].sel(edit="reprompt").squeeze()
    assert float(rep.sel(blend=0.9).min()) > float(rep.sel(blend=0.0).max())
    assert np.allclose(rep.sel(blend=0.9).values, float(rep.sel(blend=0.9, alpha=0.0)))
    psnr = result["bg_psnr"].sel(edit="medsteer").squeeze()
    assert float(psnr.sel(alpha=0.0).min()) == 100.0  # α 0 stays the unsteered image, blended or not
    assert float(psnr.sel(alpha=3.0, blend=0.9)) > float(psnr.sel(alpha=3.0, blend=0.0))
    # two swept axes: the summary figure is the flip / background trade-off, one panel per pair
    from dit_lens.views.study import study_figure

    fig = study_figure(result)
    assert [(ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) for ax in fig.axes] == [
        ("flip_rate", "bg_ssim", "polyps → normal cecum")]
    # the picked setting's gate explorer and pairs figure, blending included
    from dit_lens.study.cells import CellRunner

    (pick,) = pick_settings(result, require={"flip_rate": 0.0})
    path = CellRunner(s, tiny_lens, BrightnessOracle(), red_segmenter, tmp_path, progress=False).show(pick)
    assert path == tmp_path / "best_p0.html" and (tmp_path / "best_p0.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="Study.blends"):
        Study("x", pairs=s.pairs, blends=(1.5,))


def test_pick_settings_takes_the_best_background_among_settings_that_flip():
    def est(v):
        return xr.DataArray(np.array(v, float), dims=("pair", "alpha"))

    result = xr.Dataset(
        {"flip_rate": est([[0.5, 0.95, 1.0], [0.2, 0.4, 0.6]]), "bg_ssim": est([[0.99, 0.93, 0.80], [0.9, 0.8, 0.7]])},
        coords={"pair": ["a → b", "c → d"], "alpha": [1.0, 2.0, 3.0]},
    )
    for m in ("flip_rate", "bg_ssim"):
        result[f"{m}_low"], result[f"{m}_high"] = result[m] - 0.01, result[m] + 0.01
    first, second = pick_settings(result)
    assert first["alpha"] == 2.0 and first["meets"] and first["bg_ssim"][0] == pytest.approx(0.93)
    assert second["alpha"] == 3.0 and not second["meets"]  # none flips 0.9: the closest
    # a second floor changes the pick: only alpha 1 keeps a background of 0.95
    (only,) = pick_settings(result.isel(pair=[0]), require={"flip_rate": 0.5, "bg_ssim": 0.95})
    assert only["alpha"] == 1.0 and only["meets"]
    with pytest.raises(ValueError, match="no metric"):
        pick_settings(result, require={"polyp_kept": 0.8})


def test_study_validates_its_declaration():
    pair = ConceptPair("polyps", "normal cecum")
    with pytest.raises(ValueError, match="windows"):
        Study("x", pairs=(pair,), windows=((0.5, 0.2),))
    with pytest.raises(ValueError, match="step_windows"):
        Study("x", pairs=(pair,), step_windows=((0.0, 1.5),))
    with pytest.raises(ValueError, match="baselines"):
        Study("x", pairs=(pair,), baselines=("pnp",))
    with pytest.raises(ValueError, match="quick overrides unknown"):
        Study("x", pairs=(pair,), quick={"alpha": 1})
    with pytest.raises(ValueError, match="two different labels"):
        ConceptPair("polyps", "polyps")
    s = Study("x", pairs=(pair,), alphas=[1, 2])
    assert Study.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_run_study_grid_result_and_resume(tiny_lens, study, tmp_path, monkeypatch):
    result = run_study(study, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter,
                       out=tmp_path / "s", progress=False)
    assert result["flip_rate"].dims == ("edit", "pair", "window", "steps", "alpha", "renormalize", "blend",
                                        "vector_seeds")
    assert list(result["edit"].values) == ["medsteer", "reprompt"]
    steered = result.sel(edit="medsteer")
    # alpha 0 is the unsteered image: no flips, background identical
    zero = steered.sel(alpha=0.0)
    assert float(zero["flip_rate"].max()) == 0.0 and float(zero["bg_ssim"].min()) == pytest.approx(1.0)
    assert int(result["flip_rate_n"].max()) == 3
    assert float(steered["vector_cosine_to_largest"].sel(vector_seeds=3).min()) == pytest.approx(1.0, abs=1e-5)
    # the baseline fills its row whatever the steering settings
    rep = result.sel(edit="reprompt")["bg_ssim"].values
    assert np.isfinite(rep).all() and np.allclose(rep, rep.flat[0])
    assert xr.open_zarr(tmp_path / "s" / "result.zarr")["flip_rate"].shape == result["flip_rate"].shape
    assert json.loads(result.attrs["study"])["alphas"] == [0.0, 3.0]

    # a re-run reuses every finished cell: the model is never called
    import dit_lens.study.cells as cells

    real_generate = cells.generate

    def boom(*a, **k):
        raise AssertionError("the model ran again")

    monkeypatch.setattr(cells, "generate", boom)
    again = run_study(study, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter,
                      out=tmp_path / "s", progress=False)
    xr.testing.assert_equal(again, result)
    # a widened grid reuses the finished cells and computes only the new ones
    calls = []
    monkeypatch.setattr(cells, "generate", lambda *a, **k: calls.append(k["steer"].alpha) or real_generate(*a, **k))
    wider = run_study(study.replace(alphas=(0.0, 3.0, 6.0)), tiny_lens, oracle=BrightnessOracle(),
                      segmenter=red_segmenter, out=tmp_path / "s", progress=False)
    assert calls and set(calls) == {6.0}
    xr.testing.assert_equal(wider.sel(alpha=[0.0, 3.0]), result)
    monkeypatch.setattr(cells, "generate", boom)
    # a half-finished study computes only its missing cells
    (tmp_path / "s" / "cells" / "p0_w0-1_t0-1_a3_r0_n3.json").unlink()
    with pytest.raises(AssertionError, match="the model ran again"):
        run_study(study, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path / "s", progress=False)


def test_a_folder_of_another_study_is_refused(tiny_lens, study, tmp_path):
    run_study(study.replace(alphas=(0.0,), vector_seeds=(2,), windows=((0.0, 1.0),), baselines=()), tiny_lens,
              oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path / "s", progress=False)
    before = sorted(p.name for p in (tmp_path / "s" / "cells").iterdir())
    with pytest.raises(ValueError, match="holds another study"):
        run_study(study, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path / "s", progress=False)
    assert sorted(p.name for p in (tmp_path / "s" / "cells").iterdir()) == before


def test_cells_measured_under_older_metric_definitions_are_not_reused(tiny_lens, study, tmp_path):
    import json

    small = study.replace(alphas=(0.0,), vector_seeds=(2,), windows=((0.0, 1.0),), baselines=())
    run_study(small, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path / "s", progress=False)
    declaration = tmp_path / "s" / "study.json"
    old = json.loads(declaration.read_text())
    old.pop("metrics_version")  # as written before metric versions existed
    declaration.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="measured with metrics version 1"):
        run_study(small, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path / "s", progress=False)
    # the default folder follows the cell context: a widened grid keeps it, other seeds do not
    assert small.key(tiny_lens) == small.replace(alphas=(0.0, 1.0), baselines=("reprompt",)).key(tiny_lens)
    assert small.key(tiny_lens) != small.replace(eval_seeds=small.eval_seeds + 1).key(tiny_lens)


def test_unknown_labels_are_refused(tiny_lens, tmp_path):
    s = Study("x", pairs=(ConceptPair("esophagitis", "normal z-line"),), eval_seeds=1, vector_seeds=(1,), num_inference_steps=2)
    with pytest.raises(ValueError, match="not one of the oracle's labels"):
        run_study(s, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path, progress=False)
