"""Cost of `concept_maps`: every layer and step / the plain pipeline making the same images, and the denoiser
calls that maps of given images take per noise level.

1. Generated runs: both sides make the same S images of one prompt (decoded to numpy) with the same sampler and
   the same batching (8 runs per call, as `concept_maps` batches), timed in one process, interleaved so that
   load drifts hit all alike, `repeats` times each (medians and minima printed):

   - ``plain``: the stock pipeline, the same calls of 8 runs (one generator per seed);
   - ``output``: ``concept_maps(lens, prompt=..., concepts=[lesion, normal])``, every layer and step;
   - ``cross_attention``: the same with ``kind="cross_attention"`` (the word maps).

   Goal: output maps ≤ 1.3× plain (2-core CPU, the embedded world, 20 steps).
2. Given images: N procedural renders at L noise levels; the transformer's ``forward`` is wrapped to count every
   call (and the rows in it) while ``concept_maps(images, ...)`` runs, for each kind. Goal: ≤ 2 calls per level.

Usage:
    python benchmarks/concept_maps.py [--seeds 8] [--steps 20] [--repeats 5] [--images 16] [--levels 0.2 0.4]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when it is imported

import torch  # noqa: E402
from timing import interleaved  # noqa: E402  (benchmarks/timing.py, beside this script)

PROMPT, CONCEPTS = "An endoscopic image of polyps", ["polyps", "normal cecum"]


def measure_generated(lens, *, seeds: int, steps: int, repeats: int, batch: int = 8) -> dict:
    from dit_lens.readouts.concept_maps import concept_maps
    from dit_lens.trace.capture import DEFAULT_BATCH

    assert batch == DEFAULT_BATCH, "the plain side must batch as concept_maps does"

    def plain(base: int) -> None:
        for start in range(base, base + seeds, batch):
            chunk = list(range(start, min(start + batch, base + seeds)))
            lens.pipeline([PROMPT] * len(chunk), generator=[lens.generator(s) for s in chunk],
                          num_inference_steps=steps, guidance_scale=4.5, output_type="np", **lens.pipeline_kwargs)

    def maps(kind: str):
        def run(base: int) -> None:
            concepts = CONCEPTS[:1] if kind == "cross_attention" else CONCEPTS
            concept_maps(lens, prompt=PROMPT, concepts=concepts, seeds=range(base, base + seeds), kind=kind,
                         num_inference_steps=steps, progress=False)
        return run

    _ = lens.fingerprint  # hashed once per model (provenance), outside the timings
    return interleaved({"plain": plain, "output": maps("output"), "cross_attention": maps("cross_attention")},
                       repeats)


def count_given(lens, *, images: int, levels: list[float]) -> dict:
    """Transformer calls (and rows) per noise level while concept_maps reads given images, per kind."""
    from dit_lens.readouts.concept_maps import concept_maps
    from dit_lens.world.procedural import render

    truth = render(["polyps"] * images, range(images))
    denoiser = lens.denoiser
    calls: list[int] = []
    own = denoiser.forward

    def counted(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        calls.append(int(hidden.shape[0]))
        return own(*args, **kwargs)

    out = {}
    denoiser.forward = counted  # every call of the module goes through its forward
    try:
        for kind in ("output", "cross_attention"):
            calls.clear()
            concept_maps(lens, truth.images, prompt=PROMPT, concepts=CONCEPTS[:1] if kind == "cross_attention"
                         else CONCEPTS, kind=kind, noise_levels=levels, progress=False)
            out[kind] = {"calls": len(calls), "rows": list(calls), "per_level": len(calls) / len(levels)}
    finally:
        del denoiser.forward  # the class's own forward again
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="generated images")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    parser.add_argument("--images", type=int, default=16, help="given images")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.2, 0.4], help="noise levels of given images")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dit_lens import load

    lens = load("embedded")
    print(f"torch {torch.__version__}, cpu, float32, threads {torch.get_num_threads()}")
    result = measure_generated(lens, seeds=args.seeds, steps=args.steps, repeats=args.repeats)
    med, best = result["medians"], result["minima"]
    print(f"\n== generated: embedded, {lens.num_layers} blocks, {args.steps} steps (every layer and step), "
          f"{args.seeds} seeds in calls of 8, guidance 4.5, n = {args.repeats} interleaved repeats")
    for name, values in result["times"].items():
        print(f"  {name:<16} median {med[name]:8.3f} s  min {best[name]:8.3f} s  "
              f"(runs: {', '.join(f'{v:.3f}' for v in values)})")
    for name in ("output", "cross_attention"):
        print(f"  ratio {name} / plain: median {med[name] / med['plain']:.3f}x, min {best[name] / best['plain']:.3f}x")
    counts = count_given(lens, images=args.images, levels=args.levels)
    print(f"\n== given images: {args.images} procedural renders, noise levels {args.levels}")
    for kind, c in counts.items():
        print(f"  {kind:<16} transformer calls {c['calls']} (rows per call {c['rows']}): {c['per_level']:.2f} per "
              f"noise level")


if __name__ == "__main__":
    main()
