"""Concept maps over their images: a static figure (`concept_maps_figure`) and an interactive page with a concept
selector (`write_concept_explorer`), for the Dataset of `dit_lens.readouts.concept_maps.concept_maps`.

Each pooled map ``(row, col)`` is upsampled bilinearly to the image (as `dit_lens.metrics.segmentation` scores it),
scaled to [0, 1] over the image, and laid over the image in the ``magma`` colours (half and half).

Examples:
    >>> import numpy as np, xarray as xr
    >>> ds = xr.Dataset({"pooled": (("item", "concept", "row", "col"), np.random.default_rng(0).random((2, 2, 2, 2))),
    ...                  "image": (("item", "y", "x", "rgb"), np.full((2, 8, 8, 3), 0.5, np.float32))},
    ...                 coords={"item": [0, 1], "concept": ["polyps", "normal cecum"]},
    ...                 attrs={"kind": "output", "prompt": "An endoscopic image of polyps"})
    >>> fig = concept_maps_figure(ds)
    >>> [ax.get_title() for ax in fig.axes[:3]]
    ['item 0', 'polyps', 'normal cecum']
    >>> overlay(ds["image"][0].values, ds["pooled"][0, 0].values).shape
    (8, 8, 3)
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..metrics.segmentation import upsample
from .encode import PAGE_STYLE, png_uri, write_page

__all__ = ["concept_maps_figure", "overlay", "write_concept_explorer"]


def overlay(image: np.ndarray, grid: np.ndarray, *, weight: float = 0.5) -> np.ndarray:
    """The map `grid` ``(rows, cols)``, upsampled to `image` ``(H, W, 3)`` and scaled to [0, 1], over the image."""
    import matplotlib

    up = upsample(np.asarray(grid, np.float64)[None], image.shape[:2])[0]
    low, high = float(up.min()), float(up.max())
    scaled = (up - low) / (high - low) if high > low else np.zeros_like(up)
    colours = matplotlib.colormaps["magma"](scaled)[..., :3]
    return np.clip((1 - weight) * image + weight * colours, 0, 1).astype(np.float32)


def _check(ds: Any) -> xr.Dataset:
    if not isinstance(ds, xr.Dataset) or "pooled" not in ds or "image" not in ds:
        raise ValueError(f"draws the Dataset returned by dit_lens.concept_maps (with 'pooled' and 'image'); got "
                         f"{type(ds).__name__}")
    return ds


def concept_maps_figure(ds: xr.Dataset, *, items: int = 4) -> Any:
    """A matplotlib Figure: one row per item (the first `items`), its image, then each concept's pooled map over
    it; the title says the map kind, the prompt and what was pooled."""
    from .figures import _pyplot

    ds = _check(ds)
    if not isinstance(items, int) or items < 1:
        raise ValueError(f"items must be a positive integer, got {items!r}")
    plt = _pyplot()
    shown = list(ds["item"].values[:items])
    concepts = [str(c) for c in ds["concept"].values]
    fig, axes = plt.subplots(len(shown), 1 + len(concepts), figsize=(2 * (1 + len(concepts)), 2 * len(shown)),
                             squeeze=False)
    for r, item in enumerate(shown):
        image = ds["image"].sel(item=item).values
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(f"item {item}", fontsize=9)
        for c, concept in enumerate(concepts):
            axes[r, c + 1].imshow(overlay(image, ds["pooled"].sel(item=item, concept=concept).values))
            axes[r, c + 1].set_title(concept, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(_title(ds), fontsize=9)
    fig.tight_layout()
    return fig


def _title(ds: xr.Dataset) -> str:
    kind = ds.attrs.get("kind", "")
    what = {"output": "output-space concept maps", "cross_attention": "cross-attention word maps"}.get(kind, "maps")
    pooled = []
    for dim in ("step", "layer"):
        if dim in ds.coords:
            values = [int(v) for v in np.atleast_1d(ds[dim].values)]
            pooled.append(f"{dim}s {values[0]}–{values[-1]}" if len(values) > 1 else f"{dim} {values[0]}")
    over = f", mean over {' and '.join(pooled)}" if pooled else ""
    return f"{what} · {ds.attrs.get('prompt', '')!s}{over}"


def write_concept_explorer(ds: xr.Dataset, path: str | Path, *, max_items: int = 32) -> Path:
    """Write an HTML page of concept maps: choose a concept and an item, see its pooled map over the image beside
    the image itself.

    Args:
        ds: The Dataset of `dit_lens.concept_maps`.
        path: The HTML file to write (atomically; parent folders are created).
        max_items: At most this many items are on the page.

    Returns:
        The path written.
    """
    ds = _check(ds)
    if not isinstance(max_items, int) or max_items < 1:
        raise ValueError(f"max_items must be a positive integer, got {max_items!r}")
    items = [int(i) for i in ds["item"].values[:max_items]]
    concepts = [str(c) for c in ds["concept"].values]
    images = {i: png_uri(ds["image"].sel(item=i).values) for i in items}
    maps = {f"{i}|{c}": png_uri(overlay(ds["image"].sel(item=i).values, ds["pooled"].sel(item=i, concept=c).values))
            for i in items for c in concepts}
    options = lambda values: "".join(f"<option value='{html.escape(str(v))}'>{html.escape(str(v))}</option>"
                                     for v in values)
    title = html.escape(_title(ds))
    page = f"""<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>{PAGE_STYLE}</head><body>
<h3 style='font-size: 14px'>{title}</h3>
<div class='controls'>
 <label>concept <select id='concept'>{options(concepts)}</select></label>
 <label>item <select id='item'>{options(items)}</select></label>
</div>
<div style='display: flex; gap: 1em; margin-top: 1em'>
 <figure><img id='image' width='256' style='image-rendering: pixelated'><figcaption>image</figcaption></figure>
 <figure><img id='map' width='256' style='image-rendering: pixelated'><figcaption id='caption'></figcaption></figure>
</div>
<script>
const IMAGES = {json.dumps({str(k): v for k, v in images.items()})};
const MAPS = {json.dumps(maps)};
function show() {{
  const c = document.getElementById('concept').value, i = document.getElementById('item').value;
  document.getElementById('image').src = IMAGES[i];
  document.getElementById('map').src = MAPS[i + '|' + c];
  document.getElementById('caption').textContent = c + ' (pooled map, scaled to its range)';
}}
document.getElementById('concept').onchange = show;
document.getElementById('item').onchange = show;
show();
</script></body></html>"""
    return write_page(path, page)
