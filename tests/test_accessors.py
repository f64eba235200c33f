"""The result accessors (`dit_lens.accessors`): ``ds.lens`` on the results of a tiny PixArt, ``result.study`` on a
tiny study's result, refusals of Datasets dit-lens did not make, and registration without torch."""

import json
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from dit_lens import generate, patching, run_study
from dit_lens.study import ConceptPair, Study, pick_settings
from dit_lens.views.describe import describe_result
from test_study import BrightnessOracle, red_segmenter

NOT_OURS = "this Dataset was not made by dit-lens: it has no provenance attrs"


def as_older(ds: xr.Dataset) -> xr.Dataset:
    """`ds` with its structured attrs as JSON strings, as results made before attrs were typed (or read back from
    netCDF) hold them."""
    older = ds.copy()
    older.attrs = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in ds.attrs.items()}
    return older


def test_a_generate_result_reads_its_provenance_settings_and_description(tiny_lens):
    from dit_lens import Reweight

    edit = Reweight(tokens=(1, 2), scale=2.0, layers=(0, 1))
    out = generate(tiny_lens, "a polyp", seeds=[4, 2], edits=edit, num_inference_steps=2, progress=False)
    assert out.lens.provenance == tiny_lens.provenance()
    settings = out.lens.settings
    assert settings["seeds"] == [4, 2] and settings["num_inference_steps"] == 2
    assert settings["edits"] == [json.loads(json.dumps(edit.settings()))]  # the edit's settings, as JSON keeps them
    assert not set(settings) & set(tiny_lens.provenance())  # the model is the provenance, not a setting
    assert out.lens.describe() == describe_result(out) and out.lens.describe().startswith("Reweight")
    # results made before attrs were typed read the same
    older = as_older(out)
    assert isinstance(older.attrs["edits"], str)
    assert older.lens.settings == settings and older.lens.provenance == tiny_lens.provenance()
    # what a caller does with what it read leaves the result as it was
    settings["edits"][0]["scale"] = 9.0
    assert out.lens.settings["edits"][0]["scale"] == 2.0
    with pytest.raises(ValueError, match="not a study result: it has no flip_rate variable"):
        out.study.floors


def test_a_patching_result_reads_its_provenance(tiny_lens):
    def brightness(images):
        return images.mean(axis=(1, 2, 3))

    out = patching(tiny_lens, clean="a red polyp", corrupt="a pale mucosa", seeds=[1], metric=brightness,
                   grid=[(None, None)], num_inference_steps=2, progress=False)
    assert out.lens.provenance == tiny_lens.provenance()
    assert out.lens.settings["clean"] == "a red polyp" and out.lens.settings["seeds"] == [1]
    assert "lens" not in out.variables and "study" not in out.variables  # the accessor names hide nothing


@pytest.fixture(scope="module")
def study_result(tmp_path_factory):
    from dit_lens import load
    from dit_lens.model.builders import PixArtSpec, build_pixart

    lens = load(build_pixart(PixArtSpec(num_layers=2, num_heads=2, head_dim=8, sample_size=8, patch_size=2), seed=0))
    pair = ConceptPair("polyps", "normal cecum", contexts=("An image of {}",))
    study = Study("accessors", pairs=(pair,), methods={"medsteer": {"alpha": (0.0, 3.0), "vector_seeds": (2,)},
                                                       "reprompt": {}},
                  eval_seeds=2, num_inference_steps=3, require={"flip_rate": 0.0})
    result = run_study(study, lens, oracle=BrightnessOracle(), segmenter=red_segmenter,
                       out=tmp_path_factory.mktemp("study"), progress=False)
    return study, lens, result


def test_a_study_result_reads_what_it_declared(study_result):
    study, lens, result = study_result
    assert result.study.floors == {"flip_rate": 0.0}
    assert result.study.method_axes == {m: list(sweep) for m, sweep in study.methods.items()}
    assert result.study.metrics[:2] == ["flip_rate", "target_rate"]
    assert "vector_cosine_to_largest" in result.study.metrics
    assert result.study.extras == ["vector_cosine_to_largest"]
    assert Study.from_dict(result.study.declaration) == study
    assert result.lens.provenance == lens.provenance()
    older = as_older(result)
    assert (older.study.floors, older.study.method_axes, older.study.metrics, older.study.declaration) == (
        result.study.floors, result.study.method_axes, result.study.metrics, result.study.declaration)


def test_pick_takes_the_best_background_among_the_settings_that_work(study_result):
    _, _, result = study_result
    steered, baseline = result.study.pick()
    assert json.dumps(result.study.pick()) == json.dumps(pick_settings(result))  # (NaN Bg-LPIPS: compared as JSON)
    # every setting reaches the study's floor (flip rate ≥ 0): α 0, the unsteered image, has the best background
    psnr = result["bg_psnr"].sel({"method": "medsteer"}).squeeze()
    assert float(psnr.sel(alpha=0.0)) == 100.0 and float(psnr.sel(alpha=3.0)) < 100.0
    assert (steered["method"], steered["alpha"], steered["meets"]) == ("medsteer", 0.0, True)
    assert steered["bg_psnr"][0] == 100.0 and baseline["method"] == "reprompt" and set(baseline) >= {"blend", "bg_ssim"}
    # a floor no setting reaches: the one closest to it, marked as missing it
    ssim = result["bg_ssim"].sel({"method": "medsteer"}).squeeze()
    (closest,) = result.study.pick(require={"bg_ssim": 2.0}, methods=["medsteer"])
    assert not closest["meets"] and closest["alpha"] == float(ssim.idxmax("alpha"))
    with pytest.raises(ValueError, match="methods: the result has no method \\['sdedit'\\]"):
        result.study.pick(methods=["sdedit"])
    with pytest.raises(ValueError, match="require maps metric names to floors"):
        result.study.pick(require=0.9)
    with pytest.raises(ValueError, match="no metric \\['polyp_kept'\\]"):
        result.study.pick(require={"polyp_kept": 0.8})


def test_the_study_figure_draws_each_metric_against_the_swept_axis(study_result):
    _, _, result = study_result
    fig = result.study.figure()
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:2] == ["flip_rate", "target_rate"] and "bg_ssim" in titles
    assert "vector_cosine_to_largest" not in titles and "bg_lpips" not in titles  # extras and Bg-LPIPS are not drawn
    assert all(ax.get_xlabel() == "alpha" for ax in fig.axes)
    assert "study 'accessors'" in fig._suptitle.get_text()
    assert any(len(line.get_xdata()) and np.isfinite(line.get_ydata()).all() for line in fig.axes[0].get_lines())


def test_a_dataset_dit_lens_did_not_make_is_refused_clearly():
    plain = xr.Dataset({"x": ("i", [1.0, 2.0])}, attrs={"units": "m", "seeds": [0, 1]})
    for reading in (lambda: plain.lens.provenance, lambda: plain.lens.settings, plain.lens.describe):
        with pytest.raises(ValueError, match=NOT_OURS):
            reading()
    for reading in (lambda: plain.study.floors, lambda: plain.study.method_axes, plain.study.pick, plain.study.figure):
        with pytest.raises(ValueError, match="this Dataset is not a study result: it has no flip_rate variable"):
            reading()


@pytest.mark.parametrize("first", ["dit_lens", "dit_lens.accessors", "dit_lens.trace.attrs", "dit_lens.views.study"])
def test_the_accessors_are_registered_without_torch_whichever_module_comes_first(first):
    script = (f"import sys, xarray as xr, {first}\n"
              "ds = xr.Dataset(attrs={'model_source': 'tiny', 'seeds': '[1]'})\n"
              "print(ds.lens.provenance, ds.lens.settings, 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]  # warnings are errors: no accessor name clashes with xarray's
    assert run.stdout.strip() == "{'model_source': 'tiny'} {'seeds': [1]} False"
