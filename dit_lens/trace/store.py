"""Zarr stores for captures: content-addressed, self-describing, resumable, never overwritten.

A capture store is a Zarr (format 2) group that plain ``xarray.open_zarr`` opens. Besides the data
variable (named after the site) it holds ``done`` ``(prompt, seed)``, the cells already complete,
and in its attrs the provenance of the capture and the *identity* (model fingerprint, prompts,
seeds, every setting, package version) it was made for. Opening a store for a capture with another
identity is an error: a store is filled cell by cell, resumed after a crash, and never overwritten
or deleted by dit-lens.

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
    >>> store.missing()
    [(0, 0)]
    >>> xr.open_zarr(path).attn2.values[0, 1].tolist()
    [1.0, 2.0]
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import xarray as xr
import zarr

__all__ = [
    "CACHE_ENV",
    "CaptureStore",
    "CaptureStoreError",
    "VariableSpec",
    "cache_root",
    "content_key",
]

#: Environment variable that overrides where content-addressed entries live.
CACHE_ENV = "DIT_LENS_CACHE"
#: Written into every store's attrs; a store without it is not a dit-lens capture.
STORE_FORMAT = "dit-lens.capture/1"
_ZARR_FORMAT = 2  # format 3 warns on string coordinates and consolidated metadata (zarr 3.1)


class CaptureStoreError(ValueError):
    """A store path holds something other than the capture asked for (or is unreadable)."""


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


def cache_root() -> Path:
    """Root of the content-addressed cache: ``$DIT_LENS_CACHE``, else ``cache/`` in the source
    tree (when dit-lens runs from a checkout), else ``~/.cache/dit-lens``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / "cache"
    return Path.home() / ".cache" / "dit-lens"


def content_key(identity: Mapping[str, Any]) -> str:
    """Stable hash of a JSON-able mapping (key order does not matter)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class CaptureStore:
    """An open capture store. Make one with `CaptureStore.open`."""

    def __init__(self, path: Path, spec: VariableSpec) -> None:
        self.path = path
        self.spec = spec
        group = zarr.open_group(str(path), mode="r+", zarr_format=_ZARR_FORMAT)
        self._data = group[spec.name]
        self._done = group["done"]
        try:
            self._done_cells = np.asarray(self._done[...], dtype=bool)
        except Exception as err:  # a chunk that does not decode
            raise CaptureStoreError(
                f"store {path} is corrupt (its 'done' record is unreadable: {err}); pass another "
                f"`store=` path, or delete this one yourself"
            ) from err

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
        identity = _plain(identity)
        if path.exists():
            _check_existing(path, template, spec, identity)
        else:
            _create(path, template, spec, identity, dict(attrs))
        return cls(path, spec)

    def missing(self) -> list[tuple[int, int]]:
        """``(prompt index, seed index)`` of the cells not yet complete, prompt-major."""
        return [(int(i), int(j)) for i, j in np.argwhere(~self._done_cells)]

    def write(self, cell: tuple[int, int], values: np.ndarray, *, at: tuple[int, ...] = ()) -> None:
        """Write `values` into `cell` (optionally at leading indices `at` within the cell)."""
        self._data[(*cell, *at)] = values

    def mark_done(self, cells: Iterable[tuple[int, int]]) -> None:
        """Record `cells` as complete (call only after their values are written)."""
        for i, j in cells:
            self._done_cells[i, j] = True
        self._done[...] = self._done_cells  # one chunk, written atomically by zarr's LocalStore

    def dataset(self) -> xr.Dataset:
        """The store as a lazily loaded Dataset (without the ``done`` bookkeeping variable)."""
        return xr.open_zarr(self.path).drop_vars("done")


def _create(
    path: Path, template: xr.Dataset, spec: VariableSpec, identity: dict, attrs: dict
) -> None:
    """Build the store beside `path` and move it into place, so `path` is never half-made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        skeleton = template.copy()
        skeleton["done"] = (("prompt", "seed"), np.zeros(spec.shape[:2], dtype=bool))
        skeleton["done"].encoding["chunks"] = spec.shape[:2]  # one chunk: atomic updates
        skeleton.attrs = {**attrs, "dit_lens_store": STORE_FORMAT, "identity": identity}
        skeleton.to_zarr(tmp, mode="w-", zarr_format=_ZARR_FORMAT, consolidated=False)
        group = zarr.open_group(str(tmp), mode="r+", zarr_format=_ZARR_FORMAT)
        group.create_array(
            spec.name,
            shape=spec.shape,
            chunks=spec.chunks,
            dtype="float32",
            fill_value=np.nan,
            attributes={"_ARRAY_DIMENSIONS": list(spec.dims)},
        )
        zarr.consolidate_metadata(str(tmp), zarr_format=_ZARR_FORMAT)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_existing(path: Path, template: xr.Dataset, spec: VariableSpec, identity: dict) -> None:
    fix = "pass another `store=` path, or delete this one yourself if it is no longer needed"
    try:
        found = xr.open_zarr(path)
    except Exception as err:  # zarr/xarray raise many types for unreadable folders
        raise CaptureStoreError(
            f"store {path} exists but is not a readable Zarr store ({type(err).__name__}: {err}); "
            f"{fix}"
        ) from err
    if found.attrs.get("dit_lens_store") != STORE_FORMAT:
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


def _plain(value: Any) -> Any:
    """`value` as it reads back from JSON attrs (tuples -> lists, non-finite floats -> str)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return _plain(value.item())
    return str(value)


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
