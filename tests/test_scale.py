"""Ray executors: the same images, capture values and study cells as one process, from workers that
share one store and one study folder; a worker that dies has its item run again."""

import os
import sys

import numpy as np
import pytest
import xarray as xr

from dit_lens import capture, generate
from dit_lens.scale import LocalExecutor, RayExecutor, as_executor
from dit_lens.scale.executors import WorkerLostError
from dit_lens.study import Study, run_study

import test_study
from test_study import ONE, BrightnessOracle, red_segmenter

ray = pytest.importorskip("ray")
for _module in (test_study, sys.modules[__name__]):  # tests are not importable on workers: send them by value
    ray.cloudpickle.register_pickle_by_value(_module)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield RayExecutor(workers=2)
    ray.shutdown()


def test_generate_on_two_workers_matches_one_process(tiny_lens, cluster):
    kwargs = dict(seeds=range(5), num_inference_steps=3, batch_size=2, progress=False)
    here = generate(tiny_lens, ["a polyp", "a cecum"], **kwargs)
    there = generate(tiny_lens, ["a polyp", "a cecum"], executor=cluster, **kwargs)
    np.testing.assert_array_equal(here.image.values, there.image.values)
    assert here.attrs == there.attrs


def test_two_workers_fill_one_capture_store(tiny_lens, cluster, tmp_path):
    kwargs = dict(seeds=range(4), num_inference_steps=3, batch_size=2)
    here = capture(tiny_lens, ["a polyp", "a cecum"], store=tmp_path / "here.zarr", **kwargs)
    there = capture(tiny_lens, ["a polyp", "a cecum"], store=tmp_path / "there.zarr", executor=cluster, **kwargs)
    np.testing.assert_array_equal(here.attn2.values, there.attn2.values)
    assert bool(xr.open_zarr(tmp_path / "there.zarr")["done"].all())
    again = capture(tiny_lens, ["a polyp", "a cecum"], store=tmp_path / "there.zarr", **kwargs)  # read back
    np.testing.assert_array_equal(again.attn2.values, here.attn2.values)


def test_a_study_on_two_workers_gives_the_same_cells_and_result(tiny_lens, cluster, tmp_path):
    s = Study("scale", pairs=(ONE,), methods={"medsteer": {"alpha": (0.0, 3.0), "vector_seeds": (2,)}, "reprompt": {}},
              eval_seeds=2, num_inference_steps=3)
    judges = dict(oracle=BrightnessOracle(), segmenter=red_segmenter, progress=False)
    here = run_study(s, tiny_lens, out=tmp_path / "here", **judges)
    there = run_study(s, tiny_lens, out=tmp_path / "there", executor=cluster, **judges)
    for name in here.data_vars:
        np.testing.assert_array_equal(here[name].values, there[name].values, err_msg=name)
    cells = sorted(p.name for p in (tmp_path / "there" / "cells").iterdir())
    assert cells == sorted(p.name for p in (tmp_path / "here" / "cells").iterdir()) and len(cells) == 3


def _dies_once(lens, marker, item):
    if item == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # the worker process dies in the middle of its item
    return item * 10


def _always_dies(lens, shared, item):
    os._exit(1)


def test_a_worker_that_dies_has_its_item_run_again(tiny_lens, cluster, tmp_path):
    done = dict(cluster.map(tiny_lens, _dies_once, [0, 1, 2], shared=str(tmp_path / "died")))
    assert done == {0: 0, 1: 10, 2: 20} and (tmp_path / "died").exists()
    with pytest.raises(WorkerLostError, match="died 1 times"):
        list(RayExecutor(workers=1, max_retries=0).map(tiny_lens, _always_dies, [0]))


def test_more_workers_than_the_cluster_holds_are_refused_not_waited_for(tiny_lens, cluster):
    with pytest.raises(ValueError, match=r"needs 3 CPUs \(3 workers × 1\), but the Ray cluster has 2"):
        list(RayExecutor(workers=3).map(tiny_lens, _pid, range(3)))
    with pytest.raises(ValueError, match=r"needs 1 GPUs \(1 workers × 1\), but the Ray cluster has 0"):
        list(RayExecutor(workers=1, num_gpus=1).map(tiny_lens, _pid, range(1)))
    assert len(dict(RayExecutor(workers=3).map(tiny_lens, _pid, range(2)))) == 2  # two items: two workers fit


def test_an_item_that_fails_raises_its_own_error(tiny_lens, cluster):
    with pytest.raises(ValueError, match="steps"):
        generate(tiny_lens, ["a polyp"], seeds=[0], num_inference_steps=0, executor=cluster, progress=False)


def test_bad_executors_are_refused_with_what_to_pass():
    assert isinstance(as_executor(None), LocalExecutor) and isinstance(as_executor("ray"), RayExecutor)
    with pytest.raises(ValueError, match="executor must be None, 'local', 'ray'"):
        as_executor("dask")
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        RayExecutor(workers=0)


def _cache_and_progress(lens, shared, item):
    from dit_lens.trace.store import cache_root

    return str(cache_root()), os.environ.get("TQDM_DISABLE")


def test_workers_use_the_callers_cache_and_show_no_bars_of_their_own(tiny_lens, cluster, tmp_path, monkeypatch):
    for name in ("cache", "other"):  # set after Ray started, and changed between calls on the same workers
        monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path / name))
        [(_, (root, quiet))] = list(cluster.map(tiny_lens, _cache_and_progress, [0]))
        assert root == str((tmp_path / name).resolve()) and quiet == "1"


def _pid(lens, shared, item):
    return os.getpid(), lens.fingerprint


def test_workers_are_kept_between_calls_until_closed_or_the_model_changes(tiny_lens, tiny_spec, cluster):
    from dit_lens import load
    from dit_lens.model.builders import build_pixart

    first = set(dict(cluster.map(tiny_lens, _pid, range(4))).values())
    again = set(dict(RayExecutor(workers=2).map(tiny_lens, _pid, range(4))).values())  # an equal executor
    assert again == first and len(first) == 2
    other = load(build_pixart(tiny_spec, seed=1))  # another model: other weights
    moved = set(dict(cluster.map(other, _pid, range(4))).values())
    assert {fp for _, fp in moved} == {other.fingerprint} and not {pid for pid, _ in moved} & {pid for pid, _ in first}
    cluster.close()
    fresh = set(dict(cluster.map(tiny_lens, _pid, range(4))).values())
    assert not {pid for pid, _ in fresh} & {pid for pid, _ in moved}
    alone = set(dict(RayExecutor(workers=1).map(tiny_lens, _pid, range(2))).values())  # another executor: it ends
    after = set(dict(cluster.map(tiny_lens, _pid, range(4))).values())  # the kept ones, which hold the cores
    assert len(alone) == 1 and not {pid for pid, _ in after} & {pid for pid, _ in fresh | alone}


def test_the_study_command_line_runs_on_ray_workers(tiny_pipeline, cluster, tmp_path, capsys):
    from dit_lens.study.cli import executor, parser, study_main

    s = Study("cli-scale", pairs=(ONE,), methods={"medsteer": {"alpha": (0.0, 3.0), "vector_seeds": (2,)}},
              eval_seeds=2, num_inference_steps=3)
    made = executor(parser(s).parse_args(["--executor", "ray", "--workers", "3", "--gpus-per-worker", "1"]))
    assert made == RayExecutor(workers=3, num_gpus=1.0) and executor(parser(s).parse_args([])) is None
    loaders = dict(load_oracle=lambda name: BrightnessOracle(), load_segmenter=lambda name: red_segmenter)
    assert study_main(s, ["--workers", "2", "--out", str(tmp_path / "no")], **loaders) == 2
    assert "--workers only apply with --executor ray" in capsys.readouterr().err and not (tmp_path / "no").exists()
    tiny_pipeline.save_pretrained(tmp_path / "model")
    runs = {}
    for name, flags in (("local", []), ("ray", ["--executor", "ray", "--workers", "2"])):
        assert study_main(s, ["--model", str(tmp_path / "model"), "--out", str(tmp_path / name), *flags], **loaders) == 0
        runs[name] = xr.open_zarr(tmp_path / name / "result.zarr").load()
    for metric in runs["local"].data_vars:
        np.testing.assert_array_equal(runs["local"][metric].values, runs["ray"][metric].values, err_msg=metric)
