"""Digests and safe readers for every artefact dit-lens writes: JSON records, arrays with their
attributes, and tensor files.

A digest covers data *and* attributes: a vector whose ``site`` attribute was edited, a trajectory
whose ``num_inference_steps`` changed, a record with one number altered, all fail it. Readers never
run code from a file: JSON is parsed as JSON, tensors come from safetensors or from torch's
weights-only loader. Every refusal names the file, what is wrong with it and what to do.

Examples:
    >>> import tempfile, numpy as np
    >>> path = Path(tempfile.mkdtemp()) / "cell.json"
    >>> _ = write_record(path, {"flip": 0.5})
    >>> read_record(path, what="study cell")["flip"]
    0.5
    >>> _ = path.write_text(path.read_text().replace("0.5", "0.9"))
    >>> read_record(path, what="study cell")
    Traceback (most recent call last):
    ...
    dit_lens.storage.records.DamagedError: study cell ... fails its digest (it changed after dit-lens wrote it); ...
    >>> digest({"site": "attn2"}, {"v": np.ones(3)}) == digest({"site": "ff"}, {"v": np.ones(3)})
    False
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .locks import write_atomic

__all__ = [
    "DIGEST",
    "DamagedError",
    "MissingError",
    "StorageError",
    "all_finite",
    "dataset_digest",
    "digest",
    "jsonable",
    "load_torch",
    "read_record",
    "read_tensors",
    "save_torch",
    "tree_digest",
    "write_record",
    "write_tensors",
]

#: The key (JSON records) or attribute (datasets) that holds an artefact's digest.
DIGEST = "digest"
_PREFIX = "blake2b:"


class StorageError(ValueError):
    """A stored artefact is not what was asked for; nothing was served from it, nothing was changed."""


class DamagedError(StorageError):
    """A stored artefact is unreadable, truncated, or fails its digest; it was not used."""


class MissingError(StorageError, FileNotFoundError):
    """A stored artefact (or a file it needs) is absent."""


def jsonable(value: Any) -> Any:
    """`value` as JSON keeps it: tuples become lists, numpy scalars and arrays Python numbers and lists,
    paths strings. Non-finite floats are kept (JSON's NaN/Infinity), and say so in a digest."""
    return json.loads(json.dumps(value, default=_default))


def _default(value: Any) -> Any:
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, default=_default, separators=(",", ":")).encode()


def digest(attrs: Mapping[str, Any], arrays: Mapping[str, Any] | None = None) -> str:
    """``"blake2b:<hex>"`` over `attrs` (canonical JSON, key order ignored) and each array's name,
    dtype, shape and bytes (in name order)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(_canonical({k: v for k, v in attrs.items() if k != DIGEST}))
    for name in sorted(arrays or {}):
        _update_array(h, name, arrays[name])
    return _PREFIX + h.hexdigest()


def _update_array(h: Any, name: str, value: Any) -> None:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    array = np.asarray(value)
    h.update(f"\0{name}:{array.dtype.str}:{array.shape}\0".encode())
    if array.dtype.kind in "OUS":
        h.update(_canonical(array.tolist()))
    else:
        h.update(memoryview(np.ascontiguousarray(array)).cast("B"))


def tree_digest(tree: Any) -> str:
    """A digest of nested dicts, lists and tuples of tensors, arrays and plain values (a checkpoint)."""
    arrays: dict[str, Any] = {}

    def walk(value: Any, at: str) -> Any:
        if isinstance(value, Mapping):
            return {str(k): walk(v, f"{at}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{at}/{i}") for i, v in enumerate(value)]
        if hasattr(value, "detach") or isinstance(value, np.ndarray):
            arrays[at] = value
            return f"<array {at}>"
        return value

    return digest({"tree": walk(tree, "")}, arrays)


def dataset_digest(obj: Any) -> str:
    """A digest of an xarray Dataset or DataArray: every variable's dims, values and attrs, and the
    object's own attrs (without its ``digest`` attribute)."""
    ds = obj.to_dataset(name=obj.name or "_") if hasattr(obj, "to_dataset") and not hasattr(obj, "data_vars") else obj
    meta = {"attrs": {k: v for k, v in obj.attrs.items() if k != DIGEST},
            "variables": {str(n): {"dims": list(v.dims), "attrs": dict(v.attrs)} for n, v in ds.variables.items()}}
    return digest(meta, {str(n): v.values for n, v in ds.variables.items()})


def write_record(path: str | Path, record: Mapping[str, Any], *, key: str = DIGEST) -> dict:
    """Write `record` as JSON with its digest under `key`, durably and atomically; returns what was written."""
    record = jsonable(dict(record))
    record.pop(key, None)
    record[key] = digest(record)
    write_atomic(Path(path), json.dumps(record, indent=1).encode())
    return record


def read_record(path: str | Path, *, what: str, fix: str = "", key: str = DIGEST, unsealed: bool = False) -> dict:
    """A JSON record written by `write_record`, checked against its digest (the digest key removed).

    Args:
        what: What the file is, for messages ("study cell", "fine-tune record").
        fix: What the user should do when it is refused.
        unsealed: Accept a record without a digest (files dit-lens never sealed, e.g. a library's config).

    Raises:
        MissingError: there is no file at `path`.
        DamagedError: it is not JSON, not an object, or fails its digest.
    """
    path = Path(path)
    fix = fix or "delete it and make it again"
    if not path.is_file():
        raise MissingError(f"{what} {path} does not exist; {fix}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else f"{type(err).__name__}: {err}"
        raise DamagedError(f"{what} {path} is unreadable or truncated ({reason}); {fix}") from None
    if not isinstance(record, dict):
        raise DamagedError(f"{what} {path} holds a JSON {type(record).__name__}, not the object dit-lens writes; {fix}")
    if key not in record:
        if unsealed:
            return record
        raise DamagedError(f"{what} {path} has no digest, so its content cannot be trusted; {fix}")
    stored = record.pop(key)
    if stored != digest(record):
        raise DamagedError(f"{what} {path} fails its digest (it changed after dit-lens wrote it); {fix}")
    return record


def write_tensors(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, Any]) -> str:
    """Write torch tensors as safetensors, with `metadata` (JSON) and a digest over both; atomic.
    Returns the digest."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = jsonable(dict(metadata))
    sealed = digest(meta, tensors)
    write_atomic(Path(path), save(tensors, metadata={"dit_lens": json.dumps(meta), DIGEST: sealed}))
    return sealed


def read_tensors(path: str | Path, *, what: str, fix: str = "") -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a file written by `write_tensors`, checked against its digest."""
    from safetensors.torch import load

    path = Path(path)
    fix = fix or "delete it and make it again"
    if not path.is_file():
        raise MissingError(f"{what} {path} does not exist; {fix}")
    try:
        data = path.read_bytes()
        tensors = load(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        info = header.get("__metadata__") or {}
        meta = json.loads(info["dit_lens"])
        stored = info[DIGEST]
    except Exception as err:  # safetensors, JSON and key errors of a truncated or foreign file
        raise DamagedError(f"{what} {path} is unreadable, truncated or not written by dit-lens "
                           f"({type(err).__name__}: {err}); {fix}") from None
    if stored != digest(meta, tensors):
        raise DamagedError(f"{what} {path} fails its digest (its tensors or settings changed after dit-lens "
                           f"wrote it); {fix}")
    return tensors, meta


def load_torch(path: str | Path, *, what: str, fix: str = "", sealed: bool = True) -> Any:
    """A ``torch.save`` file read with torch's weights-only loader (no code in it can run).

    With `sealed`, the file must hold ``{"state": ..., "digest": tree_digest(state)}`` (as
    `save_torch` writes it) and the digest must match; returns the state.
    """
    import torch

    path = Path(path)
    fix = fix or "delete it and make it again"
    if not path.is_file():
        raise MissingError(f"{what} {path} does not exist; {fix}")
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise DamagedError(f"{what} {path} holds objects other than tensors and plain values, which could run "
                           f"code; it was refused unread ({str(err).splitlines()[0]}); {fix}") from None
    except Exception as err:  # zip errors of a truncated file, EOF, ...
        raise DamagedError(f"{what} {path} is unreadable or truncated ({type(err).__name__}: {err}); {fix}") from None
    if not sealed:
        return data
    if not isinstance(data, dict) or set(data) != {"state", DIGEST}:
        raise DamagedError(f"{what} {path} is not a file dit-lens wrote (no digest); {fix}")
    if data[DIGEST] != tree_digest(data["state"]):
        raise DamagedError(f"{what} {path} fails its digest (it changed after dit-lens wrote it); {fix}")
    return data["state"]


def save_torch(path: str | Path, state: Any) -> str:
    """Write `state` (nested dicts/lists of tensors and plain values) for `load_torch`; atomic."""
    import torch

    buffer = io.BytesIO()
    sealed = tree_digest(state)
    torch.save({"state": state, DIGEST: sealed}, buffer)
    write_atomic(Path(path), buffer.getvalue())
    return sealed


def all_finite(tree: Any) -> bool:
    """Whether every float in a nested structure of tensors, arrays and numbers is finite."""
    if isinstance(tree, Mapping):
        return all(all_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(all_finite(v) for v in tree)
    if hasattr(tree, "detach"):
        return not tree.is_floating_point() or bool(tree.detach().isfinite().all())
    if isinstance(tree, np.ndarray):
        return tree.dtype.kind not in "fc" or bool(np.isfinite(tree).all())
    if isinstance(tree, float):
        return math.isfinite(tree)
    return True

