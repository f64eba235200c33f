"""The summary figure of a study result: each metric against each swept axis, with 95% intervals.

A study result has a ``method`` dim beside each method's axes; a method's cells repeat along the
axes it does not have (``attrs["method_axes"]``), so it draws as a flat line there, or once in the
trade-off figure.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import xarray as xr

from ..trace.attrs import read
from .figures import _pyplot

__all__ = ["study_figure", "tradeoff_figure"]

_HIDDEN = ("bg_lpips",)


def _metrics(result: xr.Dataset) -> list[str]:
    """The metrics to draw: every measured one with values, but a method's extras (a vector's stability)."""
    names = read(result.attrs, "metrics") if "metrics" in result.attrs else [
        v for v in result.data_vars if f"{v}_low" in result]
    hidden = (*_HIDDEN, *read(result.attrs, "extras", []))
    return [m for m in names if m not in hidden and bool(np.isfinite(result[m]).any())]


def _own_axes(result: xr.Dataset) -> dict[str, list[str]]:
    if "method_axes" in result.attrs:
        return read(result.attrs, "method_axes")
    return {str(m): [d for d in result["flip_rate"].dims if d not in ("method", "pair")]
            for m in (result["method"].values if "method" in result.dims else ["medsteer"])}


def study_figure(result: xr.Dataset) -> Any:
    """Metrics (columns) against the swept axis; one line per combination of the other axes.

    With no swept axis (a table study), a bar per pair and method instead; with several swept axes,
    the trade-off each pair's settings make (`tradeoff_figure`).
    """
    plt = _pyplot()
    metrics = _metrics(result)
    dims = list(result["flip_rate"].dims)
    swept = [d for d in dims if result.sizes[d] > 1 and d not in ("pair", "method")]
    if len(swept) > 1:
        return tradeoff_figure(result)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics), 3.0), squeeze=False)
    axes = axes[0]
    if swept:
        axis = swept[0]
        others = [d for d in dims if d != axis and result.sizes[d] > 1]
        x = np.arange(result.sizes[axis])
        for combo in itertools.product(*(range(result.sizes[d]) for d in others)):
            sel = dict(zip(others, combo))
            label = ", ".join(f"{d}={result[d].values[i]}" for d, i in sel.items())
            for ax, m in zip(axes, metrics):
                row = result.isel(sel)
                rest = {d: 0 for d in row[m].dims if d != axis}
                y, lo, hi = (row[k].isel(rest).values for k in (m, f"{m}_low", f"{m}_high"))
                ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", capsize=3, label=label or None)
        for ax, m in zip(axes, metrics):
            ax.set_xticks(x, [str(v) for v in result[axis].values], rotation=30)
            ax.set_xlabel(axis)
            ax.set_title(m, fontsize=9)
        if others:
            axes[0].legend(fontsize=6)
    else:
        labels, rows = [], []
        for idx in itertools.product(*(range(result.sizes[d]) for d in dims)):
            row = result.isel(dict(zip(dims, idx)))
            if not np.isfinite(float(row["flip_rate"])):
                continue
            labels.append(" / ".join(str(row[d].values) for d in dims if result.sizes[d] > 1 or d == "pair"))
            rows.append(row)
        x = np.arange(len(rows))
        for ax, m in zip(axes, metrics):
            y = np.array([float(r[m]) for r in rows])
            lo = np.array([float(r[f"{m}_low"]) for r in rows])
            hi = np.array([float(r[f"{m}_high"]) for r in rows])
            ax.bar(x, y, yerr=[y - lo, hi - y], capsize=3, color="tab:blue")
            ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=6)
            ax.set_title(m, fontsize=9)
    n = int(result["flip_rate_n"].max())
    fig.suptitle(f"{result.attrs.get('model_source', '')}: n = {n} pairs per cell, 95% bootstrap intervals", fontsize=8)
    fig.tight_layout()
    return fig


def tradeoff_figure(result: xr.Dataset, *, x: str = "flip_rate", y: str = "bg_ssim", floor: float = 0.9) -> Any:
    """One panel per pair: every cell as a point (`x`, `y`) with 95% intervals, the floors dashed.

    Cells of methods with settings besides blending (MedSteer) get one colour (and legend entry) per
    combination of their swept settings other than α (window, steps, update, blend ...), a marker per
    layer window, and are labelled with α; the others (baselines such as re-prompting) are stars, one colour per
    method, labelled with their blend. A good setting sits in the upper right corner.
    """
    plt = _pyplot()
    pairs = list(result["pair"].values)
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.6 * len(pairs), 4.2), squeeze=False)
    table = result[[x, f"{x}_low", f"{x}_high", y, f"{y}_low", f"{y}_high"]].to_dataframe().reset_index()
    table = table[np.isfinite(table[x]) & np.isfinite(table[y])]
    own = _own_axes(result)
    if "method" not in table:
        table["method"] = next(iter(own))
    stars = dict(zip([m for m in own if not set(own[m]) - {"blend"}],
                     itertools.cycle(["black", "tab:red", "tab:brown", "tab:pink"])))
    varying = {m: [a for a in own[m] if a != "alpha" and a in result.dims and result.sizes[a] > 1] for m in own}
    keys = list(dict.fromkeys(tuple((a, r[a]) for a in varying[r["method"]]) for _, r in table.iterrows()
                              if r["method"] not in stars))
    colours = dict(zip(keys, itertools.cycle(plt.cm.tab10(np.arange(10)))))
    windows = list(result["window"].values) if "window" in result.dims else []
    markers = dict(zip(windows, "osD^v<>p"))
    for ax, pair in zip(axes[0], pairs):
        rows = table[table["pair"] == pair]
        seen = set()
        for method, group in rows.groupby("method", sort=False):
            group = group.drop_duplicates(subset=own[method]) if own[method] else group.iloc[:1]
            for _, r in group.iterrows():
                blend = float(r.get("blend", 0.0))
                if method not in stars:  # one colour per combination of the swept settings but α (every one named)
                    key = tuple((a, r[a]) for a in varying[method])
                    style = dict(color=colours[key], marker=markers.get(r.get("window"), "o"))
                    label = ", ".join(f"{a} {_plain(v)}" for a, v in key) or method
                    text = f"α{r['alpha']:g}" if "alpha" in r else ""
                else:
                    style = dict(color=stars[method], marker="*", markersize=11)
                    label, text = f"{method}, blend {blend:g}", f"{method} b{blend:g}"
                ax.errorbar(r[x], r[y], xerr=[[r[x] - r[f"{x}_low"]], [r[f"{x}_high"] - r[x]]],
                            yerr=[[r[y] - r[f"{y}_low"]], [r[f"{y}_high"] - r[y]]], linestyle="none", capsize=2,
                            label=None if label in seen else label, alpha=0.85, **style)
                seen.add(label)
                ax.annotate(text, (r[x], r[y]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axvline(floor, color="grey", linestyle="--", linewidth=0.8)
        ax.axhline(floor, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(str(pair), fontsize=9)
        ax.legend(fontsize=6, loc="lower left")
    n = int(result["flip_rate_n"].max())
    fig.suptitle(f"{result.attrs.get('model_source', '')}: n = {n} pairs per cell, 95% bootstrap intervals; "
                 f"dashed: {floor:g}", fontsize=8)
    fig.tight_layout()
    return fig


def _plain(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
