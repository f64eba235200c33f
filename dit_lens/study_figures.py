"""The summary figure of a study result: each metric against each swept axis, with 95% intervals."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import xarray as xr

from .figures import _pyplot

__all__ = ["study_figure"]

_SHOWN = ("flip_rate", "confidence_shift", "bg_ssim", "bg_psnr", "dye_detection_rate", "polyp_kept")


def study_figure(result: xr.Dataset) -> Any:
    """Metrics (columns) against the swept axis; one line per combination of the other axes.

    With no swept axis (a table study), a bar per pair and method instead.
    """
    plt = _pyplot()
    metrics = [m for m in _SHOWN if m in result and bool(np.isfinite(result[m]).any())]
    dims = list(result["flip_rate"].dims)
    swept = [d for d in dims if result.sizes[d] > 1 and d not in ("pair", "edit")]
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
