"""Where does the embedded world carry "polyps"? Activation patching of ``attn2`` beside the layer sweep's windows.

The layer sweep (``studies/layer_sweep.py``) asks where *steering* removes polyps. Patching asks the causal
question directly, with the judge's log-probability of "polyps" as the metric, clean "polyps" against corrupt
"normal cecum" from the same seeds, on fresh seeds:

- ``direction="noise"`` (necessity): the clean run gets the corrupt run's ``attn2`` output in a window; the
  share of the clean–corrupt gap it loses is ``1 − effect``;
- ``direction="denoise"`` (sufficiency): the corrupt run gets the clean run's output in a window; the share
  of the gap it recovers is ``effect``.

Windows: the layer sweep's (quarters of the depth, the middle half, all blocks; every step), then every
block alone at every step (``grid="layer"``). Each figure is the mean over seeds with a 95% bootstrap
interval (n = seeds), and the share of patched images the judge reads as polyps.

Usage:
    python benchmarks/patching_map.py [--seeds 8] [--seed-base 130000] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")

WINDOWS = [((0.0, 0.25), None), ((0.25, 0.5), None), ((0.5, 0.75), None), ((0.75, 1.0), None),
           ((0.25, 0.75), None), (None, None)]
CLEAN, CORRUPT = "An endoscopic image of polyps", "An endoscopic image of normal cecum"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--seed-base", type=int, default=130000, help="fresh seeds: never used to tune anything")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import dit_lens
    from dit_lens.readouts.attribution import class_logprob
    from dit_lens.metrics import estimate

    lens = dit_lens.load("embedded")
    oracle = dit_lens.load_oracle()
    metric = class_logprob(oracle, "polyps")
    seeds = list(range(args.seed_base, args.seed_base + args.seeds))
    print(f"embedded world, {lens.num_layers} blocks, {args.steps} steps, seeds {seeds[0]}..{seeds[-1]} "
          f"(n={len(seeds)}), torch threads {torch.get_num_threads()}, dit-lens {dit_lens.__version__}")

    def share(values: np.ndarray) -> str:
        e = estimate(values)
        return f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"

    for direction, grid in (("noise", WINDOWS), ("denoise", WINDOWS), ("noise", "layer")):
        start = time.perf_counter()
        ds = dit_lens.patching(lens, clean=CLEAN, corrupt=CORRUPT, seeds=seeds, metric=metric, grid=grid,
                               direction=direction, num_inference_steps=args.steps, progress=False)
        gap = (ds.metric_clean - ds.metric_corrupt).values
        print(f"\ndirection={direction}, grid={'windows' if not isinstance(grid, str) else grid} "
              f"({time.perf_counter() - start:.0f} s); log p(polyps) clean − corrupt: {share(gap)}")
        dim = "window" if "window" in ds.effect.dims else "layer"
        # from the metric alone: read as polyps where p(polyps) > 0.5 (then it is the judge's top class)
        for k in ds[dim].values:
            effect = ds.effect.sel({dim: k}).values
            label = (f"blocks {ds.layer_window.sel(window=k).item()}" if dim == "window" else f"block {int(k)}")
            kept = np.exp(ds.metric_patched.sel({dim: k}).values) > 0.5
            what = "gap lost (1 − effect)" if direction == "noise" else "gap recovered (effect)"
            value = 1 - effect if direction == "noise" else effect
            print(f"  {label:>16}: {what} {share(value)}; read as polyps (p > 0.5) {kept.mean():.3f}")


if __name__ == "__main__":
    main()
