"""Zarr stores for captures: content-addressed, self-describing, resumable, verified, never overwritten.

A capture store is a Zarr (format 2) group that plain ``xarray.open_zarr`` opens. Besides the data
variable (named after the site) it holds ``done`` ``(prompt, seed)``, the cells already complete,
and in its attrs the provenance of the capture and the *identity* (model fingerprint, prompts,
seeds, every setting, package version) it was made for. Opening a store for a capture with another
identity is an error: a store is filled cell by cell, resumed after a crash, and never overwritten
or deleted by dit-lens.

Integrity: every chunk of every array carries a CRC-32 checksum (numcodecs' ``crc32`` filter, which
Zarr format 2 applies inside the compressor and checks on every read, also through
``xarray.open_zarr``). A cell is marked done only after its chunks are on disk (fsynced) and read
back intact; `CaptureStore.verify` finds done cells whose chunks are missing, damaged or fail their
checksum, which `dit_lens.capture` refuses to serve (``repair=True`` recomputes just those).
Stores of an earlier format (``dit-lens.capture/1``, no checksums) are refused, never converted or
touched: a capture is recomputed from the model, so the message says to delete the store and run again.

Writers: hold `dit_lens.storage.exclusive` on the store path while creating or filling it
(`dit_lens.capture` does), so any number of processes may capture into one store.

Examples:
    >>> import tempfile, numpy as np, xarray as xr
    >>> template = xr.Dataset(coords={"prompt": ["a polyp"], "seed": [0, 1], "channel": [0, 1]})
    >>> spec = VariableSpec("attn2", ("prompt", "seed", "channel"), (1, 2, 2), (1, 1, 2))
    >>> path = Path(tempfile.mkdtemp()) / "demo.zarr"
    >>> store = CaptureStore.open(path, template, spec, identity={"steps": 2}, attrs={})
    >>> store.missing()
    [(0, 0), (0, 1)]
    >>> store.write((0, 1), np.array([1.0, 2.0]))
    >>> store.mark_done([(0, 1)])
    >>> store.verify()
    {}
    >>> store.missing()
    [(0, 0)]
    >>> xr.open_zarr(path).attn2.values[0, 1].tolist()
    [1.0, 2.0]
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import xarray as xr
import zarr
from numcodecs import CRC32

from .attrs import typed
from ..storage.cache import CACHE_ENV, cache_root, content_key
from ..storage.locks import remove_stale_temporaries, temporary_name

__all__ = [
    "CACHE_ENV",
    "CaptureStore",
    "CaptureStoreError",
    "DamagedStoreError",
    "VariableSpec",
    "cache_root",
    "check_finished",
    "content_key",
    "open_finished",
]

#: Written into every store's attrs; a store without it is not a dit-lens capture.
STORE_FORMAT = "dit-lens.capture/2"
#: Earlier formats, refused with advice to recompute: ``/1`` is ``/2`` without chunk checksums.
EARLIER_FORMATS = ("dit-lens.capture/1",)
_ZARR_FORMAT = 2  # format 3 warns on string coordinates and consolidated metadata (zarr 3.1)


class CaptureStoreError(ValueError):
    """A store path holds something other than the capture asked for, or is unreadable or damaged."""


class DamagedStoreError(CaptureStoreError):
    """A store holds the capture asked for, but some finished cells (or its ``done`` record) are
    missing or damaged; ``capture(..., repair=True)`` recomputes them."""


def _filters() -> list:
    return [CRC32()]  # checked on every read; a mismatch raises


@dataclass(frozen=True)
class VariableSpec:
    """The data variable of a store: name, dims, full shape and chunk shape."""

    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    chunks: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.dims) == len(self.shape) == len(self.chunks)):
            raise ValueError(
                f"VariableSpec {self.name!r}: dims {self.dims}, shape {self.shape} and chunks "
                f"{self.chunks} must have the same length"
            )
        if self.dims[:2] != ("prompt", "seed"):
            raise ValueError(f"VariableSpec {self.name!r}: dims must start with (prompt, seed)")


class CaptureStore:
    """An open capture store. Make one with `CaptureStore.open`."""

    def __init__(self, path: Path, spec: VariableSpec) -> None:
        self.path = path
        self.spec = spec
        group = zarr.open_group(str(path), mode="r+", zarr_format=_ZARR_FORMAT)
        self._data = group[spec.name].with_config({"write_empty_chunks": True})  # all-NaN cells too
        self._done = group["done"]
        try:
            self._done_cells = np.asarray(self._done[...], dtype=bool)
        except Exception as err:  # a chunk that is missing or does not decode
            raise DamagedStoreError(
                f"store {path} is damaged (its 'done' record is unreadable: {type(err).__name__}: "
                f"{err}); nothing was served from it; recompute with `repair=True` (every cell is "
                f"checked again), pass another `store=` path, or delete it yourself"
            ) from err

    @classmethod
    def reset_done(cls, path: str | Path) -> None:
        """Rewrite an unreadable ``done`` record as all-missing (for a repair: cells whose chunks
        are intact are recomputed too, since nothing says they were finished)."""
        group = zarr.open_group(str(path), mode="r+", zarr_format=_ZARR_FORMAT)
        done = group["done"]
        done[...] = np.zeros(done.shape, dtype=bool)

    @classmethod
    def open(
        cls,
        path: str | Path,
        template: xr.Dataset,
        spec: VariableSpec,
        *,
        identity: Mapping[str, Any],
        attrs: Mapping[str, Any],
    ) -> "CaptureStore":
        """Open the store at `path` for the capture `identity`, creating it if absent.

        Args:
            path: The ``.zarr`` folder.
            template: Coordinates of the capture (every dim of `spec` that has labels).
            spec: The data variable.
            identity: What makes two captures the same; stored, and compared on reopening.
            attrs: Further provenance written into the store's attrs on creation.

        Raises:
            CaptureStoreError: `path` exists but is not a readable dit-lens capture store, or holds
                a capture with another identity. The store is left untouched.
        """
        path = Path(path).expanduser()
        if path.is_symlink() and not path.exists():
            raise CaptureStoreError(f"store {path} is a link to {os.readlink(path)}, which does not exist; pass a "
                                    f"store= path that does not exist yet (or an existing capture store)")
        if path.exists() and not path.is_dir():
            raise CaptureStoreError(f"store {path} is a file, not a capture store (a .zarr folder); pass another "
                                    f"store= path (nothing was changed)")
        identity = typed(identity)
        if path.exists() or not _create(path, template, spec, identity, dict(attrs)):
            _check_existing(path, template, spec, identity)
        return cls(path, spec)

    def missing(self) -> list[tuple[int, int]]:
        """``(prompt index, seed index)`` of the cells not yet complete, prompt-major."""
        return [(int(i), int(j)) for i, j in np.argwhere(~self._done_cells)]

    def write(self, cell: tuple[int, int], values: np.ndarray, *, at: tuple[int, ...] = ()) -> None:
        """Write `values` into `cell` (optionally at leading indices `at` within the cell)."""
        self._data[(*cell, *at)] = values

    def mark_done(self, cells: Iterable[tuple[int, int]]) -> None:
        """Record `cells` as complete, once their chunks are flushed to disk and read back intact.

        Raises:
            CaptureStoreError: a cell's values did not all reach the store, or do not read back.
        """
        cells = [(int(i), int(j)) for i, j in cells]
        damaged = self.verify(cells, done_only=False)
        for i, j in cells:
            for key in self._chunk_keys(i, j) if (i, j) not in damaged else ():
                _fsync(self.path / self.spec.name / key)
        if damaged:
            raise CaptureStoreError(
                f"store {self.path}: cells {sorted(damaged)} were not all written, hold NaN, or do not "
                f"read back ({next(iter(damaged.values()))}); they were not marked done (write every "
                f"finite value of a cell before marking it; is the disk full or failing?)"
            )
        _fsync_dir(self.path / self.spec.name)
        for i, j in cells:
            self._done_cells[i, j] = True
        self._done[...] = self._done_cells  # one chunk, written atomically by zarr's LocalStore
        _fsync(self.path / "done" / ".".join("0" * self._done_cells.ndim))

    def unmark(self, cells: Iterable[tuple[int, int]]) -> None:
        """Record `cells` as missing again (to recompute them)."""
        for i, j in cells:
            self._done_cells[i, j] = False
        self._done[...] = self._done_cells

    def verify(
        self, cells: Iterable[tuple[int, int]] | None = None, *, done_only: bool = True
    ) -> dict[tuple[int, int], str]:
        """Check done cells (or `cells`): every chunk exists, decodes, passes its checksum and holds only
        finite values (a NaN is a value never written, or a run that diverged).

        Returns:
            ``{(prompt index, seed index): what is wrong}`` for each damaged cell; empty if none.
        """
        if cells is None:
            cells = [(int(i), int(j)) for i, j in np.argwhere(self._done_cells)]
        folder = self.path / self.spec.name
        present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()
        damaged = {}
        for i, j in cells:
            if done_only and not self._done_cells[i, j]:
                continue
            keys = self._chunk_keys(i, j)
            absent = [k for k in keys if k not in present]
            if absent:
                damaged[(i, j)] = f"{len(absent)} of {len(keys)} chunks missing (e.g. {folder / absent[0]})"
                continue
            try:
                for block in self._blocks(i, j):
                    if not np.isfinite(self._data.blocks[block]).all():  # NaN: unwritten (the fill) or diverged
                        damaged[(i, j)] = f"chunk {folder / self._key(block)} holds NaN or inf values"
                        break
            except Exception as err:  # checksum mismatch, blosc header, truncated file, ...
                damaged[(i, j)] = f"chunk {folder / self._key(block)} is damaged ({type(err).__name__}: {err})"
        return damaged

    def _blocks(self, i: int, j: int) -> list[tuple[int, ...]]:
        grid = self._data.cdata_shape[2:]
        return [(i, j, *rest) for rest in np.ndindex(*grid)]

    def _key(self, block: tuple[int, ...]) -> str:
        separator = getattr(self._data.metadata, "dimension_separator", ".") or "."
        return separator.join(str(int(b)) for b in block)

    def _chunk_keys(self, i: int, j: int) -> list[str]:
        return [self._key(block) for block in self._blocks(i, j)]

    def dataset(self) -> xr.Dataset:
        """The store as a lazily loaded Dataset (without the ``done`` bookkeeping variable)."""
        return xr.open_zarr(self.path).drop_vars("done")


def open_finished(path: str | Path, *, make: str, foreign: bool = False) -> xr.Dataset:
    """A finished capture store at `path`, opened read-only for a readout (probes, SAE training).

    Args:
        path: The store's folder.
        make: How to make the store the readout needs, for the messages.
        foreign: Also accept a Zarr store of the same layout that dit-lens did not write (a readout that takes any
            Dataset of that layout takes its store too).

    Raises:
        CaptureStoreError: no store there, not a readable dit-lens capture store, or runs still unfinished.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CaptureStoreError(f"no capture store at {path}; {make}")
    try:
        ds = xr.open_zarr(path)
    except Exception as err:  # zarr and xarray raise many types for folders that are not stores
        raise CaptureStoreError(f"{path} is not a readable capture store ({type(err).__name__}: {err}); {make}") from err
    if not foreign and ds.attrs.get("dit_lens_store") != STORE_FORMAT:
        raise CaptureStoreError(f"{path} is not a dit-lens capture store; {make}")
    check_finished(ds, f" at {path}")
    return ds


def check_finished(ds: xr.Dataset, where: str = "") -> None:
    """Refuse a capture whose ``done`` marks say some runs are unfinished (`where`: " at <path>", for the message)."""
    if "done" not in ds:
        return
    done = np.asarray(ds["done"].values, bool)
    if not done.all():
        raise CaptureStoreError(f"the store{where} holds {int((~done).sum())} unfinished runs of {done.size}; finish "
                                f"it by running the same dit_lens.capture (same store=) again")


def _create(
    path: Path, template: xr.Dataset, spec: VariableSpec, identity: dict, attrs: dict
) -> bool:
    """Build the store beside `path` and move it into place, so `path` is never half-made.
    Returns False if another process put a store at `path` first (then nothing was changed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        skeleton = template.copy()
        skeleton["done"] = (("prompt", "seed"), np.zeros(spec.shape[:2], dtype=bool))
        skeleton["done"].encoding["chunks"] = spec.shape[:2]  # one chunk: atomic updates
        for name in skeleton.variables:
            skeleton[name].encoding["filters"] = _filters()
        skeleton.attrs = {**attrs, "dit_lens_store": STORE_FORMAT, "identity": identity}
        skeleton.to_zarr(tmp, mode="w-", zarr_format=_ZARR_FORMAT, consolidated=False)
        group = zarr.open_group(str(tmp), mode="r+", zarr_format=_ZARR_FORMAT)
        group.create_array(
            spec.name,
            shape=spec.shape,
            chunks=spec.chunks,
            dtype="float32",
            fill_value=np.nan,
            filters=_filters(),
            attributes={"_ARRAY_DIMENSIONS": list(spec.dims)},
        )
        zarr.consolidate_metadata(str(tmp), zarr_format=_ZARR_FORMAT)
        try:
            os.rename(tmp, path)
        except OSError:
            if path.exists():  # another process (not holding the lock) made it first
                return False
            raise
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # some file systems cannot fsync a directory; the files themselves are synced
        pass


def _check_existing(path: Path, template: xr.Dataset, spec: VariableSpec, identity: dict) -> None:
    fix = "pass another `store=` path, or delete this one yourself if it is no longer needed"
    try:
        found = xr.open_zarr(path)
    except Exception as err:  # zarr/xarray raise many types for unreadable folders
        raise CaptureStoreError(
            f"store {path} exists but is not a readable Zarr store ({type(err).__name__}: {err}); "
            f"{fix}"
        ) from err
    written = found.attrs.get("dit_lens_store")
    if written in EARLIER_FORMATS:
        raise CaptureStoreError(
            f"store {path} was written in an earlier format ({written}, without chunk checksums) that this "
            f"dit-lens does not read; captures are recomputed, not converted: delete it (rm -r {path}) and run "
            f"the capture again, or pass another `store=` path. It was not modified."
        )
    if written != STORE_FORMAT:
        raise CaptureStoreError(f"store {path} is not a dit-lens capture store; {fix}")
    stored = found.attrs.get("identity", {})
    if stored != identity:
        diffs = [
            f"{key}: store has {_short(old)}, asked for {_short(new)}"
            for key, old, new in _differences(stored, identity)
        ]
        raise CaptureStoreError(
            f"store {path} holds an incompatible capture ({'; '.join(diffs)}); it was not "
            f"modified; {fix}"
        )
    problems = []
    if spec.name not in found or "done" not in found:
        problems.append(f"variables {spec.name!r} and 'done' expected, found {list(found)}")
    else:
        var = found[spec.name]
        if var.dims != spec.dims or var.shape != spec.shape:
            problems.append(
                f"{spec.name} is {var.dims} {var.shape}, expected {spec.dims} {spec.shape}"
            )
        if found["done"].shape != spec.shape[:2]:
            problems.append(f"done has shape {found['done'].shape}, expected {spec.shape[:2]}")
    for name, coord in template.coords.items():
        if name not in found.coords or not np.array_equal(found[name].values, coord.values):
            problems.append(f"coordinate {name!r} differs")
    if problems:
        raise CaptureStoreError(f"store {path} is corrupt ({'; '.join(problems)}); {fix}")


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for each leaf where two identities differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            diff
            for key in sorted(set(old) | set(new))
            for diff in _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
