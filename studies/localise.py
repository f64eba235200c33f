"""Steer only where the concept is made: the top cells of an exact patching grid against layer_sweep's windows.

For each concept pair that studies/concept_pairs.py declares (``--quick``: its first, polyps → normal cecum),
an exact activation-patching grid over every (step, layer) of attn2, run on the concept vector's own prompts
and seeds (`dit_lens.methods.medsteer.causal_grid`: direction "denoise", the target prompt's run gets the
source prompt's activation at one cell, scored by the judge's log-probability of the source class); its top
10 % cells by mean effect; and MedSteer steered at exactly those cells (``where="causal"``), and at the top 10 % of
blocks of a block-by-block "noise" grid at every step (``where="causal_layers"``), against MedSteer at
each layer window of studies/layer_sweep.py, at its α, on fresh evaluation seeds (10 000 …, disjoint from the
vector's 0 …). Printed per pair: the top cells with their effects, then flip rate, target rate and Bg-SSIM with
95 % bootstrap intervals for the cells and for every window, and the cells against the window of best flip
rate. Each grid is kept beside the causal study's result (``causal_grid_p<pair>.json``, a sealed record).

    python studies/localise.py [--quick] [--top 0.1] [--causal-seeds 4] [--eval-seeds 64] [--out DIR]

``--quick``: the first pair, 4 vector and 4 evaluation seeds, 10 denoising steps, a grid on 1 patched seed.
"""

import argparse
import runpy
import sys
import time
from pathlib import Path

import numpy as np

from dit_lens.methods import MethodContext
from dit_lens.methods.medsteer import causal_cells, causal_steer
from dit_lens.storage import read_record, write_record
from dit_lens.study import Study
from dit_lens.study.cells import CellRunner
from dit_lens.study.run import run_study, study_folder

HERE = Path(__file__).resolve().parent
PAIRS = runpy.run_path(str(HERE / "concept_pairs.py"))["PAIRS"]
LAYER_SWEEP = runpy.run_path(str(HERE / "layer_sweep.py"))["STUDY"]
SWEPT = LAYER_SWEEP.methods["medsteer"]
QUICK = {"pairs": PAIRS[:1], "num_inference_steps": 10, **LAYER_SWEEP.quick}

#: MedSteer at layer_sweep's windows, on every pair.
WINDOWS = LAYER_SWEEP.replace(name="localise_windows", pairs=PAIRS, quick=QUICK)
#: MedSteer at the top cells of each pair's patching grid, at the same α, vector and evaluation seeds.
STUDY = Study(
    "localise",
    pairs=PAIRS,
    methods={"medsteer": {"where": ("causal", "causal_layers"), "top": (0.1,), "causal_seeds": (4,),
                          "alpha": SWEPT["alpha"],
                          "vector_seeds": SWEPT["vector_seeds"]}},
    eval_seeds=LAYER_SWEEP.eval_seeds,
    eval_seed_base=LAYER_SWEEP.eval_seed_base,
    quick={**QUICK, "causal_seeds": (1,)},
)
SHOWN = ("flip_rate", "target_rate", "bg_ssim")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="localise", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small version (≤ 2 min on one CPU thread)")
    p.add_argument("--top", type=float, default=None, help="fraction of the grid's cells steered (default: 0.1)")
    p.add_argument("--causal-seeds", type=int, default=None,
                   help=f"patched runs per cell, the vector's first seeds (default: {STUDY.methods['medsteer']['causal_seeds'][0]})")
    p.add_argument("--eval-seeds", type=int, default=None, help=f"pairs per cell (default: {STUDY.eval_seeds})")
    p.add_argument("--eval-seed-base", type=int, default=None,
                   help=f"first evaluation seed (default: {STUDY.eval_seed_base})")
    p.add_argument("--out", default=None, help="parent of the two result folders (default: cache/studies/)")
    return p.parse_args(argv)


def declared(args: argparse.Namespace) -> tuple[Study, Study]:
    """The window and the causal study with the flags applied."""
    windows, causal = (WINDOWS.quick_version(), STUDY.quick_version()) if args.quick else (WINDOWS, STUDY)
    changes = {k: getattr(args, k) for k in ("eval_seeds", "eval_seed_base") if getattr(args, k) is not None}
    windows, causal = windows.replace(**changes), causal.replace(**changes)
    if args.top is not None:
        causal = causal.with_axis("top", (args.top,))
    if args.causal_seeds is not None:
        causal = causal.with_axis("causal_seeds", (args.causal_seeds,))
    return windows, causal


def grid_record(lens, study: Study, index: int, runner: CellRunner) -> dict:
    """The pair's patching grid and its top cells, as the causal cell used them; kept in the study's folder."""
    path = runner.folder / f"causal_grid_p{index}.json"
    if path.exists():
        return read_record(path, what="the kept patching grid", fix="delete it; it is made again")
    sweep = study.methods["medsteer"]
    settings = {"window": (0.0, 1.0), "steps": (0.0, 1.0), "top": sweep["top"][0],
                "causal_seeds": sweep["causal_seeds"][0], "vector_seeds": sweep["vector_seeds"][0]}
    context = MethodContext(num_inference_steps=study.num_inference_steps, guidance_scale=study.guidance_scale,
                            vectors=runner.vectors, oracle=runner.oracle)
    pair = study.pairs[index]
    vector = runner.vectors(pair, settings["vector_seeds"])
    grid, _ = causal_cells(lens, pair, {**settings, "where": "causal"}, context, vector)  # kept in memory
    picked = causal_steer(lens, pair, {**settings, "where": "causal"}, context, vector)
    blocks = causal_steer(lens, pair, {**settings, "where": "causal_layers"}, context, vector)
    record = {"pair": pair.name, **picked, "blocks": blocks["layers"], "block_effect": blocks["effect"],
              "steps": grid.step.values.tolist(), "layers": grid.layer.values.tolist(),
              "mean_effect": grid.effect.mean("seed").transpose("step", "layer").values.tolist(),
              "metric_clean": grid.metric_clean.values.tolist(), "metric_corrupt": grid.metric_corrupt.values.tolist()}
    runner.record(path.name)
    return write_record(path, record)


def estimates(result, pair: str, **where) -> dict:
    cell = result.sel({"method": "medsteer", "pair": pair, **where})
    return {m: tuple(float(cell[f"{m}{s}"].squeeze()) for s in ("", "_low", "_high", "_n")) for m in SHOWN}


def line(label: str, values: dict) -> str:
    return f"  {label:>18s}  " + "  ".join(f"{v:6.3f} [{lo:5.3f},{hi:5.3f}]" for v, lo, hi, _ in values.values())


def report(by_window, by_cells, causal: Study, grids: list[dict]) -> None:
    for index, pair in enumerate(causal.pairs):
        grid = grids[index]
        shown = ", ".join(f"({t}, {l}) {e:.3f}" for (t, l), e in zip(grid["cells"], grid["effect"]))
        print(f"{pair.name}: patching grid {len(grid['steps'])} steps × {len(grid['layers'])} layers on "
              f"{len(grid['seeds'])} vector seed(s) {grid['seeds']}; mean effect over the grid "
              f"{np.nanmean(grid['mean_effect']):.4f}; top {grid['top']:g} = {len(grid['cells'])} cells "
              f"(step, layer) effect: {shown}")
        print(f"  {'where':>18s}  " + "  ".join(f"{m:>21s}" for m in SHOWN))
        cells = estimates(by_cells, pair.name, where="causal")
        print(line(f"top {grid['top']:g} cells", cells))
        blocks = estimates(by_cells, pair.name, where="causal_layers")
        print(line(f"blocks {','.join(map(str, grid['blocks']))}", blocks))
        rows = {w: estimates(by_window, pair.name, window=w) for w in by_window.window.values.tolist()}
        for w, values in rows.items():
            print(line(f"layers {w}", values))
        best = max(rows, key=lambda w: (rows[w]["flip_rate"][0], rows[w]["bg_ssim"][0]))
        for name, values in (("top cells", cells), ("top blocks", blocks)):
            diff = "  ".join(f"{m} {values[m][0] - rows[best][m][0]:+.3f}" for m in SHOWN)
            print(f"  {name} − best window (layers {best}, by flip rate): {diff}; n = {int(values['flip_rate'][3])} "
                  f"pairs per cell")
        print("  blocks by necessity (noise grid, 1 − effect): " + ", ".join(
            f"{l} {1 - e:.3f}" for l, e in zip(grid["blocks"], grid["block_effect"])))


def main(argv=None) -> int:
    args = parse(argv)
    windows, causal = declared(args)
    from dit_lens import load
    from dit_lens.world import load_oracle, load_segmenter

    lens, oracle, segmenter = load("embedded"), load_oracle("embedded"), load_segmenter("embedded")
    start = time.perf_counter()
    out = {s.name: None if args.out is None else Path(args.out) / s.name for s in (windows, causal)}
    judges = dict(oracle=oracle, segmenter=segmenter, progress=False)
    by_cells = run_study(causal, lens, out=out[causal.name], **judges)
    runner = CellRunner(causal, lens, oracle, segmenter, study_folder(causal, lens, out[causal.name]), progress=False)
    with runner.in_use():
        grids = [grid_record(lens, causal, i, runner) for i in range(len(causal.pairs))]
    by_window = run_study(windows, lens, out=out[windows.name], **judges)
    report(by_window, by_cells, causal, grids)
    print(f"localise: {time.perf_counter() - start:.0f} s after loading; results in {by_cells.attrs['folder']} and "
          f"{by_window.attrs['folder']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
