"""Fault injection on the input side (issue #16): every row is a bad input, an edited or hostile file,
or a diverging run, and each test checks that dit-lens refuses it clearly and keeps nothing wrong."""

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from dit_lens.apps.cli import main
from dit_lens.apps.demo import claim_output_folder
from dit_lens.interventions.base import UnverifiedWarning
from dit_lens.interventions.generate import generate
from dit_lens.interventions.steer import Steer
from dit_lens.methods import ConceptPair, get
from dit_lens.methods.registry import MethodContext
from dit_lens.readouts.vector_files import export_authors, import_authors, load_vector, save_vector
from dit_lens.readouts.vectors import concept_vector, normalize_vector
from dit_lens import metrics as M
from dit_lens.study.declaration import Study
from dit_lens.trace.capture import capture
from dit_lens.trace.runner import traced_generate
from dit_lens.validate import NonFiniteError, check_pipeline_folder, check_steps, min_steps

EMBEDDED = Path(__file__).resolve().parents[1] / "dit_lens" / "embedded" / "pipeline"


def unit_vector(steps=2, layers=3, channels=16, scale=1.0):
    values = np.zeros((steps, layers, channels), np.float32)
    values[..., 0] = scale
    return xr.DataArray(values, dims=("step", "layer", "channel"), coords={"layer": np.arange(layers)})


# -- row 4: a diverging run is stopped, never measured ------------------------------------------


def test_a_huge_alpha_stops_generate_naming_the_setting(tiny_lens):
    steer = Steer(unit_vector(), alpha=1e30)
    with pytest.raises(NonFiniteError, match=r"edited branch only.*alpha=1e\+30.*lower the strength"):
        generate(tiny_lens, "a polyp", seeds=[0], steer=steer, num_inference_steps=2, progress=False)


def test_a_valid_run_still_passes_the_guard_unchanged(tiny_lens):
    steer = Steer(unit_vector(), alpha=0.0)
    out = generate(tiny_lens, "a polyp", seeds=[0, 1], steer=steer, num_inference_steps=2, progress=False)
    image = out["image"].values
    assert np.isfinite(image).all()
    np.testing.assert_array_equal(image[:, :, 0], image[:, :, 1])  # α = 0 stays bit-identical


def test_metrics_refuse_non_finite_images():
    images = np.full((1, 2, 2, 8, 8, 3), 0.5, np.float32)
    images[0, 1, 1, 3, 3, 0] = np.nan
    out = xr.Dataset({"image": (("prompt", "seed", "branch", "y", "x", "rgb"), images)},
                     coords={"prompt": ["p"], "seed": [0, 1], "branch": ["original", "edited"]})
    background = xr.DataArray(np.ones((1, 2, 8, 8), bool), dims=("prompt", "seed", "y", "x"))
    classifier = lambda x: np.tile([0.9, 0.1], (len(x), 1))  # noqa: E731 - a plain callable classifier
    classifier_labels = type("C", (), {"labels": ["polyps", "normal"], "__call__": staticmethod(classifier)})()
    for measure in (lambda: M.classify(out, classifier_labels), lambda: M.segment(out, lambda x: x[..., 0] > 2),
                    lambda: M.background_ssim(out, background), lambda: M.background_psnr(out, background)):
        with pytest.raises(NonFiniteError, match="NaN or inf.*no metric is computed"):
            measure()


def test_a_method_names_the_cell_setting_of_a_diverging_run(tiny_lens):
    pair = ConceptPair("polyps", "normal cecum", contexts=("An image of {}",))
    vec = unit_vector(layers=3)

    class Vecs:
        def __call__(self, pair, seeds=None):
            return vec

    context = MethodContext(num_inference_steps=2, vectors=Vecs())
    with pytest.raises(NonFiniteError, match=r"medsteer on 'polyps -> normal cecum' at window=0-1, .*alpha=1e\+30"):
        get("medsteer").run(tiny_lens, pair, [0], {"alpha": 1e30, "vector_seeds": 1}, context=context)


def test_a_study_stores_no_cell_of_a_diverging_run(tiny_lens, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path / "cache"))
    from dit_lens.study.run import run_study

    pair = ConceptPair("a polyp", "a normal cecum", contexts=("{}",))
    study = Study("diverge", pairs=(pair,), methods={"medsteer": {"alpha": (1e30,), "vector_seeds": (1,)}},
                  eval_seeds=1, num_inference_steps=2)

    def oracle(images):
        return np.tile([0.5, 0.5], (len(images), 1))

    oracle.labels = ["a polyp", "a normal cecum"]
    with pytest.raises(NonFiniteError, match="alpha=1e"):
        run_study(study, tiny_lens, oracle=oracle, segmenter=lambda x: np.zeros(x.shape[:3], bool),
                  out=tmp_path / "study", progress=False)
    assert not list((tmp_path / "study").rglob("cells/*.json"))


def test_demo_with_a_huge_alpha_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path / "cache"))
    code = main(["demo", "--alpha", "1e30", "--steps", "2", "--pairs", "1", "--vector-seeds", "1",
                 "--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("dit-lens: error: ") and "alpha=1e+30" in last and "Traceback" not in err
    assert not (tmp_path / "demo" / "summary.json").exists()


# -- row 5: untrusted pickles ------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("wrap", [lambda x: x, lambda x: {0: {"blocks": [x]}}])
def test_import_authors_refuses_a_malicious_pickle(tmp_path, wrap):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(wrap(_Exploit(marker))))
    with pytest.raises(pickle.UnpicklingError, match=r"refused to unpickle (posix|os|nt)\.system"):
        import_authors(path)
    assert not marker.exists()


def test_import_authors_refuses_other_globals(tmp_path):
    path = tmp_path / "eval.pkl"
    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")  # builtins.eval('1+1'), protocol 0
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        import_authors(path)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_import_authors_reads_genuine_torch_and_numpy_pickles(tmp_path, protocol):
    rows = np.eye(4, dtype=np.float32)
    for kind, block in (("torch", lambda i: torch.from_numpy(rows[i].copy())), ("numpy", lambda i: rows[i].copy()),
                        ("double", lambda i: torch.from_numpy(rows[i].astype(np.float64)))):
        table = {s: {"blocks": [block((s + l) % 4) for l in range(3)]} for s in range(2)}
        path = tmp_path / f"{kind}-{protocol}.pkl"
        path.write_bytes(pickle.dumps(table, protocol=protocol))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            vec = import_authors(path)
        assert vec.shape == (2, 3, 4) and float(vec.values[1, 2, 3]) == 1.0


# -- row 6: the demo's output folder -----------------------------------------------------------


def test_demo_refuses_a_folder_with_user_files_and_deletes_nothing(tmp_path):
    out = tmp_path / "out"
    (out / "vector.zarr").mkdir(parents=True)
    (out / "vector.zarr" / "notes.txt").write_text("mine")
    (out / "summary.json").write_text("my summary")
    with pytest.raises(ValueError, match="not made by dit-lens"):
        claim_output_folder(out, overwrite=True)
    assert (out / "vector.zarr" / "notes.txt").read_text() == "mine"
    assert (out / "summary.json").read_text() == "my summary"


def test_demo_needs_overwrite_and_replaces_only_what_it_wrote(tmp_path):
    from dit_lens.storage import MARKER

    out = claim_output_folder(tmp_path / "new", overwrite=False)
    assert (out.path / MARKER).is_file() and out.files == []
    out.write("summary.json", b"{}")
    with pytest.raises(ValueError, match="pass --overwrite"):
        claim_output_folder(out.path, overwrite=False)
    again = claim_output_folder(out.path, overwrite=True)
    assert again.path == out.path and not (out.path / "summary.json").exists()
    again.record("vector.zarr")
    (out.path / "vector.zarr").mkdir()
    (out.path / "vector.zarr" / "added.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"did not write \(vector.zarr/added.txt\)"):
        claim_output_folder(out.path, overwrite=True)
    assert (out.path / "vector.zarr" / "added.txt").read_text() == "mine"


def test_demo_cli_refuses_a_foreign_folder_before_running(tmp_path, capsys):
    (tmp_path / "photo.jpg").write_bytes(b"x")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not made by dit-lens (it holds photo.jpg)" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["photo.jpg"]


# -- row 7: saved artefacts --------------------------------------------------------------------


def test_export_authors_refuses_to_overwrite(tmp_path):
    path = tmp_path / "v.pkl"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="exists"):
        export_authors(unit_vector(), path)
    assert path.read_bytes() == b"precious"


@pytest.mark.parametrize("edit", [
    lambda d: d.update(alpha=9.0),
    lambda d: d.update(layers=[0]),
    lambda d: d.update(steps=[0]),
    lambda d: d.update(renormalize=True),
    lambda d: d.update(update="authors (renormalized)"),
    lambda d: d.update(halves="cond"),
    lambda d: d.update(name="other"),
    lambda d: d.update(reuse_last_step=True),
    lambda d: d["vector"]["coords"]["layer"].update(data=[2, 1, 0]),
])
def test_an_edited_saved_steer_is_refused(tmp_path, edit):
    path = Steer(unit_vector(), alpha=2.0, layers=[1, 2], name="x").save(tmp_path / "steer.json")
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match its digest"):
        Steer.load(path)


def test_an_old_saved_steer_loads_with_a_warning(tmp_path):
    steer = Steer(unit_vector(), alpha=2.0)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(steer.to_dict()))  # what save wrote before digests
    with pytest.warns(UnverifiedWarning, match="cannot be verified"):
        assert Steer.load(path).settings() == steer.settings()
    path2 = steer.save(tmp_path / "new.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Steer.load(path2).settings() == steer.settings()


@pytest.mark.parametrize("scale", [10.0, 35.0, 0.5])
def test_a_vector_that_is_not_unit_norm_is_refused(tmp_path, scale):
    vec = unit_vector(scale=scale)
    with pytest.raises(ValueError, match="unit L2 norm.*normalise it"):
        Steer(vec, alpha=1.0)
    vec.to_dataset(name="concept_vector").to_zarr(tmp_path / "v.zarr", zarr_format=2)
    with pytest.raises(ValueError, match="unit L2 norm"):
        load_vector(tmp_path / "v.zarr")
    (tmp_path / "a.pkl").write_bytes(pickle.dumps({0: {"blocks": [vec.values[0, l] for l in range(3)]}}))
    with pytest.raises(ValueError, match="unit L2 norm"):
        import_authors(tmp_path / "a.pkl")
    Steer(normalize_vector(vec), alpha=1.0)  # the fix the message names


# -- row 9: values accepted silently -----------------------------------------------------------


@pytest.mark.parametrize("guidance", [0.0, -2.0, 0.99, float("nan"), float("inf")])
def test_guidance_below_one_or_non_finite_is_refused(tiny_lens, guidance):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 1"):
        generate(tiny_lens, "a", seeds=[0], guidance_scale=guidance, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 1"):
        traced_generate(tiny_lens, ["a"], [0], num_inference_steps=2, guidance_scale=guidance)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 1"):
        Study("s", pairs=(ConceptPair("a", "b", contexts=("{}",)),), guidance_scale=guidance)


def test_one_step_is_refused_for_samplers_that_cannot_run_it(tiny_lens, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path))
    assert min_steps(tiny_lens.pipeline.scheduler) == 2  # DPM-Solver++ dies at 1 in diffusers' PixArt
    message = "num_inference_steps=1 is too few for the DPMSolverMultistepScheduler sampler"
    with pytest.raises(ValueError, match=message):
        generate(tiny_lens, "a", seeds=[0], num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match=message):
        capture(tiny_lens, ["a"], seeds=[0], num_inference_steps=1)
    from diffusers import DDIMScheduler

    assert check_steps(1, DDIMScheduler()) == 1  # one-step samplers keep one step


def test_windows_outside_zero_one_or_reversed_are_refused_everywhere(capsys):
    for window in ((0.5, 0.2), (0.5, 0.5), (-0.1, 0.5), (0.2, 1.5)):
        assert main(["demo", "--window", *map(str, window)]) == 2
        assert "--window is fractions" in capsys.readouterr().err
        with pytest.raises(ValueError, match="a window is fractions"):
            Study("s", pairs=(ConceptPair("a", "b", contexts=("{}",)),), methods={"medsteer": {"window": (window,)}})
        with pytest.raises(ValueError, match="a window is fractions"):
            get("medsteer").settings({"window": window})


def test_numpy_scalars_are_accepted_like_python_numbers(tiny_lens):
    steer = Steer(unit_vector(steps=4), alpha=np.float32(3), layers=np.array([0, 2]))
    assert steer.alpha == 3.0 and type(steer.alpha) is float
    out = generate(tiny_lens, "a", seeds=np.array([0]), steer=steer, num_inference_steps=np.int64(4),
                   guidance_scale=np.float32(4.5), blend=np.float64(0.3), batch_size=np.int64(2), progress=False)
    json.dumps(dict(out.attrs))  # plain Python numbers: results can be written as JSON
    assert out.attrs["num_inference_steps"] == 4 and type(out.attrs["num_inference_steps"]) is int
    study = Study("s", pairs=(ConceptPair("a", "b", contexts=("{}",)),), num_inference_steps=np.int64(3),
                  eval_seeds=np.int64(2), methods={"medsteer": {"alpha": (np.float32(2),)}})
    json.dumps(study.to_dict())


def test_bools_are_not_numbers():
    with pytest.raises(ValueError, match="Steer.alpha must be a finite number"):
        Steer(unit_vector(), alpha=True)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        check_steps(True)


# -- row 10: the command lines -----------------------------------------------------------------


def test_cli_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "f"
    target.write_text("keep")
    assert main(["demo", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"--out {target} is a file" in err and len(err.strip().splitlines()) == 1
    assert target.read_text() == "keep"
    with pytest.raises(ValueError, match="is a file"):
        main(["demo", "--debug", "--out", str(target)])


def test_cli_cache_folder_that_cannot_be_written(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path / "file" / "cache"))
    assert main(["demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the cache folder" in err and "cannot be written" in err and "set DIT_LENS_CACHE" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_cli_read_only_output_folder(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(["demo", "--out", str(out)]) == 2
        assert "cannot be written" in capsys.readouterr().err
    finally:
        out.chmod(0o755)


def test_cli_pipeline_folder_with_truncated_weights_or_a_missing_component(tmp_path, capsys):
    truncated, missing = tmp_path / "truncated", tmp_path / "missing"
    shutil.copytree(EMBEDDED, truncated)
    shutil.copytree(EMBEDDED, missing)
    weights = truncated / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    shutil.rmtree(missing / "vae")
    assert main(["demo", "--model", str(truncated), "--out", str(tmp_path / "o1")]) == 2
    assert f"{weights} is truncated" in capsys.readouterr().err
    assert main(["demo", "--model", str(missing), "--out", str(tmp_path / "o2")]) == 2
    assert f"no folder {missing / 'vae'}" in capsys.readouterr().err
    check_pipeline_folder(EMBEDDED)  # the shipped one is whole


def test_study_cli_reports_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    from dit_lens.study.cli import study_main

    study = Study("s", pairs=(ConceptPair("a", "b", contexts=("{}",)),))
    target = tmp_path / "file"
    target.write_text("")
    loader = lambda name: None  # noqa: E731 - never reached: the folder is refused first
    assert study_main(study, ["--out", str(target)], load_oracle=loader, load_segmenter=loader) == 2
    assert "--out" in capsys.readouterr().err
    with pytest.raises(ValueError):
        study_main(study, ["--debug", "--out", str(target)], load_oracle=loader, load_segmenter=loader)


# -- row 11: vector provenance -----------------------------------------------------------------


def test_vectors_keep_the_sampler_settings(tiny_lens, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path))
    vec = concept_vector(tiny_lens, positive=["a red polyp"], negative=["a normal cecum"], seeds=[0],
                         num_inference_steps=3, guidance_scale=3.5)
    assert vec.attrs["num_inference_steps"] == 3 and vec.attrs["guidance_scale"] == 3.5
    save_vector(vec, tmp_path / "v.zarr")
    back = load_vector(tmp_path / "v.zarr")
    assert back.attrs["num_inference_steps"] == 3 and back.attrs["guidance_scale"] == 3.5
    pos = capture(tiny_lens, ["a red polyp"], seeds=[0], num_inference_steps=3, guidance_scale=3.5)
    neg = capture(tiny_lens, ["a normal cecum"], seeds=[0], num_inference_steps=3, guidance_scale=4.5)
    with pytest.raises(ValueError, match="different guidance_scale"):
        concept_vector(pos, neg)


def test_a_saved_vector_with_a_flipped_byte_is_refused(tmp_path):
    from test_steer import unit_vector

    from dit_lens.readouts.vector_files import load_vector, save_vector

    path = save_vector(unit_vector(), tmp_path / "v.zarr")
    np.testing.assert_array_equal(load_vector(path).values, unit_vector().values)
    chunk = next(p for p in (path / "concept_vector").iterdir() if not p.name.startswith("."))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="v.zarr is damaged"):
        load_vector(path)
