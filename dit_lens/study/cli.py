"""Command line of a study file: ``python studies/<name>.py [--quick] [--alphas 1 2] ...``.

Every flag overrides one field of the study's declaration and is validated by it; ``--quick``
applies the study's own small-run overrides first. ``dit-lens study <name>`` runs the same file.
"""

from __future__ import annotations

import argparse
import runpy
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .declaration import SETTING_AXES, ConceptPair, Study, floors, pick_settings, run_study

__all__ = ["study_main", "find_study", "print_table", "print_picks"]


def _window(text: str) -> tuple[float, float]:
    try:
        start, stop = (float(x) for x in text.split(":"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"a window is START:STOP fractions (of the depth, or of the steps), e.g. 0.25:0.5; got {text!r}") from err
    return start, stop


def _pair(text: str) -> str:
    if ">" not in text:
        raise argparse.ArgumentTypeError(f"a pair is 'SOURCE>TARGET', e.g. 'polyps>normal cecum'; got {text!r}")
    return text


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def parser(study: Study) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"study {study.name}", description=f"Run the {study.name!r} study.",
                                allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="the study's small version (≤ 2 min on CPU)")
    p.add_argument("--model", default="embedded", help="pipeline folder (default: the embedded world)")
    p.add_argument("--lora", default=None, help="peft LoRA adapter folder")
    p.add_argument("--oracle", default="embedded", help="classifier for the metrics (default: embedded)")
    p.add_argument("--out", default=None, help="result folder (default: cache/studies/<name>-<hash>)")
    p.add_argument("--pairs", nargs="+", type=_pair, help="concept pairs 'SOURCE>TARGET'")
    p.add_argument("--windows", nargs="+", type=_window, help="layer windows START:STOP (fractions)")
    p.add_argument("--step-windows", nargs="+", type=_window,
                   help="when to steer: step windows START:STOP (fractions of the steps; 0:1 = all)")
    p.add_argument("--alphas", nargs="+", type=float, help="steering strengths")
    p.add_argument("--renormalize", nargs="+", type=_bool, help="update variants (true = authors')")
    p.add_argument("--blends", nargs="+", type=float,
                   help="latent blending thresholds in [0, 1) (0 = off: the paper's method)")
    p.add_argument("--vector-seeds", nargs="+", type=int, help="seeds per prompt for the vector")
    p.add_argument("--eval-seeds", type=int, help="pairs per cell")
    p.add_argument("--steps", type=int, dest="num_inference_steps", help="denoising steps")
    p.add_argument("--guidance", type=float, dest="guidance_scale", help="guidance scale")
    return p


def declared(study: Study, args: argparse.Namespace) -> Study:
    if args.quick:
        study = study.quick_version()
    changes: dict[str, Any] = {}
    for field in ("windows", "step_windows", "alphas", "renormalize", "blends", "vector_seeds", "eval_seeds",
                  "num_inference_steps", "guidance_scale"):
        value = getattr(args, field)
        if value is not None:
            changes[field] = tuple(value) if isinstance(value, list) else value
    if args.pairs:
        template = study.pairs[0]
        changes["pairs"] = tuple(
            ConceptPair(*(x.strip() for x in text.split(">", 1)), contexts=template.contexts, prompt=template.prompt)
            for text in args.pairs
        )
    return study.replace(**changes)


def study_main(study: Study, argv: Sequence[str] | None = None, *, report: Callable | None = None) -> int:
    """Parse flags, run `study`, print its table, write its figure. Returns an exit status."""
    args = parser(study).parse_args(argv)
    try:
        study = declared(study, args)
        from ..model.lens import load
        from ..world import load_oracle, load_segmenter

        lens = load(args.model, lora=args.lora)
        oracle, segmenter = load_oracle(args.oracle), load_segmenter(args.oracle)
        start = time.perf_counter()
        result = run_study(study, lens, oracle=oracle, segmenter=segmenter, out=args.out)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"study {study.name}: error: {err}", file=sys.stderr)
        return 2
    print_table(result)
    picks = pick_settings(result, require=floors(result))
    print_picks(result, picks)
    from ..views.study import study_figure

    folder = Path(result.attrs["folder"])
    from .cells import CellRunner

    runner = CellRunner(study, lens, oracle, segmenter, folder, progress=False)
    for pick in picks:
        path = runner.show(pick)
        print(f"{study.name}: gate explorer of the picked setting for {pick['pair']}: {path}")
    study_figure(result).savefig(folder / f"{study.name}.png", dpi=120, bbox_inches="tight")
    if report is not None:
        report(result, lens, study, folder)
    print(f"{study.name}: {time.perf_counter() - start:.0f} s; results in {folder} (result.zarr, {study.name}.png)")
    return 0


def print_table(result) -> None:
    """One line per cell: the grid coordinates and each metric with its 95% interval."""
    metrics = [m for m in ("flip_rate", "confidence_shift", "bg_ssim", "bg_psnr", "dye_detection_rate", "polyp_kept")
               if m in result]
    if result.sizes.get("vector_seeds", 1) > 1:  # vector stability: the cosine to the largest-seed vector
        metrics.append("vector_cosine_to_largest")
    flat = result[metrics + [f"{m}_low" for m in metrics] + [f"{m}_high" for m in metrics]].to_dataframe().reset_index()
    dims = [d for d in result["flip_rate"].dims if result.sizes[d] > 1 or d in ("pair", "edit")]
    if "edit" in flat:  # a baseline's row repeats along the steering axes: print it once
        steering = [d for d in dims if d not in ("edit", "pair", "blend")]
        baseline = flat["edit"] != "medsteer"
        flat = flat[~baseline | ~flat.duplicated(subset=[d for d in flat.columns if d not in steering])].astype(
            {d: object for d in steering})
        flat.loc[flat["edit"] != "medsteer", steering] = "·"
    header = "  ".join(f"{d:>16s}" for d in dims) + "  " + "  ".join(f"{m:>22s}" for m in metrics)
    print(header)
    for _, row in flat.iterrows():
        if all(row[m] != row[m] for m in metrics):  # all NaN: not a cell of this study
            continue
        cells = "  ".join(f"{str(row[d])[:16]:>16s}" for d in dims)
        values = "  ".join(f"{row[m]:7.3f} [{row[m + '_low']:6.3f},{row[m + '_high']:6.3f}]" for m in metrics)
        print(cells + "  " + values)
    n = result["flip_rate_n"].max().item()
    print(f"n = {int(n)} pairs per cell; Bg-LPIPS: {result.attrs.get('bg_lpips_status') or 'not computed'}")


def print_picks(result, picks: list[dict] | None = None) -> None:
    """Per pair, the setting with the best Bg-SSIM among those that flip ≥ 0.9 (dye: also keep the polyp ≥ 0.8)."""
    if all(size == 1 for dim, size in result.sizes.items() if dim not in ("pair", "edit")):
        return  # one setting per pair: nothing to pick
    require = floors(result)
    wanted = " and ".join(f"{m} >= {v:g}" for m, v in require.items())
    print(f"picked per pair (best Bg-SSIM with {wanted}):")
    for pick in picks if picks is not None else pick_settings(result, require=require):
        where = ", ".join(f"{k}={pick[k]}" for k in SETTING_AXES if k in pick)
        shown = "".join(f", {m} {pick[m][0]:.3f}" for m in ("flip_rate", "bg_ssim", "dye_detection_rate", "polyp_kept")
                        if m in pick)
        note = "" if pick["meets"] else "  (no setting meets the floors: the closest shown)"
        print(f"  {pick['pair']}: {where}{shown}{note}")


def find_study(name: str) -> Path:
    """`studies/<name>.py` in the working directory or beside the installed package."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = root / "studies" / f"{name}.py"
        if path.is_file():
            return path
    known = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "studies").glob("*.py"))
    raise FileNotFoundError(f"no study named {name!r}; known studies: {known}")


def run_study_file(name: str, argv: Sequence[str]) -> int:
    path = find_study(name)
    saved = sys.argv
    sys.argv = [str(path), *argv]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = saved
    return 0
