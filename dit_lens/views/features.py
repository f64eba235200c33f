"""The feature explorer: one self-contained HTML page per SAE, a section per feature — how often it fires on each
prompt (class), and its top-activating images with the feature's map laid over them.

Examples:
    >>> import tempfile, numpy as np, xarray as xr
    >>> board = xr.Dataset(
    ...     {"rate": (("feature", "prompt"), [[0.5, 0.0]]), "image_rate": (("feature", "prompt"), [[1.0, 0.0]]),
    ...      "top_prompt": (("feature", "rank"), [["a polyp"]]), "top_seed": (("feature", "rank"), [[3]]),
    ...      "top_peak": (("feature", "rank"), [[2.0]]),
    ...      "top_map": (("feature", "rank", "row", "col"), np.ones((1, 1, 2, 2))),
    ...      "top_image": (("feature", "rank", "y", "x", "rgb"), np.zeros((1, 1, 4, 4, 3)))},
    ...     coords={"feature": [7], "prompt": ["a polyp", "normal"], "rank": [0]})
    >>> page = write_feature_explorer(board, tempfile.mkdtemp() + "/features.html")
    >>> "feature 7" in page.read_text()
    True
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import xarray as xr

from .encode import PAGE_STYLE, png_uri, write_page

__all__ = ["overlay", "write_feature_explorer"]

_NEEDED = ("rate", "image_rate", "top_prompt", "top_seed", "top_peak", "top_map", "top_image")


def overlay(image: np.ndarray, grid: np.ndarray, peak: float) -> np.ndarray:
    """`image` ``(H, W, 3)`` with a feature map ``(rows, cols)`` laid over it in red (nearest-neighbour
    upsampled, scaled by `peak`), for the page."""
    height, width = image.shape[:2]
    rows, cols = grid.shape
    up = np.repeat(np.repeat(grid, -(-height // rows), 0), -(-width // cols), 1)[:height, :width]
    strength = np.clip(up / peak, 0, 1)[..., None] if peak > 0 else np.zeros((height, width, 1))
    red = np.zeros_like(image)
    red[..., 0] = 1.0
    return (1 - 0.6 * strength) * image + 0.6 * strength * red


def write_feature_explorer(board: xr.Dataset, path: str | Path, *, title: str = "SAE features") -> Path:
    """Write the feature explorer page of a `dit_lens.features.feature_dashboard` Dataset.

    Args:
        board: ``feature_dashboard(sae_features(...))``.
        path: The HTML file (written atomically).
        title: The page's heading.

    Returns:
        The path.
    """
    missing = [name for name in _NEEDED if name not in board]
    if missing:
        raise ValueError(f"the feature explorer draws a feature_dashboard Dataset; this one lacks {missing}")
    prompts = [str(p) for p in board["prompt"].values]
    sections = []
    for f in board["feature"].values:
        one = board.sel(feature=f)
        rates = "".join(f"<tr><td>{html.escape(p)}</td><td>{float(one.rate.sel(prompt=p)):.3f}</td>"
                        f"<td>{float(one.image_rate.sel(prompt=p)):.2f}</td></tr>" for p in prompts)
        peak = float(one.top_peak.max())
        images = "".join(
            f'<figure><img src="{png_uri(overlay(one.top_image.values[r], one.top_map.values[r], peak))}" width="128">'
            f"<figcaption>{html.escape(str(one.top_prompt.values[r]))}, seed {int(one.top_seed.values[r])}: peak "
            f"{float(one.top_peak.values[r]):.3g}</figcaption></figure>" for r in range(one.sizes["rank"]))
        said = ""
        if "word_correlation" in board and str(one.word.values):
            said = (f"<p>follows the word <b>{html.escape(str(one.word.values))}</b> (correlation of its map with the "
                    f"word's attention map {float(one.word_correlation.sel(word=one.word.values)):.2f})</p>")
        sections.append(f'<section id="f{int(f)}"><h2>feature {int(f)}</h2>{said}<table><tr><th>prompt</th>'
                        f"<th>token rate</th><th>image rate</th></tr>{rates}</table>"
                        f'<div class="controls">{images}</div></section>')
    about = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(board.attrs[k]))}</li>"
                    for k in ("model_source", "site", "sae_digest", "sae_fvu", "sae_k") if k in board.attrs)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{PAGE_STYLE}"
            f"</head><body><h1>{html.escape(title)}</h1><ul>{about}</ul><p>Token rate: the share of image tokens "
            f"(over seeds, steps and blocks) where the feature is active; image rate: the share of images where it "
            f"fires anywhere. Images: its top-activating runs, its map (mean over steps and blocks) in red."
            f"</p>{''.join(sections)}</body></html>")
    return write_page(path, page)
