"""Memory and throughput of `train_sae` on a token-level store larger than the memory it is given.

The store is a genuine capture store (`dit_lens.trace.store.CaptureStore`: the layout, chunking, checksums and
``done`` record `capture(..., reduce=None)` writes), filled with synthetic Gaussian tokens so that a store of
hundreds of MB is made in seconds rather than by running a model for minutes; only its size matters here. The
training runs in a child process that, once its imports are done, caps its own address space
(``resource.setrlimit(RLIMIT_AS)``) at what it has mapped then plus ``--budget`` MB, less than the store holds,
and trains on every training token of the store once (zarr's reader threads, two, and glibc's malloc arenas,
two, are started and fixed before the cap: each new thread maps stack and arena space). It prints the store
size, the budget, the peak resident memory above the child's baseline, and the tokens per second (torch threads
as given).

The bound `train_sae` keeps: one buffer of ``buffer_tokens`` (at least one cell) of float32 tokens, shuffled
(× 3 for the read, the concatenation and the permutation), plus the SAE and Adam's state (4 copies of
2 × features × C floats).

Usage:
    python benchmarks/sae_memory.py [--seeds 64] [--budget 256] [--threads 1] [--buffer 32768] [--folder DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

PROMPTS, STEPS, LAYERS, TOKENS, WIDTH = 2, 10, 12, 64, 128


def make_store(path: Path, seeds: int) -> float:
    """A complete token-level store of synthetic tokens; returns its size on disk in MB."""
    import numpy as np
    import xarray as xr

    from dit_lens.trace.store import CaptureStore, VariableSpec

    template = xr.Dataset(coords={"prompt": [f"prompt {i}" for i in range(PROMPTS)], "seed": np.arange(seeds),
                                  "step": np.arange(STEPS), "layer": np.arange(LAYERS), "token": np.arange(TOKENS)})
    spec = VariableSpec("attn2", ("prompt", "seed", "step", "layer", "token", "channel"),
                        (PROMPTS, seeds, STEPS, LAYERS, TOKENS, WIDTH), (1, 1, 1, 1, TOKENS, WIDTH))
    store = CaptureStore.open(path, template, spec, identity={"synthetic": seeds},
                              attrs={"model_fingerprint": "synthetic", "capture_key": f"synthetic-{seeds}"})
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(32, WIDTH)).astype(np.float32) / 4  # tokens on a few directions, plus noise
    for i in range(PROMPTS):
        for j in range(seeds):
            codes = np.maximum(rng.normal(size=(STEPS, LAYERS, TOKENS, 32)), 0).astype(np.float32)
            noise = rng.normal(size=(STEPS, LAYERS, TOKENS, WIDTH)).astype(np.float32)
            store.write((i, j), codes @ mixing + 0.05 * noise)
        store.mark_done([(i, j) for j in range(seeds)])
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def child(store: str, budget_mb: int, threads: int, buffer: int, out: str) -> None:
    """Train under an address-space cap; print a JSON line of what was measured."""
    import torch

    from dit_lens.features import train_sae
    from dit_lens.features.sae import require_sparsify

    import zarr

    from dit_lens.features.train import open_tokens, read_cell

    require_sparsify()
    torch.set_num_threads(threads)
    zarr.config.set({"threading.max_workers": 2, "async.concurrency": 2})  # a fixed pool, started before the cap
    read_cell(open_tokens(store), (0, 0))
    mapped = _status("VmSize")
    baseline = _status("VmRSS")
    cap = mapped + budget_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    seeds = int(store.split("-")[-1].split(".")[0])
    training = PROMPTS * (seeds - max(1, round(0.25 * seeds))) * STEPS * LAYERS * TOKENS
    tokens = training // 1024 * 1024
    start = time.perf_counter()
    sae = train_sae(store, k=32, expansion=4, tokens=tokens, batch_size=1024, buffer_tokens=buffer, out=out,
                    resume=False, progress=False)  # trained again on every run: a timing, not a cache read
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "threads": threads,
                      "baseline_rss_mb": baseline / 2**20, "peak_rss_mb": peak / 2**20,
                      "above_baseline_mb": (peak - baseline) / 2**20, "cap_above_mapped_mb": budget_mb,
                      "fvu": sae.fvu}))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=64)
    parser.add_argument("--budget", type=int, default=256, help="MB of address space above the child's imports")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--buffer", type=int, default=2**15, help="buffer_tokens")
    parser.add_argument("--folder", default=None, help="where to build the store (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.budget, args.threads, args.buffer, args.child[1])
        return
    folder = Path(args.folder or tempfile.mkdtemp(prefix="sae-memory-"))
    store = folder / f"tokens-{args.seeds}.zarr"
    start = time.perf_counter()
    size = make_store(store, args.seeds) if not store.exists() else sum(
        f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**20
    print(f"store {store}: {size:.0f} MB on disk, {PROMPTS * args.seeds * STEPS * LAYERS * TOKENS} tokens × {WIDTH} "
          f"channels ({time.perf_counter() - start:.0f} s to write)")
    done = subprocess.run([sys.executable, __file__, "--child", str(store), str(folder / f"sae-{args.seeds}"), "--budget",
                           str(args.budget), "--threads", str(args.threads), "--buffer", str(args.buffer)],
                          capture_output=True, text=True, env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    if done.returncode != 0:
        print(done.stderr[-3000:])
        raise SystemExit(f"training under a {args.budget} MB cap failed (exit {done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"trained on {result['tokens']} tokens under an address-space cap of +{args.budget} MB (store {size:.0f} MB):"
          f" peak RSS {result['peak_rss_mb']:.0f} MB, {result['above_baseline_mb']:.0f} MB above the baseline "
          f"{result['baseline_rss_mb']:.0f} MB after imports; {result['tokens_per_s']:.0f} tokens/s on "
          f"{result['threads']} thread(s); FVU {result['fvu']:.3f}")


if __name__ == "__main__":
    main()
