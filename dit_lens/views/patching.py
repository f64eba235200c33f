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

import html
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .encode import png_uri, write_page
from .figures import _pyplot, _wrap

__all__ = ["patching_figure", "write_patching_explorer"]

#: Effect colour map: blue where a patch moves the score away from the clean run's, red towards it.
CMAP = "RdBu_r"


def is_patching(result: Any) -> bool:
    """Whether `result` is a Dataset of `dit_lens.patching` (or of attribution patching)."""
    return isinstance(result, xr.Dataset) and {"effect", "metric_clean", "metric_corrupt"} <= set(result.data_vars)


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
    if not is_patching(result) or "seed" not in result["effect"].dims:
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


def write_patching_explorer(result: xr.Dataset, path: str | Path, *, max_seeds: int = 16) -> Path:
    """Write an interactive page of a patching result: a menu of the seed-mean effect and each seed's (and each
    head's, for a cell grid with heads), the effect as a step × layer heatmap (bars for a layer, step or window
    grid; heads × layers / steps with heads) whose hover gives the patched run's metric, beside the chosen
    seed's clean and corrupt images with their metric values. `dit_lens.write_explorer` hands a patching
    result here.

    Args:
        result: The Dataset of `dit_lens.patching`.
        path: The HTML file to write (parent folders are created).
        max_seeds: At most this many seeds get their own entry in the menu (the mean covers every seed).

    Returns:
        The path written.

    Raises:
        ValueError: `result` is not a patching result, or `max_seeds` is below 1.
    """
    figure = patching_explorer_figure(result, max_seeds=max_seeds)
    title = html.escape(_title(result, [], []))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head>"
            f"<body style='font-family: sans-serif'><h3 style='font-size: 14px'>{title}</h3>"
            f"{figure.to_html(full_html=False, include_plotlyjs=True, div_id='patching-explorer')}</body></html>")
    return write_page(path, page)


def patching_explorer_figure(result: xr.Dataset, *, max_seeds: int = 16) -> Any:
    """The plotly figure of `write_patching_explorer`: per menu entry, the clean and corrupt image of its seed
    (the first seed's for the mean) and the effect; one entry is shown at a time."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots


    if not is_patching(result) or "seed" not in result["effect"].dims:
        raise ValueError("write_patching_explorer draws the Dataset returned by dit_lens.patching; got "
                         f"{type(result).__name__}")
    if not isinstance(max_seeds, int) or isinstance(max_seeds, bool) or max_seeds < 1:
        raise ValueError(f"max_seeds must be a positive integer, got {max_seeds!r}")
    seeds = [int(s) for s in result["seed"].values]
    effect = result["effect"]
    dims = tuple(d for d in effect.dims if d != "seed")
    cells = dims[:2] == ("step", "layer")
    heads = [int(h) for h in result["head"].values] if "head" in dims and cells else [None]
    limit = float(np.nanmax(np.abs(effect.values))) if np.isfinite(effect.values).any() else 1.0
    limit = max(limit, 1e-12)
    entries = [(None, head) for head in heads] + [(seed, head) for seed in seeds[:max_seeds] for head in heads]
    fig = make_subplots(rows=1, cols=3, column_widths=[0.22, 0.22, 0.56],
                        subplot_titles=("clean", "corrupt", "effect (1: the clean run's score)"))
    images = {}
    for seed in dict.fromkeys(seed if seed is not None else seeds[0] for seed, _ in entries):
        images[seed] = len(fig.data)
        for col, kind in ((1, "clean"), (2, "corrupt")):
            value = float(result[f"metric_{kind}"].sel(seed=seed))
            fig.add_trace(go.Image(source=png_uri(result[f"image_{kind}"].sel(seed=seed).values) if f"image_{kind}" in
                                   result else None, name=f"{kind}, seed {seed}: metric {value:.4g}",
                                   hovertemplate=f"{kind}, seed {seed}: metric {value:.4g}<extra></extra>",
                                   visible=False), row=1, col=col)
    traces = []
    for seed, head in entries:
        values = effect.mean("seed", skipna=True) if seed is None else effect.sel(seed=seed)
        patched = None if seed is None else result["metric_patched"].sel(seed=seed)
        if head is not None:
            values = values.sel(head=head)
            patched = None if patched is None else patched.sel(head=head)
        traces.append(len(fig.data))
        fig.add_trace(_effect_trace(go, values, patched, dims, limit), row=1, col=3)
    buttons = []
    for k, (seed, head) in enumerate(entries):
        shown = {traces[k], images[seed if seed is not None else seeds[0]],
                 images[seed if seed is not None else seeds[0]] + 1}
        label = (f"mean of {len(seeds)} seeds" if seed is None else f"seed {seed}") + \
            ("" if head is None else f" · head {head}")
        buttons.append({"label": label, "method": "update", "args": [{"visible": [i in shown for i in
                                                                                  range(len(fig.data))]}]})
    for trace, visible in zip(fig.data, buttons[0]["args"][0]["visible"]):  # open on the first entry
        trace.visible = visible
    fig.update_layout(updatemenus=[{"buttons": buttons, "x": 0.0, "y": 1.18, "xanchor": "left"}], height=420,
                      width=1150, margin={"t": 90, "b": 10})
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    fig.update_yaxes(showticklabels=False, row=1, col=1)
    fig.update_xaxes(showticklabels=False, row=1, col=2)
    fig.update_yaxes(showticklabels=False, row=1, col=2)
    if cells or (len(dims) == 2 and "head" in dims):
        other = [d for d in dims if d not in ("step", "head")] if cells else [d for d in dims if d != "head"]
        fig.update_xaxes(title_text=other[0], row=1, col=3)
        fig.update_yaxes(title_text="step" if cells else "head", autorange="reversed", row=1, col=3)
    else:
        fig.update_xaxes(title_text=dims[0], row=1, col=3)
    return fig


def _effect_trace(go: Any, values: xr.DataArray, patched: xr.DataArray | None, dims: tuple, limit: float) -> Any:
    """A heatmap of a 2-D effect (steps or heads down, layers or the other dim across) or bars of a 1-D one."""
    other = [d for d in dims if d not in ("step", "head")]
    down = "step" if "step" in dims and "layer" in dims else ("head" if "head" in dims else None)
    if down is not None:
        across = other[0] if other else "step"
        values = values.transpose(down, across)
        custom = None if patched is None else patched.transpose(down, across).values
        hover = (f"{down} %{{y}}, {across} %{{x}}: effect %{{z:.4g}}" +
                 ("" if custom is None else ", patched metric %{customdata:.4g}") + "<extra></extra>")
        return go.Heatmap(z=values.values, x=[str(v) for v in values[across].values],
                          y=[str(v) for v in values[down].values], zmin=-limit, zmax=limit, colorscale="RdBu_r",
                          customdata=custom, hovertemplate=hover, visible=False, zmid=0)
    dim = dims[0]
    labels = [str(v) for v in values[dim].values]
    if dim == "window" and "layer_window" in values.coords:
        labels = [f"blocks {a}, steps {b}" for a, b in zip(values["layer_window"].values, values["step_window"].values)]
    custom = None if patched is None else patched.values
    hover = f"{dim} %{{x}}: effect %{{y:.4g}}" + ("" if custom is None else ", patched metric %{customdata:.4g}")
    return go.Bar(x=labels, y=values.values, customdata=custom, hovertemplate=hover + "<extra></extra>",
                  marker={"color": values.values, "colorscale": "RdBu_r", "cmin": -limit, "cmax": limit},
                  visible=False)
