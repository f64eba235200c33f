"""Cost of one counterfactual pair per method: MedSteer's batched pass against the inversion-based editors.

The work a user asks for: N counterfactual pairs (original, edited) of the source prompt, one per seed,
for the same N seeds on every side, with the defaults each method gives a user. Each side is timed as
a whole, in one process, interleaved so that load drifts hit all alike (`timing.interleaved`: one
warm-up, then `repeats` rounds, each on fresh seeds ``1000 · (round + 1) + 0 … N − 1``):

- ``medsteer (one batched pass)``: ``generate(lens, source, seeds=..., steer=Steer(v))``, both images
  of every pair (unsteered and steered, same seed) in one nnsight-hooked call per 4 cells (its
  default), ``--steps`` sampler steps, guidance 4.5;
- ``pnp (original + inversion + edit)``: the original images first, ``generate(lens, source,
  seeds=...)`` (the same call without the steer: the plain pipeline's image for each seed), then
  ``inversion.edit(lens, images, source=..., target=..., method="pnp")`` with every default: a DDIM
  inversion of ``--inversion-steps`` steps under the source prompt (guidance 1) and the edit over the
  same steps (guidance 4.5, 8 images per call);
- ``hedit (original + inversion + edit)``: the same with ``method="hedit"`` (h-Edit-D);
- ``reprompt after inversion (original + inversion + regeneration)``: the same with ``method="reprompt"``
  (the inverted noise regenerated under the target prompt);
- ``inversion alone``: ``inversion.invert(lens, images, source)`` with the settings `edit` inverts
  with, on the images the ``original images alone`` row made for the same seeds in the same round
  (it runs just before, so the images are not part of this row's time);
- ``original images alone``: the ``generate`` call without the steer that the editors' rows start with.

The concept vector of the steer (attn2, ``--vector-seeds`` seeds of the source prompt minus the target
prompt, captured into a temporary store) is made once, before any timing. Every timed call decodes to
numpy images as a user gets them, with progress bars off; the model fingerprint (provenance) is
hashed once beforehand.

It prints each row's median and minimum (the least disturbed run, steadier on a shared CPU) and its
ratio to MedSteer's, plus checks that every side made N pairs for the same seeds; ``--out`` also writes
all of it as JSON. On a shared CPU, ``--threads 1`` keeps runs steady: with 2 threads on a busy 2-core
machine, runs of the same work varied up to 50× (likely threads waiting on a descheduled sibling).

Usage:
    python benchmarks/edit_cost.py [--pairs 8] [--repeats 3] [--steps 20] [--inversion-steps 50]
        [--model embedded|DIR|tiny|pixart-alpha] [--sample-size 16] [--device cuda] [--dtype float16]
        [--threads N] [--vector-seeds 4] [--out edit_cost.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when it is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timing import interleaved  # noqa: E402  (benchmarks/timing.py, beside this script)

SOURCE = "An endoscopic image of polyps"
TARGET = "An endoscopic image of normal cecum"
GUIDANCE = 4.5

MEDSTEER = "medsteer (one batched pass)"
PNP = "pnp (original + inversion + edit)"
HEDIT = "hedit (original + inversion + edit)"
REPROMPT = "reprompt after inversion (original + inversion + regeneration)"
INVERSION = "inversion alone"
ORIGINALS = "original images alone"
#: The rows in the order they run in every round (the inversion row reuses the originals row's images).
ROWS = (ORIGINALS, INVERSION, MEDSTEER, PNP, HEDIT, REPROMPT)


def make_steer(lens, *, source: str, target: str, seeds: int, steps: int):
    """The MedSteer `Steer` (default α) along the attn2 concept vector source − target, captured into a
    temporary store (the package's cache is left alone)."""
    from dit_lens import Steer, capture, concept_vector

    root = Path(tempfile.mkdtemp(prefix="edit-cost-vector-"))
    try:
        settings = dict(seeds=range(seeds), num_inference_steps=steps, guidance_scale=GUIDANCE, site="attn2")
        positive = capture(lens, [source], store=root / "positive.zarr", **settings).load()
        negative = capture(lens, [target], store=root / "negative.zarr", **settings).load()
        vector = concept_vector(positive, negative).load()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return Steer(vector, name=f"{source} − {target}")


def measure(lens, steer, *, pairs: int, steps: int, inversion_steps: int, repeats: int,
            source: str = SOURCE, target: str = TARGET) -> tuple[dict, dict]:
    """Time every row with `interleaved`; returns its result and the last outputs of each row."""
    from dit_lens import generate
    from dit_lens.inversion import edit, invert

    outputs: dict[str, object] = {}
    originals: dict[int, np.ndarray] = {}  # base -> images made by the ORIGINALS row this round
    calls = {"n": 0}
    total = len(ROWS) * (repeats + 1)

    def seeds(base: int) -> list[int]:
        return list(range(base, base + pairs))

    def plain_images(base: int) -> np.ndarray:
        ds = generate(lens, source, seeds=seeds(base), num_inference_steps=steps, guidance_scale=GUIDANCE,
                      progress=False)
        return ds["image"].isel(prompt=0, branch=0).values  # (pairs, H, W, 3)

    def medsteer(base: int):
        return generate(lens, source, seeds=seeds(base), steer=steer, num_inference_steps=steps,
                        guidance_scale=GUIDANCE, progress=False)

    def editor(method: str):
        def run(base: int):
            images = plain_images(base)
            return edit(lens, images, source=source, target=target, method=method,
                        num_inference_steps=inversion_steps, guidance_scale=GUIDANCE, progress=False)
        return run

    def inversion(base: int):
        if base not in originals:
            raise RuntimeError(f"'{INVERSION}' needs the images '{ORIGINALS}' made for seeds from {base}; "
                               f"it must run after that row in each round")
        return invert(lens, originals.pop(base), source, num_inference_steps=inversion_steps, progress=False)

    def original(base: int):
        originals[base] = plain_images(base)
        return originals[base]

    bodies = {ORIGINALS: original, INVERSION: inversion, MEDSTEER: medsteer, PNP: editor("pnp"),
              HEDIT: editor("hedit"), REPROMPT: editor("reprompt")}
    assert list(bodies) == list(ROWS)

    def announced(name: str, fn):
        def run(base: int):
            calls["n"] += 1
            what = "warm-up" if base == 0 else f"round {base // 1000}/{repeats}"
            print(f"  [{calls['n']:>2}/{total}] {what:<10} {name:<64}", end="", flush=True)
            start = time.perf_counter()
            outputs[name] = (base, fn(base))
            print(f" {time.perf_counter() - start:8.2f} s", flush=True)
        return run

    _ = lens.fingerprint  # hashed once per model (provenance of every result), outside the timings
    result = interleaved({name: announced(name, fn) for name, fn in bodies.items()}, repeats)
    return result, outputs



def checks(outputs: dict, pairs: int) -> dict:
    """That every side made `pairs` pairs for the same seeds, and that the pairs start from the same image."""
    base, steered = outputs[MEDSTEER]
    seeds = list(range(base, base + pairs))
    out: dict = {"seeds_of_last_round": seeds}
    assert steered["image"].sizes["seed"] == pairs and list(steered["seed"].values) == seeds, "medsteer seeds"
    assert list(steered["branch"].values) == ["original", "edited"], "medsteer branches"
    out["pairs"] = {MEDSTEER: int(steered["image"].sizes["seed"])}
    plain_base, plain = outputs[ORIGINALS]
    assert plain_base == base and plain.shape[0] == pairs
    for name in (PNP, HEDIT, REPROMPT):
        b, ds = outputs[name]
        assert b == base, f"{name} ran on other seeds"
        out["pairs"][name] = int(ds["image"].sizes["item"])
        assert out["pairs"][name] == pairs, f"{name} made {out['pairs'][name]} pairs, not {pairs}"
        # each editor's original is the plain image of its seed (same call, same seeds): bit-identical
        out.setdefault("editor_original_vs_plain_max_abs", {})[name] = float(
            np.abs(ds["image"].isel(branch=0).values - plain).max())
    b, trajectory = outputs[INVERSION]
    assert b == base and trajectory.sizes["item"] == pairs
    # MedSteer's unsteered branch is the same seed's image made two rows to a cell instead of one
    out["medsteer_original_vs_plain_max_abs"] = float(
        np.abs(steered["image"].isel(prompt=0, branch=0).values - plain).max())
    out["medsteer_edited_vs_original_mean_abs"] = float(
        np.abs(steered["image"].isel(branch=1).values - steered["image"].isel(branch=0).values).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="'embedded', a pipeline folder, 'tiny' or 'pixart-alpha'")
    parser.add_argument("--sample-size", type=int, default=16, help="latent side for --model pixart-alpha")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--pairs", type=int, default=8, help="counterfactual pairs (seeds) per side")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps of generate (MedSteer, the originals)")
    parser.add_argument("--inversion-steps", type=int, default=50, help="DDIM steps of the inversion and the edit")
    parser.add_argument("--vector-seeds", type=int, default=4, help="seeds per prompt of the concept vector")
    parser.add_argument("--source", default=SOURCE)
    parser.add_argument("--target", default=TARGET)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.pairs < 1 or args.repeats < 1:
        parser.error("--pairs and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    import dit_lens
    from dit_lens.testing import PIXART_ALPHA_512, PixArtSpec, build_pixart

    specs = {
        "tiny": PixArtSpec(num_layers=12, num_heads=4, head_dim=32, sample_size=16, vae_channels=(16, 32, 32)),
        "pixart-alpha": dataclasses.replace(PIXART_ALPHA_512, sample_size=args.sample_size),
    }
    source = build_pixart(specs[args.model], seed=0) if args.model in specs else args.model
    lens = dit_lens.load(source, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    tokens = lens.token_grid[0] * lens.token_grid[1]
    header = (f"model={args.model} device={lens.device} dtype={lens.denoiser.dtype} layers={lens.num_layers} "
              f"width={lens.width} tokens={tokens} threads={torch.get_num_threads()} torch {torch.__version__}")
    print(header, flush=True)

    print(f"concept vector: attn2, {args.vector_seeds} seeds × ({args.source!r} − {args.target!r}), "
          f"{args.steps} steps (untimed)", flush=True)
    start = time.perf_counter()
    steer = make_steer(lens, source=args.source, target=args.target, seeds=args.vector_seeds, steps=args.steps)
    print(f"  {steer!r} in {time.perf_counter() - start:.1f} s", flush=True)

    print(f"timing {len(ROWS)} rows × (1 warm-up + {args.repeats} rounds), {args.pairs} pairs each:", flush=True)
    result, outputs = measure(lens, steer, pairs=args.pairs, steps=args.steps, inversion_steps=args.inversion_steps,
                              repeats=args.repeats, source=args.source, target=args.target)
    verified = checks(outputs, args.pairs)

    med, best = result["medians"], result["minima"]
    print(f"\n== {args.pairs} pairs per side, same seeds; generate {args.steps} steps, inversion and edits "
          f"{args.inversion_steps} DDIM steps, guidance {GUIDANCE}, n = {args.repeats}")
    print(f"  {'':<64} {'median':>9} {'min':>9}  {'÷ medsteer (median, min)':>24}  runs")
    rows = []
    for name in (MEDSTEER, PNP, HEDIT, REPROMPT, INVERSION, ORIGINALS):
        values = result["times"][name]
        ratio_med, ratio_min = med[name] / med[MEDSTEER], best[name] / best[MEDSTEER]
        print(f"  {name:<64} {med[name]:8.3f}s {best[name]:8.3f}s  {ratio_med:10.2f}x {ratio_min:10.2f}x  "
              f"({', '.join(f'{v:.2f}' for v in values)})")
        rows.append(dict(name=name, times=values, median=med[name], min=best[name], ratio_median=ratio_med,
                         ratio_min=ratio_min, per_pair_median=med[name] / args.pairs))
    print(f"  checks: pairs per side {sorted(set(verified['pairs'].values()))}; editors' originals vs plain, max |Δ| "
          f"{max(verified['editor_original_vs_plain_max_abs'].values()):.2e}; MedSteer's unsteered branch vs plain, "
          f"max |Δ| {verified['medsteer_original_vs_plain_max_abs']:.2e}; MedSteer's edit, mean |Δ| "
          f"{verified['medsteer_edited_vs_original_mean_abs']:.3f}")

    if args.out:
        report = dict(header=header, settings=vars(args), guidance_scale=GUIDANCE, steer=repr(steer), rows=rows,
                      checks=verified)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
