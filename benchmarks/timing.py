"""Shared by the benchmarks: wall time with the GPU's queued work finished, and interleaved repeats."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of fn(), with the GPU's queued work finished on both sides."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(runs: dict[str, Callable[[int], object]], repeats: int) -> dict:
    """Warm every variant up once (seed base 0), then time them in turn `repeats` times, each repeat on
    fresh seeds (base ``1000 · (repeat + 1)``) so nothing is read back from a cache. Returns the times,
    medians and minima per variant."""
    for fn in runs.values():
        fn(0)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name, fn in runs.items():
            base = 1000 * (repeat + 1)
            times[name].append(timed(lambda: fn(base)))
    return {"times": times, "medians": {n: statistics.median(v) for n, v in times.items()},
            "minima": {n: min(v) for n, v in times.items()}}
