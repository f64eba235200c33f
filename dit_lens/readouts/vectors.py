"""Concept ("pathology") vectors: normalised mean differences of captured activations.

v(l, t) = normalize(mean⁺(l, t) − mean⁻(l, t)), one unit vector per (layer, step), where mean± is
the capture of the positive / negative prompts averaged over prompts and seeds (the capture itself
already averages over image tokens of the conditional half of the guidance batch).

Examples:
    >>> import numpy as np, xarray as xr
    >>> dims = ("prompt", "seed", "step", "layer", "channel")
    >>> pos = xr.Dataset({"attn2": (dims, np.ones((1, 2, 3, 4, 5)))})
    >>> neg = xr.Dataset({"attn2": (dims, np.zeros((1, 2, 3, 4, 5)))})
    >>> vec = concept_vector(pos, neg)
    >>> vec.dims, round(float(vec.sel(step=0, layer=0).sum()), 4)  # 5 equal channels: 5 / sqrt(5)
    (('step', 'layer', 'channel'), 2.2361)
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import xarray as xr

from ..storage import DIGEST, DamagedError, dataset_digest, remove_stale_temporaries, temporary_name
from ..validate import VECTOR_DIMS, NonFiniteError, check_vector

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["concept_vector", "save_vector", "load_vector", "export_authors", "import_authors", "normalize_vector"]



def concept_vector(
    source: Any,
    other: Any = None,
    /,
    *,
    positive: Sequence[str] | None = None,
    negative: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.5,
    site: str = "attn2",
    batch_size: int | None = None,
) -> xr.DataArray:
    """A unit concept vector per (step, layer), from two captures or by capturing them.

    Call it either on two captures, ``concept_vector(ds_pos, ds_neg)``, or on a lens with the
    contrastive prompts, ``concept_vector(lens, positive=[...], negative=[...], seeds=[...])``;
    the second form runs `dit_lens.trace.capture` (reusing its store) and then the first.

    Args:
        source: A capture Dataset (``reduce="mean"``) of the prompts with the concept, or a Lens.
        other: The capture of the prompts without the concept (first form only).
        positive: Prompts with the concept (lens form).
        negative: Prompts without it, otherwise identical (lens form).
        seeds: Seeds per prompt (lens form).
        num_inference_steps: Denoising steps T (lens form).
        guidance_scale: Classifier-free guidance (lens form).
        site: Which captured variable to use.
        batch_size: Passed to `capture` (lens form).

    Returns:
        DataArray ``(step, layer, channel)`` of unit L2 norm over channel, with provenance attrs.

    Raises:
        ValueError: the captures do not match, hold no mean capture, or give a zero difference.
    """
    if isinstance(source, xr.Dataset):
        if positive is not None or negative is not None:
            raise TypeError("concept_vector(ds_pos, ds_neg) takes no positive=/negative= prompts")
        ds_pos, ds_neg = source, other
        if not isinstance(ds_neg, xr.Dataset):
            raise TypeError("concept_vector(ds_pos, ds_neg): ds_neg must be a capture Dataset too")
    else:
        if other is not None:
            raise TypeError("concept_vector(lens, ...) takes the prompts as positive=/negative=")
        if not positive or not negative or not seeds:
            raise ValueError(
                "concept_vector(lens, ...) needs non-empty positive=[...], negative=[...] and "
                "seeds=[...]"
            )
        from ..trace.capture import capture

        _check_kept_tokens(source, list(positive), list(negative))
        settings = dict(
            seeds=list(seeds), num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, site=site, branch="cond", reduce="mean",
            batch_size=batch_size,
        )
        ds_pos = capture(source, list(positive), **settings, label=f"capture {site} (positive prompts)")
        ds_neg = capture(source, list(negative), **settings, label=f"capture {site} (negative prompts)")
    mean_pos = _mean_capture(ds_pos, site, "positive")
    mean_neg = _mean_capture(ds_neg, site, "negative")
    for dim in VECTOR_DIMS:
        if not np.array_equal(mean_pos[dim].values, mean_neg[dim].values):
            raise ValueError(
                f"the positive and negative captures differ along {dim!r}; capture both with the "
                f"same layers, steps and model"
            )
    diff = mean_pos - mean_neg  # (step, layer, channel)
    norm = np.sqrt((diff**2).sum("channel"))
    if bool((norm == 0).any()):
        raise ValueError(
            "the positive and negative captures give a zero difference at some (step, layer); use prompts "
            "that differ in the concept"
        )
    vec = (diff / norm).astype(np.float32).transpose(*VECTOR_DIMS)
    vec.name = "concept_vector"
    vec.attrs = _provenance(ds_pos, ds_neg, site)
    return vec


def _check_kept_tokens(lens: Lens, positive: list[str], negative: list[str]) -> None:
    """Refuse prompts that differ only in tokens past the pipeline's token limit: the model sees them as equal."""
    from ..model.tokens import prompt_text, text_segments

    def kept(prompt: str) -> tuple:
        text = prompt_text(lens, prompt)
        return tuple(tuple(tokenizer(text, truncation=True, max_length=length)["input_ids"])
                     for tokenizer, _, length in text_segments(lens) if tokenizer is not None)

    try:
        same = sorted(map(kept, positive)) == sorted(map(kept, negative))
        limit = max(length for tokenizer, _, length in text_segments(lens) if tokenizer is not None)
    except (ValueError, TypeError, AttributeError):  # no tokenizer to ask: the zero difference will say it
        return
    if same and sorted(positive) != sorted(negative):
        raise ValueError(
            f"the positive and negative prompts differ only after the first {limit} tokens, which is all the "
            f"model keeps (its tokenizer truncates the rest, max_sequence_length={limit}), so they give the same "
            f"activations; put the words that differ within the first {limit} tokens (shorten the prompts)"
        )


def _mean_capture(ds: xr.Dataset, site: str, which: str) -> xr.DataArray:
    if site not in ds:
        raise ValueError(f"the {which} capture has no variable {site!r} (has {list(ds.data_vars)})")
    da = ds[site]
    if "token" in da.dims:
        da = da.mean("token")
    if "branch" in da.dims:
        if "cond" not in da["branch"].values:
            raise ValueError(f"the {which} capture has no conditional branch; capture branch='cond'")
        da = da.sel(branch="cond", drop=True)
    missing = set(VECTOR_DIMS) - set(da.dims)
    if missing:
        raise ValueError(f"the {which} capture lacks dims {sorted(missing)}; got {da.dims}")
    if not bool(np.isfinite(da.values).all()):  # xarray's means would skip NaN silently
        raise NonFiniteError(
            f"the {which} capture holds NaN or inf values (guidance_scale={_setting(ds, 'guidance_scale')}), so it "
            f"gives no direction; lower guidance_scale, or check the model's weights and dtype"
        )
    keep = [d for d in ("prompt", "seed") if d in da.dims]
    return da.mean(keep).transpose(*VECTOR_DIMS).astype(np.float64)


#: Capture settings a vector keeps in its provenance (capture attrs ``capture_<name>``).
SAMPLER_SETTINGS = ("num_inference_steps", "guidance_scale")


def _provenance(positive: xr.Dataset, negative: xr.Dataset, site: str) -> dict:
    from ..version import __version__

    attrs: dict = {"site": site, "dit_lens_version": __version__}
    for which, ds in (("positive", positive), ("negative", negative)):
        attrs[f"{which}_prompts"] = [str(p) for p in np.atleast_1d(ds.get("prompt", []))]
        if "seed" in ds.coords:
            attrs[f"{which}_seeds"] = [int(s) for s in ds["seed"].values]
    for key in ("model_fingerprint", "model_source"):
        if key in positive.attrs:
            attrs[key] = positive.attrs[key]
    for key in SAMPLER_SETTINGS:
        values = [_setting(ds, key) for ds in (positive, negative)]
        if None not in values and values[0] != values[1]:
            raise ValueError(
                f"the positive and negative captures were made with different {key} ({values[0]} and "
                f"{values[1]}); capture both with the same settings"
            )
        if values[0] is not None:
            attrs[key] = values[0]
    return attrs


def _setting(ds: xr.Dataset, key: str) -> Any:
    """A capture setting from a capture's attrs (``capture_<key>``; bare ``<key>`` in older ones)."""
    for name in (f"capture_{key}", key):
        if name in ds.attrs:
            value = ds.attrs[name]
            return value.item() if hasattr(value, "item") else value
    return None


def normalize_vector(vec: xr.DataArray) -> xr.DataArray:
    """`vec` ``(step, layer, channel)`` scaled to unit L2 norm over channels (attrs kept).

    For vectors from elsewhere that are not unit-norm; `Steer`, `load_vector` and `import_authors`
    refuse those, since α is only meaningful along a unit direction.
    """
    norm = np.sqrt((vec.astype(np.float64) ** 2).sum("channel"))
    if bool((norm == 0).any()) or not bool(np.isfinite(norm).all()):
        raise ValueError("the vector has a zero or non-finite norm at some (step, layer); it has no direction there")
    out = (vec / norm).astype(np.float32)
    out.attrs = dict(vec.attrs)
    out.name = vec.name
    return out


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
                f"yourself and pass the vector to dit_lens.readouts.vectors.save_vector"
            )
        return allowed[(module, name)]


def _keys(table: dict, steps: list[int]) -> list:
    by_int = {int(k): k for k in table}
    return [by_int[s] for s in steps]


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().float().cpu().numpy()
    return np.asarray(value)
