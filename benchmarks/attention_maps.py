"""Cost of `attention_maps`: every layer and step / the plain pipeline making the same images.

The work a user asks for: the cross-attention map of every word of P prompts × S seeds at every
layer and step. Both sides make the same P × S images (decoded to numpy) with the same sampler and
the same batching (`attention_maps`' default, 8 runs per call), timed in one process, interleaved so
that load drifts hit all alike, `repeats` times each:

- ``plain``: the stock pipeline, the same calls of 8 runs (one generator per seed);
- ``maps``: ``attention_maps(lens, prompts, seeds=..., words=...)`` with every other default
  (all layers, all steps, batches of 8).

It prints medians and minima (the least disturbed run, steadier on a shared CPU) and the ratio
maps / plain (goal ≤ 1.3× on a 2-core CPU with the embedded world at 20 steps).

Usage:
    python benchmarks/attention_maps.py [--prompts 2] [--seeds 8] [--steps 20] [--repeats 5]
        [--words all|polyps] [--device cuda] [--dtype float16] [--threads N]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when it is imported

import torch  # noqa: E402
from timing import interleaved  # noqa: E402  (benchmarks/timing.py, beside this script)

PROMPTS = ("An endoscopic image of polyps", "An endoscopic image of dyed lifted polyps",
           "An endoscopic image of normal cecum", "An endoscopic image of ulcerative colitis")


def measure(lens, *, prompts: list[str], seeds: int, steps: int, repeats: int, words: list[str] | None,
            guidance_scale: float = 4.5, batch: int = 8) -> dict:
    from dit_lens.readouts.attention_maps import attention_maps
    from dit_lens.trace.capture import DEFAULT_BATCH

    assert batch == DEFAULT_BATCH, "the plain side must batch as attention_maps does by default"

    def plain(base: int) -> None:
        runs = [(p, base + s) for p in prompts for s in range(seeds)]  # attention_maps' cell order
        for start in range(0, len(runs), batch):
            chunk = runs[start : start + batch]
            lens.pipeline([p for p, _ in chunk], generator=[lens.generator(s) for _, s in chunk],
                          num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np",
                          **lens.pipeline_kwargs)

    def maps(base: int) -> None:
        attention_maps(lens, prompts, seeds=range(base, base + seeds), words=words, num_inference_steps=steps,
                       guidance_scale=guidance_scale, progress=False)

    runs = {"plain": plain, "maps": maps}
    _ = lens.fingerprint  # hashed once per model (provenance), outside the timings
    return interleaved(runs, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2, help=f"prompts (at most {len(PROMPTS)})")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    parser.add_argument("--words", default="all",
                        help="'all': every word the prompts share (an, endoscopic, image, of); or comma-separated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from dit_lens import load

    lens = load("embedded", device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    prompts = list(PROMPTS[: args.prompts])
    words = ["an", "endoscopic", "image", "of"] if args.words == "all" else args.words.split(",")
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype or 'float32'}, "
          f"threads {torch.get_num_threads()}")
    result = measure(lens, prompts=prompts, seeds=args.seeds, steps=args.steps, repeats=args.repeats, words=words)
    med, best = result["medians"], result["minima"]
    print(f"\n== embedded: {lens.num_layers} blocks (every layer), {args.steps} steps (every step), words {words}; "
          f"{len(prompts)} prompts × {args.seeds} seeds in calls of 8, guidance 4.5, n = {args.repeats}")
    for name, values in result["times"].items():
        print(f"  {name:<6} median {med[name]:8.3f} s  min {best[name]:8.3f} s  "
              f"(runs: {', '.join(f'{v:.3f}' for v in values)})")
    print(f"  ratio maps / plain: median {med['maps'] / med['plain']:.3f}x, min {best['maps'] / best['plain']:.3f}x")


if __name__ == "__main__":
    main()
