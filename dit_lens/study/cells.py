"""The machinery behind `run_study`: one cell (pair × method × setting) at a time, kept on disk,
assembled at the end (`dit_lens.study.assembly`).

A cell's file name comes from its method's axes (`dit_lens.methods.Method.cell_name`), e.g.
``p0_w0-1_t0-1_a3_r0_b0.3_n32.json`` (MedSteer) or ``reprompt_p0_b0.3.json``; a cell that exists is
never run again.

Reliability: the folder is claimed with `dit_lens.storage.claim` for the study's identity (its cell
context, the model's fingerprint, the metrics version and the judges: values, never how a path was
spelled). A folder dit-lens did not make is refused untouched, whatever ``overwrite`` says; a study
folder of another identity is replaced (only the entries dit-lens recorded writing there) with
``overwrite=True``, and never while another process runs a study in it. Every cell file and
``study.json`` is a sealed record (`dit_lens.storage.write_record`), checked whenever it is read (a
damaged cell is an error naming the file; ``repair=True`` recomputes just the damaged cells). A
cell whose numbers are not finite is never stored. Any number of processes may run one study at
once in one folder: each cell is computed by one of them (a per-cell lock), the others use it, and
the result is assembled under the folder's lock, so all of them return the same result.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import xarray as xr
from tqdm.auto import tqdm

from ..methods import MethodContext, Vectors, get
from ..methods.registry import VECTOR_SEEDS
from ..scale.executors import LocalExecutor, RayExecutor, as_executor
from ..storage import (MARKER, Claim, DamagedError, FolderClaimError, MissingError, claim, exclusive, jsonable,
                       read_record, try_exclusive, write_record)
from ..validate import NonFiniteError
from ..views.explorer import write_explorer
from ..views.figures import pairs_figure
from ..storage import inuse
from .. import metrics as M
from .assembly import assemble_cells, replace_zarr
from .declaration import Study

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["CellRunner", "DamagedCellError"]

#: The key under which a cell file keeps the digest of its content.
CHECKSUM = "checksum"
#: What a study folder holds that dit-lens writes (recorded in its marker before they are written).
ENTRIES = ("study.json", "cells", "result.zarr")


class DamagedCellError(DamagedError):
    """A finished study cell's file is unreadable or fails its checksum; it was not used."""


class CellRunner:
    """Runs and stores the cells of one study in `folder`.

    Args:
        repair: Recompute finished cells whose files are damaged (instead of refusing them).
        overwrite: Replace a study folder that holds *another* dit-lens study (or cells of older metric
            definitions): what dit-lens recorded writing there is removed, nothing else, and never
            while another process runs a study in it. Folders dit-lens did not make are refused
            whatever this says.
    """

    def __init__(self, study: Study, lens: Lens, oracle: Callable, segmenter: Callable, folder: Path,
                 *, progress: bool = True, repair: bool = False, overwrite: bool = False) -> None:
        self.study, self.lens, self.oracle, self.segmenter = study, lens, oracle, segmenter
        self.folder, self.progress = Path(folder), progress
        self.repair, self.overwrite = bool(repair), bool(overwrite)
        labels = list(getattr(oracle, "labels", []))
        for pair in study.pairs:
            for label in (pair.source, pair.target):
                if labels and label not in labels:
                    raise ValueError(f"label {label!r} of pair {pair.name!r} is not one of the oracle's labels {labels}")
        self.vectors = None
        if study.vector_seeds():
            self.vectors = Vectors(lens, seeds=study.vector_seeds(), num_inference_steps=study.num_inference_steps,
                                   guidance_scale=study.guidance_scale, batch_size=8, repair=self.repair)

    def context(self, **changes: Any) -> MethodContext:
        s = self.study
        return MethodContext(num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale, batch_size=8,
                             vectors=self.vectors, segmenter=self.segmenter, oracle=self.oracle, **changes)

    # -- cells ---------------------------------------------------------------------------

    def cells(self) -> list[dict]:
        """Every cell: ``{"method", "pair" (index), <the method's axes>: value}``."""
        grid = []
        for method, sweep in self.study.methods.items():
            for p in range(len(self.study.pairs)):
                for values in itertools.product(*sweep.values()):
                    grid.append({"method": method, "pair": p, **dict(zip(sweep, values))})
        return grid

    def path(self, cell: dict) -> Path:
        return self.folder / "cells" / f"{get(cell['method']).cell_name(cell['pair'], cell)}.json"

    def run(self, executor: Any = None) -> None:
        """Run every cell not yet finished (in this or another process), keeping each on disk; with a
        `dit_lens.scale.RayExecutor`, as Ray tasks on workers that each load the model once (its
        cluster is joined before the folder is claimed: an unreachable one claims nothing)."""
        runner = as_executor(executor)
        if isinstance(runner, RayExecutor):
            runner.connect()
        with self.in_use():
            self._run(runner)

    def _run(self, runner: Any) -> None:
        cells = self.cells()
        todo = [c for c in cells if not self.finished(c)]
        if len(cells) > len(todo):
            print(f"{self.study.name}: {len(cells) - len(todo)} finished cells reused from {self.folder}")
        if not isinstance(runner, LocalExecutor):
            self._capture_vectors_on(runner, todo)
            job = (self.study, self.oracle, self.segmenter, str(self.folder), self.repair)
            for _ in tqdm(runner.map(self.lens, _run_on_worker, todo, shared=job), total=len(todo),
                          desc=self.study.name, unit="cell", disable=not self.progress):
                pass
            return
        elsewhere = []  # cells another process is running now
        for cell in tqdm(todo, desc=self.study.name, unit="cell", disable=not self.progress):
            lock = try_exclusive(self._lock_target(cell))
            if lock is None:
                elsewhere.append(cell)
                continue
            try:
                self._run_if_unfinished(cell)
            finally:
                lock.release()
        for cell in elsewhere:  # wait for them; run those whose process gave up
            with exclusive(self._lock_target(cell)):
                self._run_if_unfinished(cell)

    # -- the folder ----------------------------------------------------------------------

    def identity(self) -> dict:
        """What the folder's cells mean: the cell context, the model's weights, the metric definitions
        and the judges (values; two spellings of one model folder are one identity)."""
        judges = {"oracle": judge_fingerprint(self.oracle), "segmenter": judge_fingerprint(self.segmenter)}
        return jsonable({"context": self.study.cell_context(), "model_fingerprint": self.lens.fingerprint,
                         "metrics_version": M.METRICS_VERSION, "judges": judges})

    @contextlib.contextmanager
    def in_use(self, *, replace: bool | None = None) -> Iterator[Claim]:
        """Claim the folder for this study and keep it in use by this process for the ``with`` body:
        other processes may run the same study in it meanwhile, but none replaces it with another
        (even with overwrite: they are refused as busy). `replace` defaults to ``overwrite``.

        Raises:
            FolderClaimError: the folder holds something dit-lens did not make, another study (without
                overwrite), or another study that a process is running now; nothing was changed.
        """
        replace = self.overwrite if replace is None else replace
        with exclusive(self.folder):
            claimed_ = self._claim(replace)
            release = inuse.mark(self.folder)
        try:
            yield claimed_
        finally:
            release()

    def _claim(self, replace: bool) -> Claim:
        """Claim the folder (the caller holds its lock), record what a study writes, and write
        ``study.json``; check the one already there when the folder is reused."""
        where = "the study folder"
        try:
            out = claim(self.folder, "study", identity=self.identity(), what=where)
        except FolderClaimError:
            if not replace:
                raise
            busy = inuse.others(self.folder) if (self.folder / MARKER).is_file() else []  # else refused below
            if busy:
                raise FolderClaimError(
                    f"{where} {self.folder} is in use: another study runs in it now (process "
                    f"{', '.join(map(str, busy))}); it is replaced only when no study runs there: wait for it to "
                    f"finish and run again with overwrite, or pass a new folder (nothing was changed)") from None
            out = claim(self.folder, "study", identity=self.identity(), overwrite=True, what=where)
        out.record(*ENTRIES)
        declaration = self.folder / "study.json"
        if out.state == "reused" and declaration.exists():
            read_record(declaration, what="the study declaration",
                        fix="delete that file and run again (dit-lens writes it again from the declaration; the "
                            "cells, each sealed on its own, are kept)")
        write_record(declaration, {"study": self.study.to_dict(), **self.identity()})
        return out

    def _capture_vectors_on(self, runner: Any, todo: list[dict]) -> None:
        """Capture the prompts of the concept vectors `todo` needs as one item each, spread over the
        workers (each with all its threads), before any cell runs: otherwise the first cells of a pair
        wait on one worker computing its vector. The cells then read them from the capture store."""
        pairs = sorted({cell["pair"] for cell in todo if VECTOR_SEEDS in cell})
        if self.vectors is None or not pairs:
            return
        prompts = [side for p in pairs for side in (self.study.pairs[p].positive(), self.study.pairs[p].negative())]
        for _ in tqdm(runner.map(self.lens, _capture_on_worker, prompts, shared=self.vectors.settings),
                      total=len(prompts), desc=f"{self.study.name} vectors", unit="capture", disable=not self.progress):
            pass

    def _lock_target(self, cell: dict) -> Path:
        return self.folder / ".locks" / self.path(cell).name  # lock files kept out of cells/

    def _run_if_unfinished(self, cell: dict) -> None:
        if not self.finished(cell):
            _write_cell(self.path(cell), {"cell": jsonable(cell), "metrics": self.run_cell(cell)})

    def finished(self, cell: dict) -> bool:
        """Whether `cell` has an intact file. A damaged one is an error, or unfinished with `repair`."""
        if not self.path(cell).exists():
            return False
        try:
            _read_cell(self.path(cell), cell)
        except DamagedCellError:
            if self.repair:
                return False
            raise
        return True

    def run_cell(self, cell: dict) -> dict:
        s, method = self.study, get(cell["method"])
        pair = s.pairs[cell["pair"]]
        settings = {a.name: cell[a.name] for a in method.axes}
        seeds = [s.eval_seed_base + i for i in range(s.eval_seeds)]
        result = self.measure(method.run(self.lens, pair, seeds, settings, context=self.context()), pair)
        if method.extras is not None:
            for name, value in method.extras(self.lens, pair, settings, context=self.context()).items():
                result[name] = {"value": value, "low": value, "high": value, "n": 1}
        return result

    def show(self, pick: dict, *, pairs: int = 8) -> Path:
        """Generate `pairs` pairs at a picked setting (`pick_settings`) and write a pairs figure beside
        the result, ``best_<method prefix>p<pair>.png``, and with gates (steering methods) the gate
        explorer ``.html``. Returns the explorer's path, or the figure's."""
        s, method = self.study, get(pick.get("method", "medsteer"))
        index = [p.name for p in s.pairs].index(pick["pair"])
        sweep = s.methods[method.name]
        settings = {a.name: next(v for v in sweep[a.name] if a.label(v) == pick[a.name]) for a in method.axes}
        seeds = [s.eval_seed_base + i for i in range(min(pairs, s.eval_seeds))]
        out = method.run(self.lens, s.pairs[index], seeds, settings, context=self.context(record_gates=True))
        stem = self.folder / f"best_{method.cell_prefix}p{index}"
        self.record(stem.with_suffix(".png").name, *([stem.with_suffix(".html").name] if "gate" in out else []))
        pairs_figure(out, judge=self.oracle).savefig(stem.with_suffix(".png"), dpi=110, bbox_inches="tight")
        if "gate" not in out:
            return stem.with_suffix(".png")
        return write_explorer(out, stem.with_suffix(".html"), judge=self.oracle)

    # -- metrics -------------------------------------------------------------------------

    def measure(self, out: xr.Dataset, pair: Any) -> dict:
        probs = M.classify(out, self.oracle)
        masks = M.segment(out, self.segmenter)
        background = M.background_mask(masks)
        lpips = M.background_lpips(out, background, unavailable="nan")  # the reason goes in the result
        values = {
            "flip_rate": M.flips(probs, pair.source),
            "target_rate": M.target_rate(probs, pair.target),
            "confidence_shift": M.confidence_drop(probs, pair.source),
            "bg_ssim": M.background_ssim(out, background),
            "bg_psnr": M.background_psnr(out, background).clip(max=100.0),
            "bg_lpips": lpips,
        }
        judged = M.Judged(out, probs, masks, pair.source, pair.target)
        values.update({m.name: m.fn(judged) for m in self.study.metrics})
        result = {k: M.estimate(v).to_dict() for k, v in values.items()}
        result["bg_lpips"]["status"] = lpips.attrs["status"]
        return result

    # -- results -------------------------------------------------------------------------

    def assemble(self) -> xr.Dataset:
        """The cells as one Dataset ``(method, pair, <axes>)`` (`dit_lens.study.assembly.assemble_cells`),
        each cell file checked as it is read, and kept in the folder as ``result.zarr``."""
        records = [(cell, _read_cell(self.path(cell), cell)) for cell in self.cells()]
        ds = assemble_cells(self.study, self.lens, records, folder=self.folder)
        with self.in_use(replace=False), exclusive(self.folder):
            replace_zarr(ds, self.folder / "result.zarr")
        return ds

    def record(self, *entries: str) -> None:
        """Record `entries` (names in the folder) as the study's before they are written, so that
        replacing the folder later removes them; the folder must hold this study."""
        with exclusive(self.folder):
            claim(self.folder, "study", identity=self.identity(), what="the study folder").record(*entries)


def judge_fingerprint(judge: Any) -> str:
    """What names a judge in a study folder: its own ``fingerprint`` (the embedded judges digest their
    weights), else its type's or function's qualified name (a user's judge without a fingerprint is
    recognised by name only: give it a ``fingerprint`` attribute when its behaviour can change)."""
    own = getattr(judge, "fingerprint", None)
    if isinstance(own, str) and own:
        return own
    kind = judge if callable(judge) and hasattr(judge, "__qualname__") else type(judge)
    return f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', repr(kind))}"


def _write_cell(path: Path, record: dict) -> None:
    """Write a sealed cell file (durably, atomically); numbers that are not finite are refused first."""
    for name, est in record["metrics"].items():
        numbers = [est.get(k) for k in ("value", "low", "high")]
        if est.get("n", 0) and not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers):
            raise NonFiniteError(
                f"study cell {path.name}: the metric {name!r} is {numbers[0]} (interval {numbers[1]} to "
                f"{numbers[2]}) over {est.get('n')} pairs, not a finite number; nothing was stored: check that "
                f"metric's function (a metric returns finite per-pair values, or NaN where it does not apply)")
    write_record(path, record, key=CHECKSUM)


def _read_cell(path: Path, cell: dict) -> dict:
    """The metrics of a cell file, checked: it parses, matches its digest and is `cell`'s."""
    fix = ("it was not used; rerun with repair=True (`--repair`) to recompute just the damaged cells, "
           "or delete that file")
    try:
        record = read_record(path, what="study cell", fix=fix, key=CHECKSUM)
    except (DamagedError, MissingError) as err:
        raise DamagedCellError(str(err)) from None
    metrics = record.get("metrics")
    if record.get("cell") != jsonable(cell) or not isinstance(metrics, dict):
        raise DamagedCellError(f"study cell {path} holds {record.get('cell')!r}, not the cell "
                               f"{jsonable(cell)!r} its name stands for; {fix}")
    return metrics


#: A worker's runner for the study it runs now, built on its first cell and reused for the rest
#: (one at a time: workers are kept between studies, and a runner holds its concept vectors).
_WORKER_RUNNER: dict[tuple, CellRunner] = {}


def _run_on_worker(lens: Lens, job: tuple, cell: dict) -> None:
    """One cell on a Ray worker, under the same per-cell lock as in-process runs (the folder was
    claimed by the caller)."""
    study, oracle, segmenter, folder, repair = job
    key = (id(lens), folder, repair)
    runner = _WORKER_RUNNER.get(key)
    if runner is None or runner.study != study:
        _WORKER_RUNNER.clear()
        runner = _WORKER_RUNNER[key] = CellRunner(study, lens, oracle, segmenter, Path(folder), progress=False,
                                                  repair=repair)
    runner.oracle, runner.segmenter = oracle, segmenter  # this call's, not an earlier study's
    with exclusive(runner._lock_target(cell)):
        runner._run_if_unfinished(cell)


def _capture_on_worker(lens: Lens, settings: dict, prompts: list[str]) -> None:
    """One capture of a concept vector's prompts on a Ray worker, into the shared capture store."""
    from ..trace.capture import capture

    capture(lens, prompts, **settings)
