"""Fault injection on study folders and Ray connections: a user's folder that looks like a study,
two studies racing for one folder, damaged declarations, numbers that are not finite, an unreachable
Ray cluster and a Ray session that ended between two calls. Each test asserts what a user relies on:
nothing of theirs touched, one study whole, one clear line naming the file or flag."""

import json
import os
import sys
import textwrap
import time

import numpy as np
import pytest
import xarray as xr

import children
from dit_lens.storage import MARKER, DamagedError, FolderClaimError
from dit_lens.study import Metric, Study, run_study
from dit_lens.study.cells import CellRunner
from dit_lens.study.cli import study_main
from dit_lens.validate import NonFiniteError

from test_study import ONE, BrightnessOracle, red_segmenter

JUDGES = dict(oracle=BrightnessOracle(), segmenter=red_segmenter, progress=False)
LOADERS = dict(load_oracle=lambda name: BrightnessOracle(), load_segmenter=lambda name: red_segmenter)


@pytest.fixture
def study():
    return Study("faults", pairs=(ONE,), methods={"reprompt": {}}, eval_seeds=2, num_inference_steps=2)


@pytest.fixture
def model(tiny_pipeline, tmp_path):
    folder = tmp_path / "model"
    tiny_pipeline.save_pretrained(folder)
    return str(folder)


def snapshot(folder):
    """Every entry under `folder` with its bytes, and the folder's own modification time."""
    files = {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}
    return files, folder.stat().st_mtime_ns


def error_line(capsys) -> str:
    """The command's error: one line (after any loading bars), no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("dit-lens study ") and ": error: " in line
    return line


# -- a user's folder that looks like a study ---------------------------------------------------------


def test_a_users_folder_holding_its_own_study_files_is_never_written(study, tiny_lens, model, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "cells").mkdir(parents=True)
    (mine / "study.json").write_text('{"my": "own study"}')
    (mine / "cells" / "reprompt_p0.json").write_text('{"my": "measurements"}')
    (mine / "notes.txt").write_text("notes")
    before = snapshot(mine)
    for overwrite in (False, True):
        with pytest.raises(FolderClaimError, match=rf"{mine} is not empty and was not made by dit-lens.*even with "
                                                   rf"overwrite.*nothing was changed"):
            run_study(study, tiny_lens, out=mine, overwrite=overwrite, **JUDGES)
    assert study_main(study, ["--model", model, "--out", str(mine), "--overwrite"], **LOADERS) == 2
    err = error_line(capsys)
    assert str(mine) in err and "not made by dit-lens" in err
    assert snapshot(mine) == before  # no marker, no lock, not even a probe file written and removed


# -- two different studies at once on one folder -----------------------------------------------------

RACE = """
import os, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from dit_lens.study import ConceptPair, Metric, Study
from dit_lens.study.cli import study_main

class Oracle:
    labels = ["normal cecum", "polyps"]
    def __call__(self, images):
        p = 1 / (1 + np.exp(-(images.mean(axis=(1, 2, 3)) - 0.5) * 40))
        return np.stack([1 - p, p], axis=1)

def segmenter(images):
    return images[..., 0] > images[..., 1] + 0.2

def gate(judged):
    # holds the first cell until the test says go (only in the process given HOLD)
    if os.environ.get("HOLD"):
        started, go = os.environ["HOLD"].split(",")
        open(started, "w").close()
        deadline = time.time() + 120
        while not os.path.exists(go) and time.time() < deadline:
            time.sleep(0.1)
    return judged.probs.sel(branch="edited").max("class") * 0

study = Study("race", pairs=(ConceptPair("polyps", "normal cecum", contexts=("An image of {}",)),),
              methods={"reprompt": {}}, metrics=(Metric("gate", gate),), eval_seeds=2, num_inference_steps=2)
sys.exit(study_main(study, sys.argv[1:], load_oracle=lambda name: Oracle(), load_segmenter=lambda name: segmenter))
"""


def test_two_studies_at_once_on_one_folder_one_wins_whole(model, tmp_path):
    script, out = tmp_path / "race.py", tmp_path / "out"
    script.write_text(textwrap.dedent(RACE))
    started, go = tmp_path / "started", tmp_path / "go"
    env = {**os.environ, "TQDM_DISABLE": "1", "DIT_LENS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    def start(*flags, **extra):  # a process of its own, forked from a warm interpreter
        return children.start(script, "--model", model, "--out", str(out), *flags, env={**env, **extra})

    first = start(HOLD=f"{started},{go}")
    try:
        deadline = time.time() + 180
        while not started.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert started.exists(), first.communicate()[1]  # the first study is inside its first cell now
        second = start("--eval-seeds", "3", "--overwrite")  # another study, replacing the folder
        _, second_err = second.communicate(timeout=300)
    finally:
        go.touch()
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 2, second_err
    line = second_err.strip().splitlines()[-1]
    assert str(out) in line and "in use" in line and "nothing was changed" in line
    # the folder holds the first study, whole: its declaration, its cells, its result
    assert json.loads((out / MARKER).read_text())["identity"]["context"]["eval_seeds"] == 2
    assert json.loads((out / "study.json").read_text())["study"]["eval_seeds"] == 2
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["reprompt_p0.json"]
    cell = json.loads((out / "cells" / "reprompt_p0.json").read_text())
    assert cell["metrics"]["flip_rate"]["n"] == 2 and "gate" in cell["metrics"]
    assert int(xr.open_zarr(out / "result.zarr")["flip_rate_n"].max()) == 2


def test_a_study_folder_is_found_again_whatever_the_model_paths_spelling(study, model, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    assert study_main(study, ["--model", "model", "--out", out], **LOADERS) == 0
    capsys.readouterr()
    assert study_main(study, ["--model", str(tmp_path / "." / "model"), "--out", out], **LOADERS) == 0
    assert "1 finished cells reused" in capsys.readouterr().out


# -- damaged declarations and cells -----------------------------------------------------------------


@pytest.mark.parametrize("content, why", [('{"study": {"name": ', "is unreadable or truncated"),
                                          ('["a", "list"]', "holds a JSON list")])
def test_a_damaged_study_json_is_one_line_naming_the_file(study, tiny_lens, model, tmp_path, capsys, content, why):
    out = tmp_path / "out"
    run_study(study, tiny_lens, out=out, **JUDGES)
    cells = snapshot(out / "cells")
    (out / "study.json").write_text(content)
    with pytest.raises(DamagedError, match=rf"study declaration {out / 'study.json'} {why}.*delete that file"):
        run_study(study, tiny_lens, out=out, **JUDGES)
    assert study_main(study, ["--model", model, "--out", str(out)], **LOADERS) == 2
    err = error_line(capsys)
    assert str(out / "study.json") in err and why in err
    assert snapshot(out / "cells") == cells and (out / "study.json").read_text() == content
    (out / "study.json").unlink()  # the remedy given: the declaration is written again, the cells reused
    xr.testing.assert_identical(run_study(study, tiny_lens, out=out, **JUDGES).drop_attrs(),
                                xr.open_zarr(out / "result.zarr").load().drop_attrs())


def test_a_cell_holding_a_list_is_refused_naming_it(study, tiny_lens, tmp_path):
    run_study(study, tiny_lens, out=tmp_path, **JUDGES)
    (tmp_path / "cells" / "reprompt_p0.json").write_text("[1, 2]")
    with pytest.raises(DamagedError, match=r"study cell .*reprompt_p0\.json holds a JSON list.*repair=True"):
        run_study(study, tiny_lens, out=tmp_path, **JUDGES)


def test_a_replaced_study_removes_only_what_it_recorded(study, tiny_lens, tmp_path):
    run_study(study, tiny_lens, out=tmp_path, **JUDGES)
    (tmp_path / "notes.txt").write_text("kept")  # a user's file beside the study's entries
    CellRunner(study.replace(eval_seeds=3), tiny_lens, BrightnessOracle(), red_segmenter, tmp_path, progress=False,
               overwrite=True).run()
    assert (tmp_path / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["reprompt_p0.json"]
    assert json.loads((tmp_path / "cells" / "reprompt_p0.json").read_text())["metrics"]["flip_rate"]["n"] == 3


# -- numbers that are not finite ---------------------------------------------------------------------


def overflowing(judged):
    """A metric whose per-pair values are finite but whose mean is not."""
    return judged.probs.sel(branch="edited").max("class").astype("float64") * 0 + 1e308


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_a_cell_whose_metric_is_not_finite_is_never_stored(study, tiny_lens, tmp_path):
    s = study.replace(metrics=(Metric("overflowing", overflowing),))
    with pytest.raises(NonFiniteError, match=r"reprompt_p0\.json: the metric 'overflowing' is inf .*nothing was "
                                             r"stored"):
        run_study(s, tiny_lens, out=tmp_path, **JUDGES)
    assert not list(tmp_path.glob("cells/*")) and not (tmp_path / "result.zarr").exists()


# -- Ray: an unreachable cluster; a session that ended ------------------------------------------------


def test_an_unreachable_ray_address_fails_fast_and_claims_nothing(study, tiny_lens, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    from dit_lens.scale import RayExecutor

    if ray.is_initialized():
        ray.shutdown()
    start = time.perf_counter()
    assert study_main(study, ["--executor", "ray", "--ray-address", "127.0.0.1:1", "--out", str(tmp_path / "out")],
                      **LOADERS) == 2
    err = error_line(capsys)
    assert "127.0.0.1:1" in err and "--ray-address" in err
    with pytest.raises(ConnectionError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        run_study(study, tiny_lens, out=tmp_path / "lib", executor=RayExecutor(address="127.0.0.1:1"), **JUDGES)
    assert time.perf_counter() - start < 60 and not ray.is_initialized()
    assert not (tmp_path / "out").exists() and not (tmp_path / "lib").exists()


def _pid(lens, shared, item):
    return os.getpid()


def test_a_kept_pool_is_dropped_when_its_ray_session_ends(tiny_lens):
    ray = pytest.importorskip("ray")
    from dit_lens.scale import RayExecutor

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests are not importable on workers
    executor = RayExecutor(workers=1)
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        first = set(dict(executor.map(tiny_lens, _pid, range(2))).values())
        ray.shutdown()  # the session ends: its workers with it
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        again = set(dict(executor.map(tiny_lens, _pid, range(2))).values())
        assert len(first) == len(again) == 1 and again != first  # new workers, started again
    finally:
        executor.close()
        ray.shutdown()


# -- the world's experiment folders ------------------------------------------------------------------


def test_a_users_folder_is_never_taken_for_a_world_experiment(tmp_path):
    from dit_lens.experiments.long_tail import LongTailConfig, run_long_tail

    small = LongTailConfig(label="polyps", count=1, per_class=1, steps=2, seeds=2, guidance_scales=(1.0,),
                           iterations=1, num_inference_steps=2)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "long_tail.json").write_text(json.dumps(small.to_dict()))  # its own copy of the settings
    (mine / "notes.txt").write_text("notes")
    before = snapshot(mine)
    for overwrite in (False, True):
        with pytest.raises(FolderClaimError, match=rf"long_tail folder {mine} is not empty and was not made by "
                                                   rf"dit-lens.*nothing was changed"):
            run_long_tail(small, mine, progress=False, overwrite=overwrite)
    assert snapshot(mine) == before


@pytest.mark.parametrize("content, why", [('{"read": [1, ', "is unreadable or truncated"),
                                          ("[1, 0]", "holds a JSON list"),
                                          ('{"read": [0, 0]}', "has no digest")])
def test_a_damaged_world_cell_is_one_line_naming_the_file(tmp_path, content, why):
    from dit_lens.experiments.folders import cached_json, claim_experiment

    claim_experiment(tmp_path, "long_tail", {"seeds": 2}, entries=("cells",))
    cell = tmp_path / "cells" / "shipped_g1.json"
    assert cached_json(cell, lambda: {"read": [1, 0]}, timed=False) == {"read": [1, 0]}
    cell.write_text(content)
    with pytest.raises(DamagedError, match=rf"the cell {cell} {why}.*delete that file to measure the cell again"):
        cached_json(cell, lambda: pytest.fail("a stored cell is never computed again"))


def test_an_arms_images_are_reused_only_for_the_generator_that_made_them(tiny_lens, tiny_spec, tmp_path):
    from dit_lens import LatentDrift, load
    from dit_lens.model.builders import build_pixart
    from dit_lens.experiments.adaptation_downstream import AdaptedDownstreamConfig, _stored_synthetic

    cfg = AdaptedDownstreamConfig(synthetic_per_class=1, num_inference_steps=2)
    path, drift = tmp_path / "synthetic" / "adapted.npy", LatentDrift(0.0, steps=None)
    made = _stored_synthetic(path, tiny_lens, drift, cfg)
    np.testing.assert_array_equal(_stored_synthetic(path, tiny_lens, drift, cfg), made)  # reused
    other = load(build_pixart(tiny_spec, seed=1))  # another generator under the same arm name
    for lens, shift in ((other, drift), (tiny_lens, LatentDrift(0.1, steps=None))):
        with pytest.raises(FolderClaimError, match=r"adapted\.npy was made by another generator or drift"):
            _stored_synthetic(path, lens, shift, cfg)
    np.save(path, made * 0.5)  # the images changed after they were written
    with pytest.raises(DamagedError, match=r"adapted\.npy fails its digest.*delete adapted\.npy and adapted\.json"):
        _stored_synthetic(path, tiny_lens, drift, cfg)
