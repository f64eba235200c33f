"""The machinery behind `run_study`: one cell (pair × method × setting) at a time, kept on disk,
assembled at the end.

A cell's file name comes from its method's axes (`dit_lens.methods.Method.cell_name`), e.g.
``p0_w0-1_t0-1_a3_r0_b0.3_n32.json`` (MedSteer) or ``reprompt_p0_b0.3.json``; a cell that exists is
never run again.

Reliability: the folder must be new, empty, or already a dit-lens study folder (it is marked with
`dit_lens.storage.MARKER`); anything else is refused untouched. Every cell file carries a
checksum of its content, checked whenever it is read (a damaged cell is an error naming the file;
``repair=True`` recomputes just the damaged cells). Any number of processes may run one study folder
at once: each cell is computed by one of them (a per-cell lock), the others use it, and the result
is assembled under the folder's lock, so all of them return the same result.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from ..methods import MethodContext, Vectors, get
from ..methods.registry import VECTOR_SEEDS
from ..scale.executors import LocalExecutor, as_executor
from ..trace.attrs import typed
from ..storage import claim, exclusive, remove_stale_temporaries, temporary_name, try_exclusive, write_atomic
from ..views.explorer import write_explorer
from ..views.figures import pairs_figure
from . import metrics as M
from .declaration import Study, context_of

__all__ = ["CellRunner", "DamagedCellError"]

#: The key under which a cell file keeps the checksum of its content.
CHECKSUM = "checksum"


class DamagedCellError(ValueError):
    """A finished study cell's file is unreadable or fails its checksum; it was not used."""


class CellRunner:
    """Runs and stores the cells of one study in `folder`.

    Args:
        repair: Recompute finished cells whose files are damaged (instead of refusing them).
        overwrite: Let a study folder that holds *another* dit-lens study (or cells of older metric
            definitions) be emptied of its cells and result and reused. Folders dit-lens did not
            make are refused whatever this says.
    """

    def __init__(self, study: Study, lens: Any, oracle: Callable, segmenter: Callable, folder: Path,
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
                             vectors=self.vectors, segmenter=self.segmenter, **changes)

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
        `dit_lens.scale.RayExecutor`, as Ray tasks on workers that each load the model once."""
        runner = as_executor(executor)
        with exclusive(self.folder):
            self._claim_folder()
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
            _write_cell(self.path(cell), {"cell": _jsonable(cell), "metrics": self.run_cell(cell)})

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
        pairs_figure(out).savefig(stem.with_suffix(".png"), dpi=110, bbox_inches="tight")
        return write_explorer(out, stem.with_suffix(".html")) if "gate" in out else stem.with_suffix(".png")

    # -- metrics -------------------------------------------------------------------------

    def measure(self, out: xr.Dataset, pair: Any) -> dict:
        probs = M.classify(out, self.oracle)
        masks = M.segment(out, self.segmenter)
        background = M.background_mask(masks)
        lpips = M.background_lpips(out, background)
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
        """The cells as one Dataset ``(method, pair, <axes>)``; a method's cells fill the axes it lacks."""
        s = self.study
        axes = {a.name: a for m in s.methods for a in get(m).axes}
        coords: dict[str, list] = {"method": list(s.methods), "pair": [p.name for p in s.pairs]}
        for name in s.axis_names():
            labels = [axes[name].label(v) for m, sweep in s.methods.items() if name in sweep for v in sweep[name]]
            coords[name] = list(dict.fromkeys(labels))
        shape = tuple(len(v) for v in coords.values())
        records = {}
        for cell in self.cells():
            records[self.path(cell)] = _read_cell(self.path(cell), cell)
        names = list(dict.fromkeys(m for record in records.values() for m in record))
        arrays = {f"{m}{suffix}": np.full(shape, np.nan) for m in names for suffix in ("", "_low", "_high", "_n")}
        status = set()
        for cell in self.cells():
            index = (coords["method"].index(cell["method"]), cell["pair"],
                     *(coords[a].index(axes[a].label(cell[a])) if a in cell else slice(None) for a in s.axis_names()))
            for m, est in records[self.path(cell)].items():
                status.add(est.get("status", "")) if m == "bg_lpips" else None
                for suffix, key in (("", "value"), ("_low", "low"), ("_high", "high"), ("_n", "n")):
                    arrays[f"{m}{suffix}"][index] = est[key]
        ds = xr.Dataset({k: (tuple(coords), v) for k, v in arrays.items()}, coords=coords)
        ds.attrs.update(self.lens.provenance())
        ds.attrs.update(
            study=typed(s.to_dict()), folder=str(self.folder),
            method_axes=typed({m: list(sweep) for m, sweep in s.methods.items()}),
            metrics=typed(names), require=typed(s.require),
            extras=typed([m for m in names if m not in (*M.STANDARD_METRICS, *(x.name for x in s.metrics))]),
            eval_seeds=[s.eval_seed_base + i for i in range(s.eval_seeds)],
            bg_lpips_status="; ".join(sorted(x for x in status if x)),
        )
        for name, axis in axes.items():  # what the values meant on this model and sampler (layer windows → blocks)
            if axis.resolve is not None:
                values = dict.fromkeys(v for sweep in s.methods.values() for v in sweep.get(name, ()))
                ds.attrs[f"{name}_resolved"] = typed(
                    {str(axis.label(v)): axis.resolve(v, self.lens, s.num_inference_steps) for v in values})
        with exclusive(self.folder):
            _replace_zarr(ds, self.folder / "result.zarr")
        return ds

    def _claim_folder(self) -> None:
        """Refuse a folder dit-lens did not make, or whose cells mean something else (unless
        `overwrite`: then its cells and result are removed); record this declaration in it."""
        claim(self.folder, "study")
        declaration = self.folder / "study.json"
        judges = {"oracle": judge_fingerprint(self.oracle), "segmenter": judge_fingerprint(self.segmenter)}
        mine = _jsonable({"study": self.study.to_dict(), "model_fingerprint": self.lens.fingerprint,
                          "metrics_version": M.METRICS_VERSION, "judges": judges})
        if declaration.exists():
            theirs = json.loads(declaration.read_text())
            try:
                context = context_of(theirs["study"])
            except (KeyError, TypeError, ValueError):
                context = None
            if theirs.get("metrics_version", 1) != M.METRICS_VERSION:
                why = f"was measured with metrics version {theirs.get('metrics_version', 1)} (this is {M.METRICS_VERSION})"
            elif context != self.study.cell_context() or theirs.get("model_fingerprint") != self.lens.fingerprint:
                why = "holds another study or model (pairs, seeds, sampler, metrics or weights differ)"
            elif "judges" not in theirs:
                why = ("was measured before dit-lens recorded its judges (the oracle and segmenter behind every "
                       "metric), so its cells cannot be trusted to match these")
            elif theirs["judges"] != judges:
                changed = sorted(k for k in judges if theirs["judges"].get(k) != judges[k])
                why = f"was measured with another {' and '.join(changed)}"
            else:
                why = None
            if why and not self.overwrite:
                raise ValueError(f"{self.folder} {why}; pass a new out= folder, or overwrite=True "
                                 f"(`--overwrite`) to replace its cells and result (nothing was changed)")
            if why:
                for made in ("cells", "result.zarr"):
                    shutil.rmtree(self.folder / made, ignore_errors=True)
        _write_json_atomic(declaration, mine)


def judge_fingerprint(judge: Any) -> str:
    """What names a judge in a study folder: its own ``fingerprint`` (the embedded judges digest their
    weights), else its type's or function's qualified name (a user's judge without a fingerprint is
    recognised by name only: give it a ``fingerprint`` attribute when its behaviour can change)."""
    own = getattr(judge, "fingerprint", None)
    if isinstance(own, str) and own:
        return own
    kind = judge if callable(judge) and hasattr(judge, "__qualname__") else type(judge)
    return f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', repr(kind))}"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=1).encode())


def _checksum(record: dict) -> str:
    content = json.dumps({k: v for k, v in record.items() if k != CHECKSUM}, sort_keys=True)
    return "blake2b:" + hashlib.blake2b(content.encode(), digest_size=16).hexdigest()


def _write_cell(path: Path, record: dict) -> None:
    """Write a cell file with the checksum of its content (durably, atomically)."""
    record = _jsonable(record)
    _write_json_atomic(path, {**record, CHECKSUM: _checksum(record)})


def _read_cell(path: Path, cell: dict) -> dict:
    """The metrics of a cell file, checked: it parses, matches its checksum and is `cell`'s.
    Files of earlier versions (no checksum) are checked as far as they can be."""
    fix = ("it was not used; rerun with repair=True (`--repair`) to recompute just the damaged cells, "
           "or delete that file")
    try:
        record = json.loads(path.read_text())
        metrics = record["metrics"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DamagedCellError(f"study cell {path} is unreadable ({type(err).__name__}: {err}); {fix}") from err
    if CHECKSUM in record and record[CHECKSUM] != _checksum(record):
        raise DamagedCellError(f"study cell {path} fails its checksum (its content changed after it was "
                               f"written); {fix}")
    if record.get("cell") != _jsonable(cell) or not isinstance(metrics, dict):
        raise DamagedCellError(f"study cell {path} holds {record.get('cell')!r}, not the cell "
                               f"{_jsonable(cell)!r} its name stands for; {fix}")
    return metrics


#: A worker's runner for the study it runs now, built on its first cell and reused for the rest
#: (one at a time: workers are kept between studies, and a runner holds its concept vectors).
_WORKER_RUNNER: dict[tuple, CellRunner] = {}


def _run_on_worker(lens: Any, job: tuple, cell: dict) -> None:
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


def _capture_on_worker(lens: Any, settings: dict, prompts: list[str]) -> None:
    """One capture of a concept vector's prompts on a Ray worker, into the shared capture store."""
    from ..trace.capture import capture

    capture(lens, prompts, **settings)


def _replace_zarr(ds: xr.Dataset, path: Path) -> None:
    """Write the assembled result (derived from the cells, so replacing it loses nothing), with a
    checksum on every chunk; the old result is swapped out only once the new one is complete.
    Call it holding ``exclusive(folder)``."""
    from numcodecs import CRC32

    remove_stale_temporaries(path)
    tmp, old = temporary_name(path), path.parent / f".{path.name}.{os.getpid()}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    encoding = {name: {"filters": [CRC32()]} for name in ds.variables}
    ds.to_zarr(tmp, mode="w-", zarr_format=2, encoding=encoding)  # format 3 warns on string coordinates
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
