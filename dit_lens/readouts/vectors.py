"""Concept ("pathology") vectors: normalised mean differences of captured activations.

v(l, t) = normalize(mean⁺(l, t) − mean⁻(l, t)), one unit vector per (layer, step), where mean± is
the capture of the positive / negative prompts averaged over prompts and seeds (the capture itself
already averages over image tokens of the conditional half of the guidance batch). Vectors on disk
(dit-lens's sealed store, the MedSteer authors' pickle format) are `dit_lens.readouts.vector_files`.

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

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import xarray as xr

from ..validate import VECTOR_DIMS, NonFiniteError
# Kept importable from here, where the package's face and earlier code find them.

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["concept_vector", "normalize_vector"]


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
