"""The figure of an activation-patching result: where and when a site carries what the clean prompt makes.

`patching_figure` takes the Dataset of `dit_lens.patching` (any grid, with or without heads, exact or
attribution) and draws the effect averaged over seeds on one diverging colour scale centred on 0: a
step × layer heatmap for a cell grid (one per head when it has heads), per-layer, per-step or per-window
bars with every seed's value for the other grids (a heads × layers / steps heatmap when it has heads),
beside the clean and the corrupt image of one seed with their metric values. The title says what was
patched, in which direction, with which metric, method and how many seeds.

Examples:
    >>> import numpy as np, xarray as xr
    >>> effect = xr.DataArray(np.array([[[0.0, 1.0], [0.5, -0.25]]]), dims=("seed", "step", "layer"),
    ...                       coords={"seed": [0], "step": [0, 1], "layer": [0, 1]})
    >>> ds = xr.Dataset({"effect": effect, "metric_clean": ("seed", [1.0]), "metric_corrupt": ("seed", [0.0]),
    ...                  "image_clean": (("seed", "y", "x", "rgb"), np.ones((1, 4, 4, 3), np.float32)),
    ...                  "image_corrupt": (("seed", "y", "x", "rgb"), np.zeros((1, 4, 4, 3), np.float32))},
    ...                 attrs={"site": "attn2", "direction": "denoise", "metric": "brightness", "method": "exact",
    ...                        "clean": "a red polyp", "corrupt": "a pale mucosa", "num_inference_steps": 2})
    >>> fig = patching_figure(ds)
    >>> [ax.get_title() for ax in fig.axes[:3]]
    ['clean (seed 0)\\nmetric 1', 'corrupt (seed 0)\\nmetric 0', 'effect: mean of 1 seed']
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from .figures import _pyplot, _wrap

__all__ = ["patching_figure"]

#: Effect colour map: blue where a patch moves the score away from the clean run's, red towards it.
CMAP = "RdBu_r"


def patching_figure(result: xr.Dataset, *, seed: int | None = None, max_heads: int = 8) -> Any:
    """Draw a patching result (see the module docs); returns the matplotlib Figure.

    Args:
        result: The Dataset of `dit_lens.patching`.
        seed: The seed whose clean and corrupt images are drawn (default: the first); the effect is the
            mean over every seed of the result.
        max_heads: At most this many heads' heatmaps for a cell grid with heads (evenly spaced; the title
            says which).

    Raises:
        ValueError: `result` is not a patching result, or `seed` is not one of its seeds.
    """
    if not isinstance(result, xr.Dataset) or "effect" not in result or "seed" not in result["effect"].dims:
        raise ValueError("patching_figure draws the Dataset returned by dit_lens.patching (with an 'effect' of dims "
                         f"(seed, ...)); got {type(result).__name__}")
    seeds = [int(s) for s in result["seed"].values]
    seed = seeds[0] if seed is None else seed
    if seed not in seeds:
        raise ValueError(f"seed {seed!r} is not among the result's seeds {seeds}")
    effect = result["effect"].mean("seed", skipna=True)
    n = len(seeds)
    plt = _pyplot()
    dims = tuple(d for d in result["effect"].dims if d != "seed")
    heads = [int(h) for h in result["head"].values] if "head" in dims else []
    shown = _spread(heads, max_heads) if dims[:2] == ("step", "layer") and heads else []
    panels = max(1, len(shown))
    fig = plt.figure(figsize=(3.2 * (2 + min(panels, 4)), 3.6 * (1 + (panels - 1) // 4)), layout="constrained")
    grid = fig.add_gridspec(1 + (panels - 1) // 4, 2 + min(panels, 4))
    for col, (kind, name) in enumerate((("clean", "clean"), ("corrupt", "corrupt"))):
        ax = fig.add_subplot(grid[0, col])
        if f"image_{kind}" in result:
            ax.imshow(np.clip(result[f"image_{kind}"].sel(seed=seed).values, 0, 1))
        value = float(result[f"metric_{kind}"].sel(seed=seed))
        ax.set_title(f"{name} (seed {seed})\nmetric {value:.4g}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    limit = float(np.nanmax(np.abs(effect.values))) if np.isfinite(effect.values).any() else 1.0
    limit = max(limit, 1e-12)
    what = f"effect: mean of {n} seed{'s' if n != 1 else ''}"
    if dims[:2] == ("step", "layer"):
        image = None
        for i, head in enumerate(shown or [None]):
            ax = fig.add_subplot(grid[i // 4, 2 + i % 4])
            values = effect if head is None else effect.sel(head=head)
            image = _heatmap(ax, values.transpose("step", "layer"), "layer", "step", limit)
            ax.set_title(what if head is None else f"head {head}", fontsize=9)
        fig.colorbar(image, ax=fig.axes[2:], shrink=0.8, label="effect (1: the clean run's score)")
    elif heads:  # (layer | step | window, head)
        ax = fig.add_subplot(grid[0, 2:])
        other = next(d for d in dims if d != "head")
        image = _heatmap(ax, effect.transpose("head", other), other, "head", limit)
        ax.set_title(what, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8, label="effect (1: the clean run's score)")
    else:
        ax = fig.add_subplot(grid[0, 2:])
        _bars(ax, result["effect"], dims[0], limit)
        ax.set_title(what + " (dots: each seed)", fontsize=9)
    fig.suptitle(_wrap(_title(result, heads, shown), 110), fontsize=10)
    return fig


def _heatmap(ax: Any, values: xr.DataArray, x: str, y: str, limit: float) -> Any:
    image = ax.imshow(values.values, cmap=CMAP, vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    _ticks(ax.set_xticks, ax.set_xticklabels, [str(v) for v in values[x].values])
    _ticks(ax.set_yticks, ax.set_yticklabels, [str(v) for v in values[y].values])
    return image


def _bars(ax: Any, effect: xr.DataArray, dim: str, limit: float) -> None:
    values = effect.transpose("seed", dim).values  # (seeds, k)
    labels = [str(v) for v in effect[dim].values]
    if dim == "window" and "layer_window" in effect.coords:
        labels = [f"blocks {a}\nsteps {b}" for a, b in zip(effect["layer_window"].values, effect["step_window"].values)]
    x = np.arange(values.shape[1])
    mean = np.nanmean(values, axis=0) if np.isfinite(values).any() else np.full(values.shape[1], np.nan)
    colours = _pyplot().get_cmap(CMAP)((np.nan_to_num(mean) / limit + 1) / 2)
    ax.bar(x, mean, color=colours, edgecolor="black", linewidth=0.5)
    for row in values:
        ax.plot(x, row, "k.", markersize=3, alpha=0.6)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.axhline(1, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel(dim)
    ax.set_ylabel("effect (1: the clean run's score)")
    _ticks(ax.set_xticks, ax.set_xticklabels, labels)


def _ticks(set_ticks: Any, set_labels: Any, labels: list[str], most: int = 16) -> None:
    index = _spread(list(range(len(labels))), most)
    set_ticks(index)
    set_labels([labels[i] for i in index], fontsize=7)


def _spread(values: list[int], most: int) -> list[int]:
    if len(values) <= most:
        return list(values)
    picks = np.unique(np.linspace(0, len(values) - 1, most).round().astype(int))
    return [values[i] for i in picks]


def _title(result: xr.Dataset, heads: list[int], shown: list[int]) -> str:
    a = result.attrs
    direction = {"denoise": "clean activation into the corrupt run",
                 "noise": "corrupt activation into the clean run"}.get(a.get("direction"), str(a.get("direction")))
    parts = [f"patching {a.get('site', '?')}{' per head' if heads else ''}: {direction}",
             f"clean {a.get('clean', '?')!r} vs corrupt {a.get('corrupt', '?')!r}",
             f"metric {a.get('metric', '?')}", f"method {a.get('method', 'exact')}",
             f"{a.get('num_inference_steps', '?')} steps"]
    if shown and len(shown) < len(heads):
        parts.append(f"heads {', '.join(map(str, shown))} of {len(heads)}")
    return "; ".join(parts)
