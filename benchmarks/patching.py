"""Exact activation patching: `patching` with its defaults / the plain pipeline making the same images.

The work a user asks for: an exact patching grid (``grid="layer"`` by default: every block of ``attn2``
patched at every step, clean "polyps" into corrupt "normal cecum"; with ``--heads`` every head of it one at a
time) for S seeds. Timed in one process,
interleaved so that load drifts hit all alike, `repeats` times each:

- ``plain``: the stock pipeline making the images a patching result rests on, S × (patches + 2) (each
  seed's patched runs, its clean and its corrupt run, as a loop over the plain pipeline makes them), in
  calls of `batch_size` (one generator per image), decoded to numpy as a user gets them;
- ``plain_rows``: the stock pipeline making every row the patching calls hold (their patched runs, in
  each call the run its patches copy from, and once per seed the other unpatched run), in calls of the
  same sizes: the same model work;
- ``patching``: ``patching(lens, clean=..., corrupt=..., seeds=range(S), metric=brightness, grid=...)``
  with every other default (``batch_size`` 16), metric and dataset included.

It prints medians and minima and the ratios patching / plain (the figure the goal names, ≤ 1.1×) and
patching / plain_rows (the cost of hooking alone), in wall time and in the process's CPU time (user + system,
every thread): on a machine other jobs share, wall times swing with their load, CPU times much less.

Usage:
    python benchmarks/patching.py [--grid layer] [--heads] [--seeds 1] [--steps 20] [--repeats 3]
        [--batch-size 16] [--device cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when it is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timing import interleaved  # noqa: E402  (benchmarks/timing.py, beside this script)

CLEAN, CORRUPT = "An endoscopic image of polyps", "An endoscopic image of normal cecum"


def brightness(images: np.ndarray) -> np.ndarray:
    return images.mean(axis=(1, 2, 3))


def calls(patches: int, seeds: int, batch_size: int) -> tuple[list[int], list[int]]:
    """The sizes of the plain calls making every image a patching result rests on (each seed's patched runs, its
    clean and its corrupt run) in calls of `batch_size`, and of the patching calls as `patching` lays them out:
    seed-major, `batch_size` patched runs per call beside each seed's source run, and the seed's other unpatched
    run in its first call."""
    images = seeds * (patches + 2)
    plain = [min(batch_size, images - i) for i in range(0, images, batch_size)]
    runs = [s for s in range(seeds) for _ in range(patches)]
    chunks = [runs[i : i + batch_size] for i in range(0, len(runs), batch_size)]
    seen: set[int] = set()
    rows = []
    for chunk in chunks:
        rows.append(len(chunk) + len(set(chunk)) + len(set(chunk) - seen))
        seen.update(chunk)
    return plain, rows


def cpu_timed(fn, record: list[float]):
    """`fn` that appends the process CPU seconds of each call to `record`."""
    def run(base: int) -> None:
        start = time.process_time()
        fn(base)
        record.append(time.process_time() - start)
    return run


def measure(lens, *, grid: str, heads: bool, seeds: int, steps: int, repeats: int,
            batch_size: int) -> tuple[dict, dict]:
    from dit_lens import patching

    patches = {"layer": lens.num_layers, "step": steps, "cell": lens.num_layers * steps}[grid]
    if heads:
        patches *= lens.site_module("attn2", 0).heads
    plain_sizes, row_sizes = calls(patches, seeds, batch_size)

    def plain(base: int, sizes: list[int]) -> None:
        start = base
        for size in sizes:
            lens.pipeline([CORRUPT] * size, generator=[lens.generator(start + i) for i in range(size)],
                          num_inference_steps=steps, guidance_scale=4.5, output_type="np", **lens.pipeline_kwargs)
            start += size

    def patched(base: int) -> None:
        extra = {"heads": True} if heads else {}  # the keyword only when asked: the script also times older code
        patching(lens, clean=CLEAN, corrupt=CORRUPT, seeds=range(base, base + seeds), metric=brightness, grid=grid,
                 num_inference_steps=steps, batch_size=batch_size, progress=False, **extra)

    runs = {"plain": lambda base: plain(base, plain_sizes), "plain_rows": lambda base: plain(base, row_sizes),
            "patching": patched}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    runs = {name: cpu_timed(fn, cpu[name]) for name, fn in runs.items()}
    _ = lens.fingerprint  # hashed once per model, outside the timings (cached on the Lens)
    work = {"patches": patches, "images": sum(plain_sizes), "rows": sum(row_sizes), "plain_calls": plain_sizes,
            "patching_calls": row_sizes}
    result = interleaved(runs, repeats)
    result["cpu"] = {name: values[1:] for name, values in cpu.items()}  # the first call of each is the warm-up
    return result, work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="layer", choices=["layer", "step", "cell"])
    parser.add_argument("--heads", action="store_true", help="patch every head of attn2 one at a time")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    parser.add_argument("--batch-size", type=int, default=16, help="patched runs per call (patching's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dit_lens import load

    lens = load("embedded", device=args.device)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    result, work = measure(lens, grid=args.grid, heads=args.heads, seeds=args.seeds, steps=args.steps,
                           repeats=args.repeats, batch_size=args.batch_size)
    med, best = result["medians"], result["minima"]
    print(f"\n== embedded: {lens.num_layers} blocks, width {lens.width}; grid={args.grid!r}"
          f"{' per head' if args.heads else ''} ({work['patches']} patches) "
          f"× {args.seeds} seeds, {args.steps} steps, guidance 4.5, batch_size {args.batch_size}, n = {args.repeats}")
    print(f"  plain makes {work['images']} images in calls of {work['plain_calls']}; patching makes {work['rows']} "
          f"rows in calls of {work['patching_calls']}")
    for name, values in result["times"].items():
        runs = ", ".join(f"{v:.3f}" for v in values)
        print(f"  {name:<11} median {med[name]:8.3f} s  min {best[name]:8.3f} s  (runs: {runs})")
    for base in ("plain", "plain_rows"):
        print(f"  ratio patching / {base:<10}: median {med['patching'] / med[base]:.3f}x, "
              f"min {best['patching'] / best[base]:.3f}x")
    cpu = {name: (statistics.median(values), min(values)) for name, values in result["cpu"].items()}
    print("  CPU time (process, all threads):")
    for name, values in result["cpu"].items():
        runs = ", ".join(f"{v:.3f}" for v in values)
        print(f"  {name:<11} median {cpu[name][0]:8.3f} s  min {cpu[name][1]:8.3f} s  (runs: {runs})")
    for base in ("plain", "plain_rows"):
        print(f"  CPU ratio patching / {base:<10}: median {cpu['patching'][0] / cpu[base][0]:.3f}x, "
              f"min {cpu['patching'][1] / cpu[base][1]:.3f}x")


if __name__ == "__main__":
    main()
