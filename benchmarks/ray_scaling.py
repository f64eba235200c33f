"""Ray scale-out: one quick study run in this process, on one Ray worker, and on several.

The work a user asks for: ``run_study`` of a study file's quick version (default
``studies/layer_sweep.py --quick``: its concept vector and every cell, with the embedded oracle), into
a fresh result folder and a fresh cache each time, so every side computes the vector and every cell.
The variants, timed in turn `repeats` times on fresh evaluation seeds (benchmarks/timing.py):

- ``plain``: ``run_study(study, lens)`` with its defaults (this process, torch's default threads);
- ``ray_1``: ``executor=RayExecutor(workers=1, num_cpus=C)``, C the machine's cores: the same threads
  as ``plain`` on one worker, so ``ray_1 / plain`` is what a command-line run pays (worker start included);
- ``ray_N``: ``RayExecutor(workers=N, num_cpus=C / N)``: the same cores split over N workers;
- ``ray_1_kept``, ``ray_N_kept``: each again right after it, on the workers it kept.

``ray_1`` and ``ray_N`` start their workers in the timed run (``close()`` first), as a study run from
the command line does; the ``_kept`` variants are a second study in the same Python session, which
starts none (``ray_1_kept / plain`` is the cost of the Ray path itself: shipping work and results).
`ray.init` happens once before, and its time is printed apart. The first (warm-up) run of every variant
is also checked: every metric of every cell equal to the plain run's, so all sides did the same work.

Usage:
    python benchmarks/ray_scaling.py [--study layer_sweep] [--workers 2] [--repeats 3] [--full]

On a GPU cluster: start Ray there (``ray start --head`` / your scheduler), keep the pipeline folder,
``$DIT_LENS_CACHE`` and the result folder on a file system every node mounts at the same path, and
run ``python studies/<name>.py --executor ray --ray-address auto --gpus-per-worker 1``: one worker per
GPU, each loading the model once; cells are independent, so the run scales with the GPUs until the
cells run out (a study of C cells keeps at most C workers busy).
"""

from __future__ import annotations

import argparse
import os
import runpy
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when it is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timing import interleaved  # noqa: E402  (benchmarks/timing.py, beside this script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="layer_sweep", help="a file of studies/ (default: layer_sweep)")
    parser.add_argument("--full", action="store_true", help="the full study, not its quick version")
    parser.add_argument("--workers", type=int, default=2, help="workers of the scaled-out variant (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (default: 3)")
    args = parser.parse_args()

    import ray

    from dit_lens import load
    from dit_lens.scale import RayExecutor
    from dit_lens.study import run_study
    from dit_lens.study.cli import find_study
    from dit_lens.trace.store import CACHE_ENV
    from dit_lens.world import load_oracle, load_segmenter

    cores = os.cpu_count() or 1
    study = runpy.run_path(str(find_study(args.study)))["STUDY"]
    study = study if args.full else study.quick_version()
    lens = load("embedded")
    _ = lens.fingerprint  # hashed once per model, outside the timings (cached on the Lens)
    oracle, segmenter = load_oracle("embedded"), load_segmenter("embedded")
    start = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR")
    print(f"ray {ray.__version__}: ray.init {time.perf_counter() - start:.1f} s (once, not in the timings)")

    root = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    counter = iter(range(10**6))
    single = RayExecutor(workers=1, num_cpus=cores)
    split = RayExecutor(workers=args.workers, num_cpus=cores / args.workers)
    executors = {"plain": (None, False), "ray_1": (single, True), "ray_1_kept": (single, False),
                 f"ray_{args.workers}": (split, True), f"ray_{args.workers}_kept": (split, False)}
    first: dict[str, object] = {}

    def variant(name: str):
        def run(base: int) -> None:
            folder = root / f"{next(counter)}-{name}"
            os.environ[CACHE_ENV] = str(folder / "cache")  # a fresh cache: the vector is computed again
            executor, cold = executors[name]
            if cold:
                executor.close()  # its workers start within this run
            result = run_study(study.replace(eval_seed_base=100_000 + base), lens, oracle=oracle,
                               segmenter=segmenter, out=folder / "out", executor=executor, progress=False)
            first.setdefault(name, result)
        return run

    result = interleaved({name: variant(name) for name in executors}, args.repeats)
    for name, other in first.items():  # the warm-up runs, on the same seeds: the same values
        for metric in first["plain"].data_vars:
            np.testing.assert_array_equal(first["plain"][metric].values, other[metric].values,
                                          err_msg=f"{name}: {metric}")
    cells = int(np.prod([first["plain"].sizes[d] for d in first["plain"]["flip_rate"].dims]))
    print(f"\n== {study.name}: {cells} cells × {study.eval_seeds} pairs, {study.num_inference_steps} steps; "
          f"{cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads in this process); "
          f"n = {args.repeats} timed runs each; every variant's cells equal to plain's")
    med, best = result["medians"], result["minima"]
    for name, values in result["times"].items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"  {name:<10} median {med[name]:7.1f} s  min {best[name]:7.1f} s  (runs: {runs})")
    names = list(executors)
    for a, b in ((names[1], "plain"), (names[2], "plain"), (names[3], "plain"), (names[4], "plain"),
                 (names[3], names[1]), (names[4], names[2])):
        print(f"  ratio {a:<10} / {b:<6}: median {med[a] / med[b]:.3f}x, min {best[a] / best[b]:.3f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
