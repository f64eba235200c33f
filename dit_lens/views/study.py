"""The summary figure of a study result: each metric against each swept axis, with 95% intervals.

A study result has a ``method`` dim beside each method's axes; a method's cells repeat along the
axes it does not have (``attrs["method_axes"]``). Such a method (re-prompting has no layer window)
is drawn once, as its own mark beside the swept values, never as a flat line across them. An axis
of labels (layer or step windows) is drawn as categories: points with intervals, side by side,
never joined; a numeric axis (α, blend) as lines. Titles name the study and its fixed α.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import xarray as xr

from .figures import _chars, _pyplot, _wrap

__all__ = ["study_figure", "tradeoff_figure"]

_HIDDEN = ("bg_lpips",)


def _metrics(result: xr.Dataset) -> list[str]:
    """The metrics to draw: every measured one with values, but a method's extras (a vector's stability)."""
    hidden = (*_HIDDEN, *result.study.extras)
    return [m for m in result.study.metrics if m not in hidden and bool(np.isfinite(result[m]).any())]


def _heading(result: xr.Dataset) -> str:
    """The study's name, its fixed α (a swept α is on an axis), and what the intervals are."""
    name = result.study.declaration.get("name")
    parts = [f"study {name!r}" if name else "study"]
    if "alpha" in result.dims and result.sizes["alpha"] == 1:
        parts.append(f"α={_plain(result['alpha'].values[0])}")
    if "pair" in result.dims and result.sizes["pair"] == 1:
        parts.append(str(result["pair"].values[0]))
    n = int(result["flip_rate_n"].max())
    source = result.attrs.get("model_source", "")
    return ", ".join(parts) + (f" ({source})" if source else "") + f": n = {n} pairs per cell, 95% bootstrap intervals"


def _interval(row: xr.Dataset, m: str) -> tuple[np.ndarray, np.ndarray]:
    y, lo, hi = (np.atleast_1d(np.asarray(row[k].values, dtype=float)) for k in (m, f"{m}_low", f"{m}_high"))
    return y, np.stack([y - lo, hi - y])


def study_figure(result: xr.Dataset) -> Any:
    """Metrics (columns) against the swept axis; one series per combination of the other axes.

    Windows (labels) are categories: each series a point per window with its interval, series side by
    side. A method without the swept axis (``reprompt`` has no window) is one mark of its own, right of
    a dotted rule, with its legend entry. With no swept axis (a table study), a bar per pair and
    method instead; with several swept axes, the trade-off each pair's settings make
    (`tradeoff_figure`). ``result.study.figure()`` draws it too.
    """
    plt = _pyplot()
    metrics = _metrics(result)
    dims = list(result["flip_rate"].dims)
    swept = [d for d in dims if result.sizes[d] > 1 and d not in ("pair", "method")]
    if len(swept) > 1:
        return tradeoff_figure(result)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.5 * len(metrics), 3.3), squeeze=False)
    axes = axes[0]
    if swept:
        _swept(result, swept[0], metrics, axes)
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
    fig.suptitle(_wrap(_heading(result), _chars(fig, 8)), fontsize=8)
    fig.tight_layout()
    return fig


def _swept(result: xr.Dataset, axis: str, metrics: list[str], axes: Any) -> None:
    """Each metric against `axis`: series of the methods that have it, one mark per method that has not."""
    own = result.study.method_axes
    methods = [str(m) for m in result["method"].values] if "method" in result.dims else [next(iter(own), "")]
    having = [m for m in methods if axis in own.get(m, [axis])]
    lacking = [m for m in methods if m not in having]
    others = [d for d in result["flip_rate"].dims if d not in (axis, "method") and result.sizes[d] > 1]
    labels = [_plain(v) for v in result[axis].values]
    categorical = not np.issubdtype(result[axis].dtype, np.number)
    x = np.arange(len(labels), dtype=float)
    series = [(m, combo) for m in having for combo in itertools.product(*(range(result.sizes[d]) for d in others))]
    width = 0.7 / max(1, len(series)) if categorical else 0.0  # dodged side by side within each category
    for k, (method, combo) in enumerate(series):
        sel = dict(zip(others, combo))
        if "method" in result.dims:
            sel["method"] = methods.index(method)
        row = result.isel(sel)
        label = ", ".join(([method] if len(methods) > 1 else []) + [f"{d}={_plain(result[d].values[i])}"
                                                                     for d, i in zip(others, combo)])
        for ax, m in zip(axes, metrics):
            rest = {d: 0 for d in row[m].dims if d != axis}
            y, err = _interval(row.isel(rest), m)
            ax.errorbar(x + (k - (len(series) - 1) / 2) * width, y, yerr=err, marker="o", capsize=3,
                        linestyle="none" if categorical else "-", label=label or None, color=f"C{k % 10}")
    for j, method in enumerate(lacking):  # drawn once, as its own category beyond the swept values
        for k, combo in enumerate(itertools.product(*(range(result.sizes[d]) for d in others))):
            sel = {**dict(zip(others, combo)), "method": methods.index(method), axis: 0}
            row = result.isel(sel)
            label = f"{method} (no {axis})" + "".join(f", {d}={_plain(result[d].values[i])}"
                                                      for d, i in zip(others, combo))
            for ax, m in zip(axes, metrics):
                y, err = _interval(row.isel({d: 0 for d in row[m].dims}), m)
                ax.errorbar([len(labels) + 0.6 + j], y, yerr=err, marker="*", markersize=10, capsize=3,
                            linestyle="none", color=("black", "tab:red", "tab:brown", "tab:pink")[(j + k) % 4],
                            label=label)
    ticks = list(x) + [len(labels) + 0.6 + j for j in range(len(lacking))]
    for ax, m in zip(axes, metrics):
        if lacking:
            ax.axvline(len(labels) - 0.2, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xticks(ticks, labels + lacking, rotation=30, ha="right", fontsize=7)
        ax.set_xlim(-0.6, ticks[-1] + 0.6)
        ax.set_xlabel(axis + (" (categories)" if categorical else ""))
        ax.set_title(m, fontsize=9)
    if others or lacking or len(having) > 1:
        axes[0].legend(fontsize=6)


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
    own = result.study.method_axes
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
    fig.suptitle(_wrap(f"{_heading(result)}; dashed: {floor:g}", _chars(fig, 8)), fontsize=8)
    fig.tight_layout()
    return fig


def _plain(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
