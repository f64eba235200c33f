"""Counterfactual pairs in one batched pass vs two separate generations (the authors' way).

Both sides produce the same images for the same seeds: the unsteered image and the steered one.
- baseline: for each seed, a plain pipeline call, then a second plain call with a raw forward hook
  steering attn2 (how the authors' code runs a pair);
- dit-lens: `generate(..., steer=...)`, both branches of every pair in one nnsight-hooked call.
Prints the median wall time of each over repeats and the ratio baseline / dit-lens.

    python benchmarks/pair_speedup.py [--model embedded|DIR|tiny|pixart-alpha] [--pairs 4] [--steps 20]
        [--sample-size 64] [--device cuda] [--dtype float16]

``pixart-alpha`` is the published PixArt-alpha transformer shape (28 blocks, width 1152) with random
weights, at latent side ``--sample-size`` (64 = 512 px).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch
import xarray as xr

import dit_lens
from dit_lens import Steer, generate
from dit_lens.testing import PIXART_ALPHA_512, PixArtSpec, build_pixart
from dit_lens.interventions.steer import steer_tokens


def hooked_pair(lens, prompt, seed, steps, steer):
    """The baseline: unsteered call, then a separately steered call through raw hooks."""
    lens.plain(prompt, seed=seed, num_inference_steps=steps)
    state = {"t": -1}
    handles = [lens.denoiser.register_forward_pre_hook(lambda m, a: state.__setitem__("t", state["t"] + 1))]

    def make(layer):
        def hook(module, args, output):
            return steer_tokens(output, steer.vector_at(state["t"], layer), steer.alpha)[0]
        return hook

    for layer in steer.steered_layers():
        handles.append(lens.blocks[layer].attn2.register_forward_hook(make(layer)))
    try:
        return lens.plain(prompt, seed=seed, num_inference_steps=steps)
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded",
                    help="'embedded', a pipeline folder, 'tiny' or 'pixart-alpha'")
    ap.add_argument("--sample-size", type=int, default=16, help="latent side for --model pixart-alpha")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    specs = {
        "tiny": PixArtSpec(num_layers=12, num_heads=4, head_dim=32, sample_size=16, vae_channels=(16, 32, 32)),
        "pixart-alpha": dataclasses.replace(PIXART_ALPHA_512, sample_size=args.sample_size),
    }
    source = build_pixart(specs[args.model], seed=0) if args.model in specs else args.model
    dtype = getattr(torch, args.dtype) if args.dtype else None
    lens = dit_lens.load(source, device=args.device, dtype=dtype)
    rng = np.random.default_rng(0)
    v = rng.normal(size=(args.steps, lens.num_layers, lens.width)).astype(np.float32)
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    steer = Steer(xr.DataArray(v, dims=("step", "layer", "channel")), alpha=2.5)
    prompt, seeds = "An endoscopic image of polyps", list(range(args.pairs))

    def ours():
        generate(lens, prompt, seeds=seeds, steer=steer, num_inference_steps=args.steps,
                 batch_size=args.pairs, progress=False)

    def baseline():
        for s in seeds:
            hooked_pair(lens, prompt, s, args.steps, steer)

    ours(), baseline()  # warm-up
    sync = torch.cuda.synchronize if lens.device.type == "cuda" else (lambda: None)
    timings = {"baseline (2 separate runs per pair)": [], "dit-lens (1 batched pass)": []}
    for _ in range(args.repeats):
        for name, fn in zip(timings, (baseline, ours)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            timings[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in timings.items()}
    print(f"model={args.model} device={lens.device} dtype={lens.denoiser.dtype} layers={lens.num_layers} width={lens.width} tokens={np.prod(lens.token_grid)} "
          f"pairs={args.pairs} steps={args.steps} threads={torch.get_num_threads()} repeats={args.repeats}")
    for k, m in medians.items():
        print(f"  {k:38s} median {m:7.3f} s")
    base, mine = medians.values()
    print(f"  speed-up (baseline / dit-lens)        {base / mine:7.2f}x")


if __name__ == "__main__":
    main()
