"""Attribution patching on the embedded world: its cost against the plain pipeline, its agreement with exact patching.

The work a user asks for: where does the embedded world carry "polyps"? Clean "An endoscopic image of polyps",
corrupt "An endoscopic image of normal cecum", metric ``class_logprob(load_oracle(), "polyps")``, site attn2,
the cell grid (every step × block), direction "denoise", every other setting at its default.

- **Cost.** Timed in one process, interleaved so that load drifts hit all alike, `repeats` times each, on
  `timing_seeds` fresh seeds per repeat:

  - ``plain``: one stock pipeline call per pair, making its clean and its corrupt image (decoded to numpy);
  - ``plain_batched``: the same images in calls of as many pairs as attribution runs seeds together (its
    ``batch_size``, 4);
  - ``attribution``: ``attribution_patching(...)`` with its defaults (checkpointed), metric and dataset
    included;
  - ``attribution_stored``: the same with ``checkpoint=False`` (every step's activations kept).

  It prints medians and minima and the ratios to ``plain`` (the goal: at most 3×) and to ``plain_batched``.
- **Agreement.** On `seeds` seeds from 100 on, exact patching (``patching``, the same settings) and attribution
  patching; Spearman's rank correlation of their effects per cell, averaged over the seeds (the goal: ρ ≥ 0.8),
  each seed's own ρ, and a bootstrap interval over seeds (seeds resampled with replacement).

Usage:
    python benchmarks/attribution.py [--seeds 4] [--steps 20] [--repeats 3] [--timing-seeds 1] [--threads N]
        [--device cuda] [--skip-timing] [--skip-agreement]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when it is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from timing import interleaved  # noqa: E402  (benchmarks/timing.py, beside this script)

CLEAN, CORRUPT = "An endoscopic image of polyps", "An endoscopic image of normal cecum"
FIRST_SEED = 100  # agreement seeds: fresh, none of the timing's (1000 on) nor the tests'


def cost(lens, metric, *, steps: int, seeds: int, repeats: int) -> dict:
    from dit_lens.readouts.attribution import DEFAULT_BATCH, attribution_patching

    def plain(base: int, per_call: int) -> None:
        for start in range(base, base + seeds, per_call):
            pairs = list(range(start, min(start + per_call, base + seeds)))
            lens.pipeline([CLEAN, CORRUPT] * len(pairs), generator=[lens.generator(s) for s in pairs for _ in "ab"],
                          num_inference_steps=steps, guidance_scale=4.5, output_type="np", **lens.pipeline_kwargs)

    def attribution(base: int, checkpoint: bool) -> None:
        attribution_patching(lens, clean=CLEAN, corrupt=CORRUPT, seeds=range(base, base + seeds), metric=metric,
                             num_inference_steps=steps, checkpoint=checkpoint, progress=False)

    runs = {"plain": lambda base: plain(base, 1), "plain_batched": lambda base: plain(base, DEFAULT_BATCH),
            "attribution": lambda base: attribution(base, True),
            "attribution_stored": lambda base: attribution(base, False)}
    _ = lens.fingerprint  # hashed once per model, outside the timings (cached on the Lens)
    return interleaved(runs, repeats)


def agreement(lens, metric, *, steps: int, seeds: int, boot: int = 2000) -> dict:
    from dit_lens import patching
    from dit_lens.readouts.attribution import attribution_patching

    kwargs = dict(clean=CLEAN, corrupt=CORRUPT, seeds=range(FIRST_SEED, FIRST_SEED + seeds), metric=metric,
                  site="attn2", grid="cell", num_inference_steps=steps, progress=False)
    start = time.perf_counter()
    exact = patching(lens, **kwargs)
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    first = attribution_patching(lens, **kwargs)
    first_s = time.perf_counter() - start
    e, a = exact.effect.values.reshape(seeds, -1), first.effect.values.reshape(seeds, -1)  # (seed, cell)
    rho = spearmanr(e.mean(0), a.mean(0))[0]
    per_seed = [spearmanr(e[i], a[i])[0] for i in range(seeds)]
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, seeds, seeds) for _ in range(boot)]
    boots = np.array([spearmanr(e[d].mean(0), a[d].mean(0))[0] for d in draws])
    top = int(np.argmax(np.abs(e.mean(0))))
    return {"rho": rho, "per_seed": per_seed, "interval": np.percentile(boots, [2.5, 97.5]), "exact_s": exact_s,
            "attribution_s": first_s, "cells": e.shape[1], "spread": (exact.metric_clean - exact.metric_corrupt).values,
            "top": (np.unravel_index(top, exact.effect.shape[1:]), e.mean(0)[top], a.mean(0)[top]),
            "whole_exact": e.sum(1), "whole_first": a.sum(1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="seeds of the agreement with exact patching")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    parser.add_argument("--timing-seeds", type=int, default=1, help="pairs per timed run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-agreement", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dit_lens import load, load_oracle
    from dit_lens.readouts.attribution import class_logprob

    lens = load("embedded", device=args.device)
    metric = class_logprob(load_oracle(), "polyps")
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    print(f"== embedded: {lens.num_layers} blocks, width {lens.width}; attn2, grid 'cell', direction 'denoise', "
          f"{args.steps} steps, guidance 4.5, metric {metric.name}")
    if not args.skip_timing:
        result = cost(lens, metric, steps=args.steps, seeds=args.timing_seeds, repeats=args.repeats)
        med, best = result["medians"], result["minima"]
        print(f"\ncost: {args.timing_seeds} pair(s) per timed run, n = {args.repeats} interleaved repeats")
        for name, values in result["times"].items():
            runs = ", ".join(f"{v:.3f}" for v in values)
            print(f"  {name:<19} median {med[name]:8.3f} s  min {best[name]:8.3f} s  (runs: {runs})")
        for name in ("attribution", "attribution_stored"):
            for base in ("plain", "plain_batched"):
                print(f"  ratio {name} / {base:<14}: median {med[name] / med[base]:.3f}x, "
                      f"min {best[name] / best[base]:.3f}x")
    if not args.skip_agreement:
        found = agreement(lens, metric, steps=args.steps, seeds=args.seeds)
        low, high = found["interval"]
        (step, layer), exact_top, first_top = found["top"]
        print(f"\nagreement: n = {args.seeds} seeds ({FIRST_SEED}..{FIRST_SEED + args.seeds - 1}), {found['cells']} cells")
        print(f"  exact patching {found['exact_s']:.1f} s, attribution {found['attribution_s']:.1f} s "
              f"({found['exact_s'] / found['attribution_s']:.1f}x faster)")
        print(f"  m(clean) - m(corrupt) per seed: {np.round(found['spread'], 3).tolist()}")
        print(f"  Spearman rho of the seed-mean effects: {found['rho']:.3f} (bootstrap 95% over seeds: "
              f"{low:.3f} .. {high:.3f})")
        print(f"  per seed: {[round(float(r), 3) for r in found['per_seed']]}")
        print(f"  largest exact cell: step {step}, block {layer}: exact {exact_top:.4f}, attribution {first_top:.4f}")
        print(f"  sum over cells per seed: exact {np.round(found['whole_exact'], 3).tolist()}, "
              f"attribution {np.round(found['whole_first'], 3).tolist()}")


if __name__ == "__main__":
    main()
