"""Capture throughput: `capture` with its defaults / the plain pipeline making the same images.

The work a user asks for: every block's attn2 token mean at every step for P prompts × S seeds. Both
sides make the same P × S runs with the same sampler, timed in one process, interleaved so that load
drifts hit all alike, `repeats` times each:

- ``plain``: the stock pipeline making the same P × S images in P calls of S (each call batched over
  the seeds, one generator per seed), decoded to numpy as a user gets them;
- ``plain_latent``: the same calls with ``output_type="latent"`` (no VAE decode: capture skips it
  too, as no site depends on it);
- ``capture``: ``capture(lens, prompts, seeds=range(S))`` with every default (batching included)
  into a fresh store: store creation, the hooked runs, writing, the returned dataset.

It prints medians and minima (the least disturbed run, steadier on a shared CPU) and the ratios
capture / plain (the figure the goal names, ≤ 1.05×) and capture / plain_latent (the same model work
on both sides: the cost of hooking and storing alone).

Usage:
    python benchmarks/capture_overhead.py [--prompts 2] [--seeds 8] [--steps 20] [--repeats 5]
        [--pixart] [--sample-size 16] [--device cuda] [--dtype float16] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when it is imported

import torch  # noqa: E402
from timing import interleaved  # noqa: E402  (benchmarks/timing.py, beside this script)

PROMPTS = ("An endoscopic image of polyps", "An endoscopic image of normal cecum", "An endoscopic image of esophagitis",
           "An endoscopic image of ulcerative colitis")


def measure(lens, *, prompts: list[str], seeds: int, steps: int, repeats: int, guidance_scale: float = 4.5) -> dict:
    from dit_lens.trace.capture import capture

    root = Path(tempfile.mkdtemp(prefix="capture-bench-"))
    counter = iter(range(10**6))

    def plain(base: int, output_type: str = "np") -> None:
        for prompt in prompts:
            lens.pipeline([prompt] * seeds, generator=[lens.generator(base + s) for s in range(seeds)],
                          num_inference_steps=steps, guidance_scale=guidance_scale, output_type=output_type,
                          **lens.pipeline_kwargs)

    def captured(base: int) -> None:
        capture(lens, prompts, seeds=range(base, base + seeds), num_inference_steps=steps,
                guidance_scale=guidance_scale, store=root / f"{next(counter)}.zarr")

    runs = {"plain": plain, "plain_latent": lambda base: plain(base, "latent"), "capture": captured}
    _ = lens.fingerprint  # hashed once per model, outside the timings (cached on the Lens)
    return interleaved(runs, repeats)


def report(label: str, lens, args, result: dict) -> None:
    med, best = result["medians"], result["minima"]
    tokens = lens.token_grid[0] * lens.token_grid[1]
    print(f"\n== {label}: {lens.num_layers} blocks, width {lens.width}, {tokens} image tokens; "
          f"{args.prompts} prompts × {args.seeds} seeds, {args.steps} steps, guidance 4.5, n = {args.repeats}")
    for name, values in result["times"].items():
        runs = ", ".join(f"{v:.3f}" for v in values)
        print(f"  {name:<13} median {med[name]:8.3f} s  min {best[name]:8.3f} s  (runs: {runs})")
    for base in ("plain", "plain_latent"):
        print(f"  ratio capture / {base:<13}: median {med['capture'] / med[base]:.3f}x, "
              f"min {best['capture'] / best[base]:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2, help=f"prompts (at most {len(PROMPTS)})")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    parser.add_argument("--pixart", action="store_true", help="also the published PixArt-alpha shape (random weights)")
    parser.add_argument("--sample-size", type=int, default=16, help="latent side for the PixArt-alpha shape (64 = 512 px)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-embedded", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dit_lens import load
    from dit_lens.testing import PIXART_ALPHA_512, build_pixart
    from dit_lens.model.lens import EMBEDDED_PIPELINE

    dtype = getattr(torch, args.dtype) if args.dtype else None
    prompts = list(PROMPTS[: args.prompts])
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype or 'float32'}, threads {torch.get_num_threads()}")
    settings = dict(prompts=prompts, seeds=args.seeds, steps=args.steps, repeats=args.repeats)
    if not args.skip_embedded and (EMBEDDED_PIPELINE / "model_index.json").is_file():
        lens = load("embedded", device=args.device, dtype=dtype)
        report("embedded", lens, args, measure(lens, **settings))
    if args.pixart:
        spec = dataclasses.replace(PIXART_ALPHA_512, sample_size=args.sample_size)
        lens = load(build_pixart(spec, seed=0), device=args.device, dtype=dtype)
        params = sum(p.numel() for p in lens.denoiser.parameters()) / 1e6
        report(f"PixArt-alpha shape, random weights, sample_size {args.sample_size}, {params:.0f} M parameters",
               lens, args, measure(lens, **settings))


if __name__ == "__main__":
    main()
