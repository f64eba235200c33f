"""Command line of a study file: ``python studies/<name>.py [--quick] [--alphas 1 2] ...``.

Every flag overrides one field of the study's declaration and is validated by it. The setting flags
come from the registered methods' axes (`dit_lens.methods.Axis.flag`): ``--alphas 2 3`` sets the
``alpha`` axis of every declared method that has one, ``--blends 0 0.3`` the blend of MedSteer and
re-prompting alike, ``--methods medsteer reprompt`` picks the methods. ``--quick`` applies the
study's own small-run overrides first. ``dit-lens study <name>`` runs the same file. A user error
(a bad flag value, a missing or damaged pipeline folder, an unwritable result or cache folder, a run
that diverged) prints one line and exits with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..methods import METHODS
from ..methods.pair import ConceptPair
from ..scale.executors import WorkerLostError
from ..trace.attrs import read
from ..validate import USER_ERRORS, check_pipeline_folder, check_writable_folder
from .declaration import Study, floors, method_axes, metric_names, pick_settings
from .run import run_study, study_folder
from ..metrics import STANDARD_METRICS

__all__ = ["study_main", "find_study", "print_table", "print_picks", "parser", "declared", "executor"]


def _pair(text: str) -> str:
    if ">" not in text:
        raise argparse.ArgumentTypeError(f"a pair is 'SOURCE>TARGET', e.g. 'polyps>normal cecum'; got {text!r}")
    return text


def _axes() -> dict:
    """Every registered method's axes by name (a name means one axis across methods)."""
    return {a.name: a for m in METHODS.values() for a in m.axes}


class _Parser(argparse.ArgumentParser):
    """Errors as one line naming the flag and where to read more (exit 2), as `dit-lens` gives them."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def parser(study: Study) -> argparse.ArgumentParser:
    p = _Parser(prog=f"dit-lens study {study.name}", description=f"Run the {study.name!r} study.",
                allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="the study's small version (≤ 2 min on one CPU thread: --threads 1)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--model", default="embedded", help="pipeline folder (default: the embedded world)")
    p.add_argument("--lora", default=None, help="peft LoRA adapter folder")
    p.add_argument("--oracle", default="embedded", help="classifier and segmenter for the metrics (default: embedded)")
    p.add_argument("--out", default=None, help="result folder (default: cache/studies/<name>-<hash>)")
    p.add_argument("--repair", action="store_true", help="recompute damaged cells and capture cells instead of refusing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the cells and result of another study held in --out (nothing else is touched)")
    p.add_argument("--pairs", nargs="+", type=_pair, help="concept pairs 'SOURCE>TARGET'")
    p.add_argument("--methods", nargs="+", choices=list(METHODS),
                   help=f"methods to compare (declared: {' '.join(study.methods)})")
    p.add_argument("--require", nargs="+", type=_floor, metavar="METRIC=FLOOR",
                   help=f"what a picked setting must reach (declared: "
                        f"{' '.join(f'{k}={v:g}' for k, v in study.require.items())}), e.g. target_rate=0.9")
    for axis in _axes().values():
        swept = {m: sweep[axis.name] for m, sweep in study.methods.items() if axis.name in sweep}
        shown = "; ".join(f"{m}: {' '.join(str(axis.label(v)) for v in values)}" for m, values in swept.items())
        p.add_argument(f"--{axis.flag}", nargs="+", type=axis.parse, dest=f"axis_{axis.name}",
                       help=f"{axis.help} (the {axis.name!r} axis; declared: {shown or 'the method default'})")
    p.add_argument("--eval-seeds", type=int, help=f"pairs per cell (declared: {study.eval_seeds})")
    p.add_argument("--eval-seed-base", type=int,
                   help=f"first evaluation seed (default {study.eval_seed_base}); another base measures on fresh seeds")
    p.add_argument("--steps", type=int, dest="num_inference_steps",
                   help=f"denoising steps (declared: {study.num_inference_steps})")
    p.add_argument("--guidance", type=float, dest="guidance_scale",
                   help=f"guidance scale (declared: {study.guidance_scale:g})")
    scale = p.add_argument_group("scale out (pip install 'dit-lens[ray]')")
    scale.add_argument("--executor", choices=("local", "ray"), default="local",
                       help="where the cells run: this process, or Ray workers that each load the model once "
                            "(default: local)")
    scale.add_argument("--workers", type=int, default=None,
                       help="Ray workers (default: as many as the cluster's CPUs, or GPUs, allow)")
    scale.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per Ray worker; 1 on a GPU cluster (default: 0)")
    scale.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs (torch threads) per Ray worker (default: 1)")
    scale.add_argument("--ray-address", default=None,
                       help="the Ray cluster to join, e.g. auto or ray://head:10001 (default: $RAY_ADDRESS or a new "
                            "local one); its workers need the model, cache and --out folders at the same paths")
    return p


def executor(args: argparse.Namespace) -> Any:
    """The executor the scale-out flags name (``None``: this process)."""
    flags = {"--workers": args.workers, "--cpus-per-worker": args.cpus_per_worker,
             "--gpus-per-worker": args.gpus_per_worker, "--ray-address": args.ray_address}
    if args.executor == "local":
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --executor ray")
        return None
    if importlib.util.find_spec("ray") is None:
        raise ImportError("--executor ray needs Ray, an optional extra: pip install 'dit-lens[ray]'")
    from ..scale import RayExecutor

    return RayExecutor(workers=args.workers, address=args.ray_address,
                       num_cpus=1.0 if args.cpus_per_worker is None else args.cpus_per_worker,
                       num_gpus=0.0 if args.gpus_per_worker is None else args.gpus_per_worker)


def _floor(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a floor is METRIC=VALUE, e.g. target_rate=0.9; got {text!r}") from None


#: The declaration's field behind each flag that is not an axis, for messages in the user's words.
_FIELD_FLAGS = {"eval_seeds": "--eval-seeds", "eval_seed_base": "--eval-seed-base", "num_inference_steps": "--steps",
                "guidance_scale": "--guidance", "require": "--require", "pairs": "--pairs", "methods": "--methods"}


def as_flags(message: str) -> str:
    """A declaration's error with its field names (``Study.eval_seeds``,
    ``Study.methods['medsteer']['window']``) replaced by the flags that set them."""
    import re

    flags = {name: f"--{axis.flag}" for name, axis in _axes().items()}
    message = re.sub(r"Study\.methods\['[^']*'\]\['([^']*)'\]", lambda m: flags.get(m.group(1), m.group(0)), message)
    return re.sub(r"Study\.(\w+)", lambda m: _FIELD_FLAGS.get(m.group(1), m.group(0)), message)


def declared(study: Study, args: argparse.Namespace) -> Study:
    """`study` with the parsed flags applied (validated by the declaration; errors name the flags)."""
    try:
        return _declared(study, args)
    except ValueError as err:
        raise ValueError(as_flags(str(err))) from None


def _declared(study: Study, args: argparse.Namespace) -> Study:
    if args.quick:
        study = study.quick_version()
    changes: dict[str, Any] = {f: getattr(args, f) for f in ("eval_seeds", "eval_seed_base", "num_inference_steps",
                                                                 "guidance_scale")
                               if getattr(args, f) is not None}
    if args.methods:  # a method the study does not declare takes the study's fixed axes (vector seeds) where it has them
        shared = {axis: next(iter(values)) for axis, values in study.fixed_axes().items() if len(values) == 1}
        changes["methods"] = {m: study.methods.get(m) or {a.name: shared[a.name] for a in METHODS[m].axes
                                                          if a.name in shared} for m in args.methods}
    if getattr(args, "require", None):
        changes["require"] = dict(args.require)
    if args.pairs:
        template = study.pairs[0]
        changes["pairs"] = tuple(
            ConceptPair(*(x.strip() for x in text.split(">", 1)), contexts=template.contexts, prompt=template.prompt)
            for text in args.pairs
        )
    study = study.replace(**changes)
    for name in _axes():
        values = getattr(args, f"axis_{name}")
        if values is not None:
            study = study.with_axis(name, values)
    return study


def study_main(study: Study, argv: Sequence[str] | None = None, *, load_oracle: Callable[[str], Callable],
               load_segmenter: Callable[[str], Callable], report: Callable | None = None) -> int:
    """Parse flags, run `study`, print its table and picks, write its figures. Returns an exit status.

    Args:
        study: The declaration; flags override it.
        argv: Command-line arguments (default ``sys.argv[1:]``).
        load_oracle: Loads the classifier named by ``--oracle`` (e.g. `dit_lens.world.load_oracle`).
        load_segmenter: Loads the lesion segmenter named by ``--oracle``.
        report: Called as ``report(result, lens, study, folder)`` after the run.
    """
    args = parser(study).parse_args(argv)
    try:
        return _run(study, args, load_oracle, load_segmenter, report)
    except (*USER_ERRORS, ImportError, WorkerLostError) as err:
        if args.debug:
            raise
        text = " ".join(str(err).split()) or type(err).__name__
        print(f"dit-lens study {study.name}: error: {text} (--debug shows the traceback)", file=sys.stderr)
        return 2


def _run(study: Study, args: argparse.Namespace, load_oracle: Callable, load_segmenter: Callable,
         report: Callable | None) -> int:
    study = declared(study, args)
    runner = executor(args)  # a bad flag, or Ray missing, is said before anything is loaded or made
    if runner is not None:
        runner.connect()  # an unreachable cluster is said before anything is loaded or claimed
    from ..model.lens import load
    from ..trace.store import CACHE_ENV, cache_root

    if args.model != "embedded":
        check_pipeline_folder(args.model)
    check_writable_folder(cache_root(), "the cache folder", f"set {CACHE_ENV} to a writable folder")
    if args.out is not None:
        _check_out(Path(args.out))
    lens = load(args.model, lora=args.lora)
    oracle, segmenter = load_oracle(args.oracle), load_segmenter(args.oracle)
    start = time.perf_counter()
    from ..views.study import study_figure
    from .cells import CellRunner

    folder = study_folder(study, lens, args.out)
    cells = CellRunner(study, lens, oracle, segmenter, folder, progress=False, overwrite=args.overwrite)
    with cells.in_use():  # no other study replaces the folder before its figures are written
        result = run_study(study, lens, oracle=oracle, segmenter=segmenter, out=folder, repair=args.repair,
                           overwrite=args.overwrite, executor=runner)
        print_table(result)
        picks = [p for p in pick_settings(result) if _sweeps(result, p["method"])]
        print_picks(result, picks)
        for pick in picks:
            path = cells.show(pick)
            what = "gate explorer" if path.suffix == ".html" else "pairs figure"
            print(f"{study.name}: {what} of the picked {pick['method']} setting for {pick['pair']}: {path}")
        cells.record(f"{study.name}.png")
        study_figure(result).savefig(folder / f"{study.name}.png", dpi=120, bbox_inches="tight")
        if report is not None:
            report(result, lens, study, folder)
    print(f"{study.name}: {time.perf_counter() - start:.0f} s; results in {folder} (result.zarr, {study.name}.png)")
    return 0


def _check_out(folder: Path) -> None:
    """Refuse an --out that is a file or cannot be written, without writing anything (it is claimed,
    or refused untouched, once the model is loaded)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file, not a folder; pass a result folder")
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {folder} cannot be written ({existing} is not a writable folder); pass a "
                         f"writable result folder")


def _sweeps(result, method: str) -> bool:
    """Whether `method` has more than one setting per pair in `result` (something to pick)."""
    return any(result.sizes[a] > 1 for a in method_axes(result)[method])


def print_table(result) -> None:
    """One line per cell: the method, pair and swept settings, and each metric with its 95% interval.

    A method's row is printed once, with ``·`` under the axes it does not have.
    """
    own = method_axes(result)
    extras = _extras(result)  # a method's own per-cell values (a vector's stability): shown when they vary
    metrics = [m for m in metric_names(result) if m != "bg_lpips" and (m not in extras or _varies(result, m))]
    if "method" not in result.dims:
        result = result.expand_dims(method=list(own))
    flat = result[metrics + [f"{m}_low" for m in metrics] + [f"{m}_high" for m in metrics]].to_dataframe().reset_index()
    dims = [d for d in result["flip_rate"].dims if result.sizes[d] > 1 or d in ("pair", "method")]
    rows = []
    for method, group in flat.groupby("method", sort=False):
        group = group.drop_duplicates(subset=["pair", *own[method]]).astype({d: object for d in dims})
        group.loc[:, [d for d in dims if d not in ("method", "pair", *own[method])]] = "·"
        rows.append(group)
    shown = [row for group in rows for _, row in group.iterrows()
             if not all(row[m] != row[m] for m in metrics)]  # all NaN: not a cell of this study
    width = {d: max([len(d), *(len(str(row[d])) for row in shown)]) for d in dims}  # names never cut
    print("  ".join(f"{d:>{width[d]}s}" for d in dims) + "  " + "  ".join(f"{m:>22s}" for m in metrics))
    for row in shown:
        cells = "  ".join(f"{str(row[d]):>{width[d]}s}" for d in dims)
        values = "  ".join(f"{row[m]:7.3f} [{row[m + '_low']:6.3f},{row[m + '_high']:6.3f}]" for m in metrics)
        print(cells + "  " + values)
    n = result["flip_rate_n"].max().item()
    print(f"n = {int(n)} pairs per cell; Bg-LPIPS: {result.attrs.get('bg_lpips_status') or 'not computed'}")


def _extras(result) -> list[str]:
    return read(result.attrs, "extras", [])


def _varies(result, name: str) -> bool:
    values = result[name].values
    values = values[values == values]
    return values.size > 0 and bool((values != values.flat[0]).any())


def print_picks(result, picks: list[dict] | None = None) -> None:
    """Per pair and method, the setting with the best Bg-SSIM among those that reach the study's floors."""
    picks = picks if picks is not None else [p for p in pick_settings(result) if _sweeps(result, p["method"])]
    if not picks:
        return  # one setting per pair and method: nothing to pick
    wanted = " and ".join(f"{m} >= {v:g}" for m, v in floors(result).items())
    picked_shown = ("flip_rate", "target_rate", "bg_ssim")
    print(f"picked per pair and method (best Bg-SSIM with {wanted}):")
    own, extras = method_axes(result), _extras(result)
    for pick in picks:
        where = ", ".join(f"{k}={pick[k]}" for k in own[pick["method"]] if result.sizes[k] > 1)
        shown = "".join(f", {m} {pick[m][0]:.3f}" for m in metric_names(result)
                        if m in pick and (m in picked_shown or m not in (*STANDARD_METRICS, *extras)))
        note = "" if pick["meets"] else "  (no setting meets the floors: the closest shown)"
        print(f"  {pick['pair']}, {pick['method']}: {where}{shown}{note}")


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
