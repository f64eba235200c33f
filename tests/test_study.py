import json

import numpy as np
import pytest
import xarray as xr

from dit_lens.study import ConceptPair, Metric, Study, pick_settings, run_study, window_layers, window_steps

LABELS = ["normal cecum", "polyps"]


class BrightnessOracle:
    """A real, simple classifier: bright images read as polyps."""

    labels = LABELS

    def __call__(self, images):
        p = 1 / (1 + np.exp(-(images.mean(axis=(1, 2, 3)) - 0.5) * 40))
        return np.stack([1 - p, p], axis=1)


def red_segmenter(images):
    return images[..., 0] > images[..., 1] + 0.2


def still_source(judged):
    """An extra metric: the counterfactual is still classified as the source."""
    return (judged.probs.sel(branch="edited").idxmax("class") == judged.source).astype(float)


PAIR = ConceptPair("polyps", "normal cecum", contexts=("An image of {}", "A photo of {}"))
ONE = ConceptPair("polyps", "normal cecum", contexts=("An image of {}",))


@pytest.fixture
def study():
    return Study(
        "unit", pairs=(PAIR,),
        methods={"medsteer": {"window": ((0.0, 0.5), (0.0, 1.0)), "alpha": (0.0, 3.0), "vector_seeds": (2, 3)},
                 "reprompt": {}},
        eval_seeds=3, num_inference_steps=3,
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

    from dit_lens.methods.medsteer import medsteer_steer

    s = Study("steps", pairs=(ONE,), methods={"medsteer": {"steps": ((0.0, 1.0), (0.5, 1.0)), "alpha": (3.0,),
                                                          "vector_seeds": (2,)}},
              eval_seeds=2, num_inference_steps=4)
    assert s.grid_shape()["medsteer"]["steps"] == 2
    runner = CellRunner(s, tiny_lens, BrightnessOracle(), red_segmenter, tmp_path, progress=False)
    late = [c for c in runner.cells() if c["steps"] == (0.5, 1.0)][0]
    assert medsteer_steer(tiny_lens, ONE, late, runner.context()).steps == (2, 3)
    result = run_study(s, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path, progress=False)
    assert list(result["steps"].values) == ["0-1", "0.5-1"]
    ssim = result["bg_ssim"].squeeze()
    assert np.isfinite(ssim).all() and not np.allclose(ssim.values[0], ssim.values[1])
    assert result.attrs["steps_resolved"] == {"0-1": "all", "0.5-1": [2, 3]}


def test_a_blend_axis_blends_its_cells_and_keeps_unblended_cell_names(tiny_lens, tmp_path, monkeypatch):
    from dit_lens.views.figures import pairs_figure

    s = Study("blend", pairs=(ONE,), methods={"medsteer": {"alpha": (0.0, 3.0), "vector_seeds": (2,)},
                                              "reprompt": {}}, eval_seeds=2, num_inference_steps=4)
    s = s.with_axis("blend", (0.0, 0.9))  # both methods, as --blends does
    assert s.grid_shape()["medsteer"]["blend"] == s.grid_shape()["reprompt"]["blend"] == 2
    result = run_study(s, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path, progress=False)
    assert list(result["blend"].values) == [0.0, 0.9]
    names = sorted(p.name for p in (tmp_path / "cells").glob("*.json"))
    assert names == ["p0_w0-1_t0-1_a0_r0_b0.9_n2.json", "p0_w0-1_t0-1_a0_r0_n2.json",
                     "p0_w0-1_t0-1_a3_r0_b0.9_n2.json", "p0_w0-1_t0-1_a3_r0_n2.json",
                     "reprompt_p0.json", "reprompt_p0_b0.9.json"]
    # the baseline is blended too: its row differs between blends and is constant along the steering axes
    rep = result["bg_psnr"].sel({"method": "reprompt"}).squeeze()
    assert float(rep.sel(blend=0.9).min()) > float(rep.sel(blend=0.0).max())
    assert np.allclose(rep.sel(blend=0.9).values, float(rep.sel(blend=0.9, alpha=0.0)))
    psnr = result["bg_psnr"].sel({"method": "medsteer"}).squeeze()
    assert float(psnr.sel(alpha=0.0).min()) == 100.0  # α 0 stays the unsteered image, blended or not
    assert float(psnr.sel(alpha=3.0, blend=0.9)) > float(psnr.sel(alpha=3.0, blend=0.0))
    # two swept axes: the summary figure is the flip / background trade-off, one panel per pair
    from dit_lens.views.study import study_figure

    fig = study_figure(result)
    assert [(ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) for ax in fig.axes] == [
        ("flip_rate", "bg_ssim", "polyps -> normal cecum")]
    # the picked setting's gate explorer and pairs figure, blending included
    from dit_lens.study.cells import CellRunner

    steered, baseline = pick_settings(result, require={"flip_rate": 0.0})
    assert (steered["method"], baseline["method"]) == ("medsteer", "reprompt") and set(baseline) >= {"blend", "bg_ssim"}
    runner = CellRunner(s, tiny_lens, BrightnessOracle(), red_segmenter, tmp_path, progress=False)
    shown = []
    monkeypatch.setattr("dit_lens.study.cells.pairs_figure",
                        lambda out, **kw: shown.append(kw) or pairs_figure(out, **kw))
    path = runner.show(steered)
    assert path == tmp_path / "best_p0.html" and (tmp_path / "best_p0.png").stat().st_size > 1000
    assert isinstance(shown[0]["judge"], BrightnessOracle)  # the picked pairs carry the judge's labels
    assert runner.show(baseline) == tmp_path / "best_reprompt_p0.png"  # no gates: the pairs figure only
    with pytest.raises(ValueError, match="Study.methods\\['medsteer'\\]\\['blend'\\]: blend must be in"):
        Study("x", pairs=s.pairs, methods={"medsteer": {"blend": (1.5,)}})


def test_pick_settings_takes_the_best_background_among_settings_that_flip():
    def est(v):
        return xr.DataArray(np.array(v, float), dims=("pair", "alpha"))

    result = xr.Dataset(
        {"flip_rate": est([[0.5, 0.95, 1.0], [0.2, 0.4, 0.6]]), "bg_ssim": est([[0.99, 0.93, 0.80], [0.9, 0.8, 0.7]])},
        coords={"pair": ["a → b", "c → d"], "alpha": [1.0, 2.0, 3.0]},
    )
    for m in ("flip_rate", "bg_ssim"):
        result[f"{m}_low"], result[f"{m}_high"] = result[m] - 0.01, result[m] + 0.01
    first, second = pick_settings(result)  # a result without a method dim reads as one method
    assert first["alpha"] == 2.0 and first["meets"] and first["bg_ssim"][0] == pytest.approx(0.93)
    assert second["alpha"] == 3.0 and not second["meets"]  # none flips 0.9: the closest
    # a second floor changes the pick: only alpha 1 keeps a background of 0.95
    (only,) = pick_settings(result.isel(pair=[0]), require={"flip_rate": 0.5, "bg_ssim": 0.95})
    assert only["alpha"] == 1.0 and only["meets"]
    with pytest.raises(ValueError, match="no metric"):
        pick_settings(result, require={"polyp_kept": 0.8})


def test_study_validates_its_declaration():
    pair = PAIR
    with pytest.raises(ValueError, match="\\['window'\\]: a window is fractions"):
        Study("x", pairs=(pair,), methods={"medsteer": {"window": ((0.5, 0.2),)}})
    with pytest.raises(ValueError, match="\\['steps'\\]: a window is fractions"):
        Study("x", pairs=(pair,), methods={"medsteer": {"steps": ((0.0, 1.5),)}})
    with pytest.raises(ValueError, match="unknown method 'sdedit'"):
        Study("x", pairs=(pair,), methods={"medsteer": {}, "sdedit": {}})
    with pytest.raises(ValueError, match="quick overrides unknown fields or axes \\['alphas'\\]"):
        Study("x", pairs=(pair,), quick={"alphas": (1.0,)})
    with pytest.raises(ValueError, match="require names metrics \\['polyp_kept'\\]"):
        Study("x", pairs=(pair,), require={"polyp_kept": 0.8})
    with pytest.raises(ValueError, match="two different labels"):
        ConceptPair("polyps", "polyps", contexts=("{}",))
    with pytest.raises(ValueError, match="non-empty list of prompt templates"):
        ConceptPair("polyps", "normal cecum", contexts="An image of {}")
    s = Study("x", pairs=(pair,), methods={"medsteer": {"alpha": [1, 2]}, "reprompt": {"blend": [0.3]}},
              metrics=(Metric("still_source", still_source),), quick={"alpha": (3.0,), "eval_seeds": 2})
    assert s.methods["medsteer"]["alpha"] == (1.0, 2.0) and s.methods["medsteer"]["window"] == ((0.0, 1.0),)
    assert Study.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    quick = s.quick_version()
    assert quick.methods["medsteer"]["alpha"] == (3.0,) and quick.eval_seeds == 2 and quick.name == "x-quick"


def test_run_study_grid_result_and_resume(tiny_lens, study, tmp_path, monkeypatch):
    result = run_study(study, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter,
                       out=tmp_path / "s", progress=False)
    assert result["flip_rate"].dims == ("method", "pair", "window", "steps", "alpha", "renormalize", "blend",
                                        "vector_seeds", "where", "top", "causal_seeds")
    assert list(result["method"].values) == ["medsteer", "reprompt"]
    steered = result.sel({"method": "medsteer"})
    # alpha 0 is the unsteered image: no flips, background identical
    zero = steered.sel(alpha=0.0)
    assert float(zero["flip_rate"].max()) == 0.0 and float(zero["bg_ssim"].min()) == pytest.approx(1.0)
    assert int(result["flip_rate_n"].max()) == 3
    # with a two-class judge, read as the target is exactly no longer read as the source
    np.testing.assert_array_equal(result["target_rate"].values, result["flip_rate"].values)
    assert float(steered["vector_cosine_to_largest"].sel(vector_seeds=3).min()) == pytest.approx(1.0, abs=1e-5)
    # the baseline fills its row whatever the steering settings
    rep = result.sel({"method": "reprompt"})["bg_ssim"].values
    assert np.isfinite(rep).all() and np.allclose(rep, rep.flat[0])
    stored = xr.open_zarr(tmp_path / "s" / "result.zarr")
    assert stored["flip_rate"].shape == result["flip_rate"].shape
    # attrs are typed and read back from the store as they were written (numbers stay numbers)
    assert stored.attrs == result.attrs and result.attrs["eval_seeds"] == [10_000, 10_001, 10_002]
    assert result.attrs["require"]["flip_rate"] == pytest.approx(0.9)
    assert result.attrs["study"]["methods"]["medsteer"]["alpha"] == [0.0, 3.0]
    assert result.attrs["method_axes"]["reprompt"] == ["blend"]

    # a re-run reuses every finished cell: the model is never called
    import dit_lens.methods.medsteer as medsteer
    import dit_lens.methods.reprompt as reprompt

    real_generate = medsteer.generate

    def boom(*a, **k):
        raise AssertionError("the model ran again")

    monkeypatch.setattr(medsteer, "generate", boom)
    monkeypatch.setattr(reprompt, "reprompt", boom)
    again = run_study(study, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter,
                      out=tmp_path / "s", progress=False)
    xr.testing.assert_equal(again, result)
    # a widened grid reuses the finished cells and computes only the new ones
    calls = []
    monkeypatch.setattr(medsteer, "generate", lambda *a, **k: calls.append(k["steer"].alpha) or real_generate(*a, **k))
    wider = run_study(study.with_axis("alpha", (0.0, 3.0, 6.0)), tiny_lens, oracle=BrightnessOracle(),
                      segmenter=red_segmenter, out=tmp_path / "s", progress=False)
    assert calls and set(calls) == {6.0}
    xr.testing.assert_equal(wider.sel(alpha=[0.0, 3.0]).drop_attrs(), result.drop_attrs())
    monkeypatch.setattr(medsteer, "generate", boom)
    # a half-finished study computes only its missing cells
    (tmp_path / "s" / "cells" / "p0_w0-1_t0-1_a3_r0_n3.json").unlink()
    with pytest.raises(AssertionError, match="the model ran again"):
        run_study(study, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path / "s", progress=False)


def test_a_folder_of_another_study_is_refused(tiny_lens, study, tmp_path):
    small = study.replace(methods={"medsteer": {"alpha": (0.0,), "vector_seeds": (2,)}})
    run_study(small, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path / "s", progress=False)
    before = sorted(p.name for p in (tmp_path / "s" / "cells").iterdir())
    with pytest.raises(ValueError, match="holds a dit-lens study made for other settings.*nothing was changed"):
        run_study(study, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path / "s", progress=False)
    assert sorted(p.name for p in (tmp_path / "s" / "cells").iterdir()) == before


def test_cells_measured_under_older_metric_definitions_are_not_reused(tiny_lens, study, tmp_path, monkeypatch):
    import dit_lens.metrics as M

    small = study.replace(methods={"medsteer": {"alpha": (0.0,), "vector_seeds": (2,)}})
    run_study(small, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path / "s", progress=False)
    version = M.METRICS_VERSION
    monkeypatch.setattr(M, "METRICS_VERSION", version + 1)  # the metric definitions changed since
    with pytest.raises(ValueError, match=f"metrics_version: {version} there, {version + 1} now"):
        run_study(small, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path / "s", progress=False)
    monkeypatch.setattr(M, "METRICS_VERSION", version)
    # the default folder follows the cell context: a widened grid keeps it, other seeds do not
    widened = small.replace(methods={"medsteer": {"alpha": (0.0, 1.0), "vector_seeds": (2,)}, "reprompt": {}})
    assert small.key(tiny_lens) == widened.key(tiny_lens)
    assert small.key(tiny_lens) != small.replace(eval_seeds=small.eval_seeds + 1).key(tiny_lens)
    assert small.key(tiny_lens) != small.with_axis("vector_seeds", (2, 4)).key(tiny_lens)  # a fixed axis
    assert small.key(tiny_lens) != small.replace(metrics=(Metric("still_source", still_source),)).key(tiny_lens)


def test_unknown_labels_are_refused(tiny_lens, tmp_path):
    s = Study("x", pairs=(ConceptPair("esophagitis", "normal z-line", contexts=("{}",)),), eval_seeds=1,
              methods={"medsteer": {"vector_seeds": (1,)}}, num_inference_steps=2)
    with pytest.raises(ValueError, match="not one of the oracle's labels"):
        run_study(s, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path, progress=False)


def test_declared_metrics_and_floors_are_measured_and_picked_with(tiny_lens, tmp_path):
    s = Study("extra", pairs=(ONE,), methods={"medsteer": {"alpha": (0.0, 3.0), "vector_seeds": (2,)}},
              metrics=(Metric("still_source", still_source),), require={"flip_rate": 0.0, "still_source": 0.0},
              eval_seeds=2, num_inference_steps=2)
    result = run_study(s, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path, progress=False)
    kept = result["still_source"].sel({"method": "medsteer"}).squeeze()
    flips = result["flip_rate"].sel({"method": "medsteer"}).squeeze()
    np.testing.assert_allclose(kept.values, 1.0 - flips.values)  # the oracle's two classes
    assert int(result["still_source_n"].max()) == 2
    (pick,) = pick_settings(result)
    assert "still_source" in pick and result.attrs["require"] == {"flip_rate": 0.0, "still_source": 0.0}


def test_folders_written_before_methods_keep_their_key(tiny_lens, tmp_path):
    """A declaration saved by the pre-methods Study (flat windows/alphas/baselines/dye fields) has the
    same cell context as its new spelling, so the default folder keeps its name."""
    from dit_lens.study.declaration import context_of

    s = Study("old", pairs=(ONE,), methods={"medsteer": {"alpha": (0.0,), "vector_seeds": (2,)}, "reprompt": {}},
              eval_seeds=2, num_inference_steps=2)
    legacy = {"name": "old", "pairs": [ONE.to_dict()], "windows": [[0.0, 1.0]], "step_windows": [[0.0, 1.0]],
              "alphas": [0.0], "renormalize": [False], "blends": [0.0], "vector_seeds": [2], "eval_seeds": 2,
              "eval_seed_base": 10_000, "num_inference_steps": 2, "guidance_scale": 4.5, "baselines": ["reprompt"],
              "dye": False}
    assert context_of(legacy) == s.cell_context()
    run_study(s, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["p0_w0-1_t0-1_a0_r0_n2.json", "reprompt_p0.json"]
    assert json.loads((tmp_path / ".dit-lens").read_text())["identity"]["context"] == context_of(legacy)


def test_cells_are_never_reused_across_judges(tiny_lens, study, tmp_path):
    """A folder records which oracle and segmenter measured it; other judges are refused, and nothing
    is changed."""
    small = study.replace(methods={"medsteer": {"alpha": (0.0,), "vector_seeds": (2,)}})
    run_study(small, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path / "s", progress=False)
    declaration = tmp_path / "s" / "study.json"
    recorded = json.loads(declaration.read_text())["judges"]
    assert recorded["segmenter"].endswith("red_segmenter") and recorded["oracle"].endswith("BrightnessOracle")
    before = sorted(p.name for p in (tmp_path / "s" / "cells").iterdir())

    class Retrained(BrightnessOracle):
        fingerprint = "another set of weights"

    with pytest.raises(ValueError, match=r'judges\.oracle: .*BrightnessOracle" there, "another set of weights" now'):
        run_study(small, tiny_lens, oracle=Retrained(), segmenter=red_segmenter, out=tmp_path / "s", progress=False)
    assert sorted(p.name for p in (tmp_path / "s" / "cells").iterdir()) == before


def test_the_embedded_judges_fingerprint_their_weights():
    import torch

    from dit_lens.world import load_oracle, load_segmenter

    oracle, segmenter = load_oracle(), load_segmenter()
    assert oracle.fingerprint == load_oracle().fingerprint != segmenter.fingerprint
    with torch.no_grad():
        next(oracle.net.parameters()).add_(1e-3)
    assert oracle.fingerprint != load_oracle().fingerprint


def test_the_tradeoff_figure_names_every_swept_setting_but_alpha():
    from dit_lens.views.study import tradeoff_figure

    rng = np.random.default_rng(0)
    dims = ("method", "pair", "alpha", "renormalize")
    data = {}
    for m in ("flip_rate", "bg_ssim"):
        v = rng.uniform(0.5, 1.0, (1, 1, 2, 2))
        data.update({m: (dims, v), f"{m}_low": (dims, v - 0.01), f"{m}_high": (dims, v + 0.01)})
    result = xr.Dataset(data, coords={"method": ["medsteer"], "pair": ["polyps -> normal cecum"], "alpha": [1.0, 3.0],
                                      "renormalize": [False, True]})
    result.attrs["method_axes"] = json.dumps({"medsteer": ["alpha", "renormalize"]})
    result["flip_rate_n"] = xr.full_like(result["flip_rate"], 8)
    fig = tradeoff_figure(result)
    (ax,) = fig.axes
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["renormalize False", "renormalize True"]  # the two updates are told apart
    colours = {tuple(line.get_color()) for line in ax.get_lines() if not isinstance(line.get_color(), str)}
    assert len(colours) == 2  # one per update (the grey dashed lines are the floors)
