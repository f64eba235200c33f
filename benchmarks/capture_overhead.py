"""Capture overhead: wall time of `dit_lens.trace.capture` / wall time of the plain pipeline call.

Measured in one run, on the embedded model (when installed) and on the published PixArt-alpha
transformer shape (28 blocks, width 1152) with random weights at a small resolution. Per model it
times, interleaved so that load drifts hit all alike, `repeats` times each:

- ``plain``: the reference call ``lens.plain(prompt, seed=...)`` (``output_type="np"``);
- ``plain_latent``: the same call with ``output_type="latent"`` (no VAE decode);
- ``hooked``: the nnsight run that capture makes (every block's attn2 token mean at every step),
  without the store;
- ``capture``: ``capture(lens, [prompt], seeds=[seed])`` into a fresh store (every block's attn2
  token mean at every step, conditional branch), everything included: store creation, the hooked
  run (which skips the VAE decode, as no site depends on it), writing the store.

It prints medians and minima (the least disturbed run, steadier on a shared CPU) and the ratios
capture / plain (the figure the issue asks for), capture / plain_latent (the same model work on
both sides: hooking + store cost) and capture / hooked (store cost alone).

Usage:
    PYTHONPATH=. python benchmarks/capture_overhead.py [--steps 4] [--repeats 3] [--sample-size 16]
        [--threads 1] [--device cuda] [--dtype float16]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when it is imported

import torch  # noqa: E402


def _time(fn) -> float:
    """Wall seconds of fn(), with the GPU's queued work finished on both sides."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure(lens, *, steps: int, repeats: int, guidance_scale: float = 4.5) -> dict:
    from dit_lens.trace.capture import capture
    from dit_lens.trace.runner import traced_generate

    prompt = "An endoscopic image of a polyp"
    root = Path(tempfile.mkdtemp(prefix="capture-bench-"))
    counter = iter(range(10**6))

    def plain(seed: int) -> None:
        lens.plain(prompt, seed=seed, num_inference_steps=steps, guidance_scale=guidance_scale)

    def plain_latent(seed: int) -> None:
        lens.pipeline(prompt, generator=lens.generator(seed), num_inference_steps=steps,
                      guidance_scale=guidance_scale, output_type="latent", **lens.pipeline_kwargs)

    def captured(seed: int) -> None:
        capture(lens, [prompt], seeds=[seed], num_inference_steps=steps,
                guidance_scale=guidance_scale, store=root / f"{next(counter)}.zarr")

    def hooked(seed: int) -> None:  # the nnsight run capture makes, without the store
        shape = (steps, lens.num_layers, 2, lens.width)
        buffer = torch.empty(shape, device=lens.device)  # (step, layer, rows, C)

        def visit(step: int, index: int, output: torch.Tensor) -> None:
            buffer[step, index] = output.mean(dim=1, dtype=torch.float32)

        traced_generate(lens, [prompt], [seed], num_inference_steps=steps,
                        guidance_scale=guidance_scale, site="attn2",
                        layers=tuple(range(lens.num_layers)), visit=visit)

    runs = {"plain": plain, "plain_latent": plain_latent, "hooked": hooked, "capture": captured}
    _ = lens.fingerprint  # hashed once per model, outside the timings (cached on the Lens)
    for fn in runs.values():  # warm up every path once
        fn(0)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name, fn in runs.items():
            times[name].append(_time(lambda: fn(repeat + 1)))
    medians = {name: statistics.median(values) for name, values in times.items()}
    minima = {name: min(values) for name, values in times.items()}
    return {"times": times, "medians": medians, "minima": minima}


def report(label: str, lens, steps: int, result: dict) -> None:
    med, best = result["medians"], result["minima"]
    tokens = lens.token_grid[0] * lens.token_grid[1]
    print(f"\n== {label}: {lens.num_layers} blocks, width {lens.width}, {tokens} image tokens, "
          f"{steps} steps, guidance on (batch 2)")
    for name, values in result["times"].items():
        runs = ", ".join(f"{v:.3f}" for v in values)
        print(f"  {name:<13} median {med[name]:8.3f} s  min {best[name]:8.3f} s  (runs: {runs})")
    for base in ("plain", "plain_latent", "hooked"):
        print(f"  ratio capture / {base:<13}: median {med['capture'] / med[base]:.3f}x, "
              f"min {best['capture'] / best[base]:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    parser.add_argument("--sample-size", type=int, default=16,
                        help="latent side for the PixArt-alpha shape (64 = 512 px)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="weight dtype (default: as built, float32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dit_lens import PIXART_ALPHA_512, build_pixart, load
    from dit_lens.model.lens import EMBEDDED_PIPELINE

    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype or 'float32'}, "
          f"threads {torch.get_num_threads()}")
    if (EMBEDDED_PIPELINE / "model_index.json").is_file():
        lens = load("embedded", device=args.device, dtype=dtype)
        report("embedded", lens, args.steps, measure(lens, steps=args.steps, repeats=args.repeats))
    else:
        print(f"\n== embedded: absent ({EMBEDDED_PIPELINE} not built), skipped")

    spec = dataclasses.replace(PIXART_ALPHA_512, sample_size=args.sample_size)
    lens = load(build_pixart(spec, seed=0), device=args.device, dtype=dtype)
    params = sum(p.numel() for p in lens.denoiser.parameters()) / 1e6
    label = (f"PIXART_ALPHA_512 shape, random weights, sample_size {args.sample_size}, "
             f"{params:.0f} M parameters")
    report(label, lens, args.steps, measure(lens, steps=args.steps, repeats=args.repeats))


if __name__ == "__main__":
    main()
