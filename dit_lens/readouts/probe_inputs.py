"""What a probe reads: a capture store or Dataset, its variable, chosen layers and steps, and labels (one per
prompt, or image-token masks on the capture's token grid), each checked with a message that says what to pass.

Examples:
    >>> import numpy as np, xarray as xr
    >>> da = xr.DataArray(np.zeros((1, 2, 1, 1, 4, 3)), dims=("prompt", "seed", "step", "layer", "token", "channel"))
    >>> masks = np.zeros((1, 2, 8, 8), bool); masks[:, :, :4, :4] = True  # the top-left quarter
    >>> token_labels(masks, da, ["a polyp"], [0, 1], 0.5)[0, 0].tolist()
    [True, False, False, False]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import xarray as xr

from ..trace.store import check_finished, open_finished

__all__ = ["DIMS", "open_capture", "capture_variable", "pick", "item_labels", "token_grid", "token_labels"]

#: What a probe needs of a capture's variable, besides an optional ``token`` and ``branch``.
DIMS = ("prompt", "seed", "step", "layer", "channel")


def open_capture(source: Any) -> tuple[xr.Dataset, str | None]:
    """The capture a probe reads (a finished store's path, or a Dataset), without its ``done`` marks, and its path."""
    if isinstance(source, xr.Dataset):
        ds, where = source, None
        check_finished(ds)
    elif isinstance(source, (str, Path)):
        where = str(Path(source).expanduser())
        ds = open_finished(where, make="pass the path of a .zarr store dit_lens.capture made, or the Dataset it "
                                        "returned", foreign=True)
    else:
        raise ValueError(f"probe takes a capture store path or Dataset, got {type(source).__name__}")
    return (ds.drop_vars("done") if "done" in ds else ds), where


def capture_variable(ds: xr.Dataset, site: str | None, token_level: bool) -> tuple[xr.DataArray, str]:
    names = [str(v) for v in ds.data_vars]
    if site is None:
        if len(names) != 1:
            raise ValueError(f"the capture holds variables {names}; say which to probe with site=")
        site = names[0]
    if site not in ds:
        raise ValueError(f"the capture has no variable {site!r} (it has {names})")
    da = ds[site]
    if "branch" in da.dims:
        da = da.sel(branch="cond", drop=True)
    if "token_grid" in ds.attrs:
        da = da.assign_attrs(token_grid=ds.attrs["token_grid"])
    missing = [d for d in DIMS if d not in da.dims]
    if missing:
        raise ValueError(f"{site!r} has dims {da.dims}, without {missing}: a probe reads activations "
                         f"(prompt, seed, step, layer[, token], channel); capture a site such as 'attn2'")
    if token_level and "token" not in da.dims:
        raise ValueError(f"{site!r} holds no tokens (it was captured with reduce='mean'); a token-level probe "
                         f"needs every image token: capture with reduce=None")
    return da, site


def pick(da: xr.DataArray, dim: str, chosen: Iterable[int] | None) -> list[int]:
    held = [int(v) for v in da[dim].values]
    if chosen is None:
        return held
    if isinstance(chosen, (int, np.integer)):
        raise ValueError(f"{dim}s must be a list; pass {dim}s=[{chosen}]")
    chosen = [int(v) for v in chosen]
    absent = [v for v in chosen if v not in held]
    if absent or not chosen:
        raise ValueError(f"{dim}s {absent or chosen} are not in the capture, which holds {dim}s {held}")
    return chosen


def item_labels(labels: Any, prompts: list[str]) -> tuple[np.ndarray, list]:
    if labels is None:
        raise ValueError("an item-level probe needs labels=: {prompt: class}, or one class per prompt")
    if isinstance(labels, Mapping):
        missing = [p for p in prompts if p not in labels]
        extra = [str(p) for p in labels if str(p) not in prompts]
        if missing or extra:
            raise ValueError(f"labels do not match the capture's prompts: no label for {missing}; labels for prompts "
                             f"the capture does not hold: {extra}; label exactly the prompts {prompts}")
        values = [labels[p] for p in prompts]
    else:
        values = list(labels)
        if len(values) != len(prompts):
            raise ValueError(f"labels give {len(values)} classes for the capture's {len(prompts)} prompts {prompts}; "
                             f"give one per prompt, or a {{prompt: class}} mapping")
    classes = sorted(set(values), key=str)
    if len(classes) < 2:
        raise ValueError(f"labels hold one class only ({classes[0]!r}); a probe needs prompts of at least two classes")
    return np.array([classes.index(v) for v in values]), classes


def token_grid(da: xr.DataArray) -> tuple[int, int]:
    grid = da.attrs.get("token_grid")
    tokens = da.sizes["token"]
    if grid is None:
        side = int(round(np.sqrt(tokens)))
        if side * side != tokens:
            raise ValueError(f"the capture's {tokens} tokens form no square grid and its attrs name no token_grid")
        grid = (side, side)
    rows, cols = int(grid[0]), int(grid[1])
    if rows * cols != tokens:
        raise ValueError(f"token_grid {grid} does not hold the capture's {tokens} tokens")
    return rows, cols


def token_labels(masks: Any, da: xr.DataArray, prompts: list[str], seeds: list[int], threshold: float) -> np.ndarray:
    """``(prompt, seed, token)``: whether at least `threshold` of each token's pixels are in the mask."""
    if masks is None:
        raise ValueError("a token-level probe needs masks=: (prompt, seed, H, W) or (item, H, W) booleans")
    m = np.asarray(masks)
    rows, cols = token_grid(da)
    n_p, n_s = len(prompts), len(seeds)
    if m.ndim == 3 and m.shape[0] == n_p * n_s:
        m = m.reshape(n_p, n_s, *m.shape[1:])
    if m.ndim != 4 or m.shape[:2] != (n_p, n_s) or m.shape[2] % rows or m.shape[3] % cols:
        raise ValueError(f"masks have shape {np.asarray(masks).shape}; expected ({n_p}, {n_s}, H, W) or "
                         f"({n_p * n_s}, H, W) (one per run, prompt-major) with H, W multiples of the token grid "
                         f"{(rows, cols)}")
    if m.dtype != bool and not np.isin(m, (0, 1)).all():
        raise ValueError("masks must be booleans (or 0/1)")
    h, w = m.shape[2] // rows, m.shape[3] // cols
    share = m.astype(np.float64).reshape(n_p, n_s, rows, h, cols, w).mean(axis=(3, 5))
    return (share >= threshold).reshape(n_p, n_s, rows * cols)
