"""The figure of a probe result: where (layer) and when (step) a concept is linearly decodable, and how
selectively.

`probe_figure` takes the Dataset of `dit_lens.readouts.probes.probe` and draws two layer × step heatmaps:
the probe's test accuracy (balanced accuracy for a token-level probe) on a 0–1 scale, and its selectivity
(accuracy − the shuffled-label control's accuracy) on a diverging scale centred on 0. The title says the
site, the classes and how many runs trained and tested the probes.

Examples:
    >>> import numpy as np, xarray as xr
    >>> grid = xr.DataArray(np.array([[0.5, 0.9], [0.6, 1.0]]), dims=("layer", "step"),
    ...                     coords={"layer": [0, 1], "step": [0, 1]})
    >>> result = xr.Dataset({"accuracy": grid, "selectivity": grid - 0.5},
    ...                     attrs={"site": "attn2", "classes": ["normal", "polyps"], "train_seeds": [0, 2],
    ...                            "test_seeds": [1, 3], "token_level": False})
    >>> fig = probe_figure(result)
    >>> [ax.get_title() for ax in fig.axes if ax.images]
    ['accuracy', 'selectivity']
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from .figures import _pyplot, _wrap

__all__ = ["probe_figure"]


def probe_figure(result: xr.Dataset, *, annotate: bool | None = None) -> Any:
    """Draw a probe result as two layer × step heatmaps (see the module docs); returns the matplotlib Figure.

    Args:
        result: The Dataset of ``probe(...)``.
        annotate: Write each cell's value in it (default: when the grid has at most 200 cells).

    Raises:
        ValueError: `result` is not a probe result.
    """
    if not isinstance(result, xr.Dataset) or not {"accuracy", "selectivity"} <= set(result.data_vars):
        raise ValueError(f"probe_figure draws the Dataset returned by probe (with 'accuracy' and 'selectivity' over "
                         f"(layer, step)); got {type(result).__name__} with {list(getattr(result, 'data_vars', []))}")
    token = bool(result.attrs.get("token_level", False))
    shown = "balanced_accuracy" if token and "balanced_accuracy" in result else "accuracy"
    panels = ((shown, "viridis", 0.0, 1.0),
              ("selectivity", "RdBu_r", -1.0, 1.0))
    layers, steps = result["layer"].values, result["step"].values
    annotate = layers.size * steps.size <= 200 if annotate is None else annotate
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(2.0 + 0.45 * max(len(steps), 6) * 2, 1.5 + 0.35 * max(len(layers), 6)),
                             layout="constrained")
    for ax, (name, cmap, low, high) in zip(axes, panels):
        values = result[name].transpose("layer", "step").values
        image = ax.imshow(values, cmap=cmap, vmin=low, vmax=high, origin="lower", aspect="auto",
                          interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("layer")
        ax.set_xticks(range(len(steps)), [str(s) for s in steps])
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        fig.colorbar(image, ax=ax, shrink=0.85)
        if annotate:
            for (i, j), v in np.ndenumerate(values):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if name != "selectivity" and v < 0.6 else "black")
    classes = " vs ".join(str(c) for c in result.attrs.get("classes", []))
    what = "lesion tokens" if token else classes or "classes"
    control = f"{'balanced ' if token else ''}accuracy − shuffled-label control"
    branch = result.attrs.get("capture_branch")
    half = f" ({branch} half)" if branch in ("cond", "uncond") else ""
    fig.suptitle(_wrap(f"linear probe of {result.attrs.get('site', '?')}{half}: {what}; "
                       f"{len(result.attrs.get('train_seeds', []))} training seeds, "
                       f"{len(result.attrs.get('test_seeds', []))} test seeds; selectivity = {control}", 90),
                 fontsize=9)
    return fig
