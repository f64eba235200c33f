"""Concept vectors on disk: dit-lens's sealed Zarr store and the MedSteer authors' pickle format.

`save_vector` / `load_vector` keep a vector with its provenance, sealed by a digest over values and
attributes; `export_authors` / `import_authors` write and read the authors' ``{step: {"blocks": [...]}}``
pickle, read back with a restricted unpickler (`SafeUnpickler`) so that a file cannot run code.
Computing vectors is `dit_lens.readouts.vectors`.

Examples:
    >>> import tempfile
    >>> import numpy as np, xarray as xr
    >>> vec = xr.DataArray(np.full((2, 3, 4), 0.5, np.float32), dims=("step", "layer", "channel"),
    ...                    coords={"step": [0, 1], "layer": [0, 1, 2]}, attrs={"site": "attn2"})
    >>> folder = Path(tempfile.mkdtemp())
    >>> back = load_vector(save_vector(vec, folder / "vector.zarr"))
    >>> bool((back == vec).all()), back.attrs["site"]
    (True, 'attn2')
    >>> authors = import_authors(export_authors(vec, folder / "vector.pkl"))
    >>> authors.sizes["layer"], authors.attrs["format"]
    (3, 'medsteer-authors-pickle')
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..storage import DIGEST, DamagedError, dataset_digest, remove_stale_temporaries, temporary_name
from ..validate import VECTOR_DIMS, check_vector

__all__ = ["save_vector", "load_vector", "export_authors", "import_authors", "SafeUnpickler"]


def save_vector(vec: xr.DataArray, path: str | Path) -> Path:
    """Write a vector (values and provenance) as a Zarr store, sealed; refuses to overwrite.

    The store's ``digest`` attribute covers the values, coordinates and every attribute (``site``,
    prompts, settings: `dit_lens.storage.dataset_digest`), and every chunk carries a CRC-32 checksum
    (numcodecs' ``crc32`` filter); `load_vector` checks both. The store is built beside `path` and
    renamed into place, so `path` never holds half a vector.
    """
    from numcodecs import CRC32

    vec = check_vector(vec)
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{path} exists; choose a new path or delete it first")
    ds = vec.to_dataset(name="concept_vector")
    ds.attrs = {DIGEST: dataset_digest(ds)}
    encoding = {name: {"filters": [CRC32()]} for name in ds.variables}
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    building = temporary_name(path)
    try:
        ds.to_zarr(building, mode="w-", zarr_format=2, encoding=encoding)
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{path} exists; choose a new path or delete it first")
        os.rename(building, path)
    finally:
        if building.exists():
            shutil.rmtree(building)
    return path


def load_vector(path: str | Path) -> xr.DataArray:
    """Read a vector written by `save_vector`, checked against its digest (values and attributes).

    A vector that fails its digest (an edited ``site``, other values), is not unit-norm (within
    ``UNIT_NORM_TOLERANCE``) or holds NaN is refused. A store saved before vectors were sealed loads
    with an `UnverifiedWarning`: its attributes cannot be verified.
    """
    from ..interventions.base import UnverifiedWarning

    path = Path(path)
    fix = "recompute it with concept_vector and save it again"
    if not path.exists():
        raise FileNotFoundError(f"no concept vector at {path}")
    try:
        ds = xr.open_zarr(path).load()
        if "concept_vector" not in ds:
            raise ValueError(f"{path} is not a dit-lens concept vector store")
    except (RuntimeError, OSError, KeyError) as err:  # a checksum mismatch, a damaged or missing chunk
        raise DamagedError(f"the concept vector at {path} is damaged ({type(err).__name__}: {err}); {fix}") from err
    sealed = ds.attrs.get(DIGEST)
    if sealed is not None and sealed != dataset_digest(ds):
        raise DamagedError(f"the concept vector at {path} is damaged: it fails its digest (its values or attributes, "
                           f"such as site={ds['concept_vector'].attrs.get('site')!r}, changed after save_vector "
                           f"wrote it); {fix}")
    vec = check_vector(ds["concept_vector"])
    if sealed is None:
        warnings.warn(f"the concept vector at {path} was saved by an older dit-lens without a digest over its "
                      f"attributes, so they (site, prompts, settings) cannot be verified; check them and save it "
                      f"again to protect it", UnverifiedWarning, stacklevel=2)
    return vec


def export_authors(vec: xr.DataArray, path: str | Path) -> Path:
    """Write the MedSteer authors' format: a pickle of ``{step: {"blocks": [tensor per block]}}``.

    Every block of the model must be present in the vector (the authors index blocks by position).
    Refuses to overwrite an existing file.
    """
    import torch

    vec = check_vector(vec)
    layers = [int(x) for x in vec["layer"].values]
    if layers != list(range(len(layers))):
        raise ValueError(
            f"the authors' format lists every block from 0; this vector has layers {layers}"
        )
    table = {
        int(step): {"blocks": [torch.from_numpy(vec.sel(step=step, layer=l).values.copy()) for l in layers]}
        for step in vec["step"].values
    }
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; choose a new path or delete it first")
    with path.open("xb") as fh:
        pickle.dump(table, fh)
    return path


def import_authors(path: str | Path) -> xr.DataArray:
    """Read the authors' pickle format into a ``(step, layer, channel)`` vector.

    The file is read with a restricted unpickler (`SafeUnpickler`) that rebuilds only containers,
    numbers, strings, numpy arrays and torch tensors; a pickle that names anything else (a function
    that could run code) is refused with `pickle.UnpicklingError` before anything in it runs.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such vector file: {path}")
    with path.open("rb") as fh:
        try:
            table = SafeUnpickler(fh).load()
        except pickle.UnpicklingError as err:
            raise pickle.UnpicklingError(f"{path}: {err}") from None
        except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as err:
            raise ValueError(f"{path} is not a readable pickle ({type(err).__name__}: {err})") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path} is not in the authors' format {{step: {{'blocks': [vector per block]}}}}: "
                         f"it holds a {type(table).__name__}")
    try:
        steps = sorted(int(s) for s in table)
        rows = [[np.asarray(_numpy(b), dtype=np.float32).reshape(-1) for b in table[s]["blocks"]] for s in _keys(table, steps)]
        values = np.stack([np.stack(r) for r in rows])  # (step, layer, channel)
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise ValueError(
            f"{path} is not in the authors' format {{step: {{'blocks': [vector per block]}}}}: {err}"
        ) from err
    vec = xr.DataArray(
        values,
        dims=VECTOR_DIMS,
        coords={"step": steps, "layer": np.arange(values.shape[1])},
        name="concept_vector",
        attrs={"imported_from": str(path), "format": "medsteer-authors-pickle"},
    )
    return check_vector(vec)


def _storage_from_bytes(data: bytes) -> Any:
    """A torch storage pickled inside a tensor, read with torch's weights-only loader (no code runs)."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _allowed() -> dict[tuple[str, str], Any]:
    """``(module, name)`` → what `SafeUnpickler` builds for it: containers, numpy arrays, torch tensors."""
    import collections
    import codecs

    import torch

    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): codecs.encode,  # numpy's protocol-2 pickles carry raw bytes as latin-1 text
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,  # torch's own runs a full unpickler
    }
    for core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x spellings
        table[(f"{core}.multiarray", "_reconstruct")] = np.ndarray.__reduce__(np.zeros(0))[0]
        table[(f"{core}.multiarray", "scalar")] = np.float32(0).__reduce__()[0]
        table[(f"{core}.numeric", "_frombuffer")] = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5
    for dtype in ("Float", "Double", "Half", "BFloat16"):
        table[("torch", f"{dtype}Storage")] = getattr(torch, f"{dtype}Storage")
    return table


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds only what a vector file holds; any other global is refused.

    Plain containers (dict, list, tuple), numbers and strings need no globals; numpy arrays and torch
    tensors need the few rebuild functions in `_allowed`. A pickle naming anything else, such as
    ``os.system`` or ``builtins.eval``, raises `pickle.UnpicklingError` before it can run.
    """

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refused to unpickle {module}.{name}: a vector file holds only containers, numbers, numpy "
                f"arrays and torch tensors, and anything else could run code; if you trust this file, load it "
                f"yourself and pass the vector to dit_lens.readouts.vector_files.save_vector"
            )
        return allowed[(module, name)]


def _keys(table: dict, steps: list[int]) -> list:
    by_int = {int(k): k for k in table}
    return [by_int[s] for s in steps]


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().float().cpu().numpy()
    return np.asarray(value)
