"""Attention-map figures (matplotlib): where each word looked, over steps and layers.

`attention_figure` takes the Dataset returned by `dit_lens.readouts.attention_maps.attention_maps` and
returns a matplotlib Figure; callers save it (``fig.savefig(path)``).

Examples:
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> from dit_lens.readouts.attention_maps import attention_maps
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> maps = attention_maps(lens, ["a red polyp"], seeds=[0], words=["polyp", "red"],
    ...                       num_inference_steps=2, progress=False)
    >>> fig = attention_figure(maps, word="red")
    >>> [ax.get_title() for ax in fig.axes[:3]]
    ['generated', 'polyp', 'red']
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from .figures import _cell, _chars, _pick, _pyplot, _wrap, step_layer_grid

__all__ = ["attention_figure"]


def attention_figure(
    maps: xr.Dataset,
    *,
    prompt: int | str = 0,
    seed: int | None = None,
    word: str | None = None,
    max_steps: int = 6,
    max_layers: int = 8,
) -> Any:
    """One run's image, each word's map averaged over steps and layers, and one word's maps over
    steps (rows) × layers (columns).

    The averaged maps each have their own colour scale (words differ in how much attention they
    draw); the step × layer grid shares one, so brightness compares across steps and layers. Maps are
    drawn over the image, stretched from the image-token grid to the image.

    Args:
        maps: A result of `attention_maps`.
        prompt: The prompt (its index or text).
        seed: The seed (default: the first).
        word: The word of the step × layer grid (default: the first).
        max_steps: At most this many evenly spaced steps in the grid (first and last kept).
        max_layers: At most this many evenly spaced layers in the grid.

    Returns:
        The Figure.

    Raises:
        ValueError: `maps` is not an `attention_maps` result, or names no such prompt, seed or word.
    """
    plt = _pyplot()
    if "attention" not in maps or "image" not in maps:
        raise ValueError("attention_figure takes the Dataset returned by attention_maps (with 'attention' and 'image')")
    cell = _cell(maps, prompt, seed)
    words = [str(w) for w in maps["word"].values]
    word = words[0] if word is None else word
    if word not in words:
        raise ValueError(f"word {word!r} is not in these maps; they have {words}")
    attention = maps["attention"].sel(cell)  # (step, layer, word, row, col)
    image = np.clip(maps["image"].sel(cell).values, 0, 1)
    height, width = image.shape[:2]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # the token grid stretched over the image

    steps = _pick(list(attention["step"].values), max_steps)
    layers = _pick(list(attention["layer"].values), max_layers)
    # the image and each word's mean map down the left, the chosen word's steps × layers to the right,
    # so every row is full and there is no empty band
    top = 1 + len(words)
    rows = max(top, len(steps))
    fig = plt.figure(figsize=(1.6 * (1 + len(layers)) + 1.2, 1.5 * rows + 0.7), layout="constrained")
    grid = fig.add_gridspec(rows, 1 + len(layers), width_ratios=[1.25] + [1] * len(layers))

    def rows_of(k: int, n: int) -> slice:  # the k-th of n equal row bands
        return slice(k * rows // n, (k + 1) * rows // n)

    ax = fig.add_subplot(grid[rows_of(0, top), 0])
    ax.imshow(image)
    ax.set_title("generated", fontsize=8)
    ax.set_axis_off()
    mean = attention.mean(("step", "layer"))  # (word, row, col)
    for k, name in enumerate(words):
        ax = fig.add_subplot(grid[rows_of(1 + k, top), 0])
        ax.imshow(image)
        ax.imshow(mean.sel(word=name).values, cmap="magma", alpha=0.65, extent=extent, interpolation="bilinear")
        ax.set_title(name, fontsize=8, fontweight="bold" if name == word else "normal")
        ax.set_axis_off()
    chosen = attention.sel(word=word)
    vmax = float(chosen.sel(step=steps, layer=layers).max()) or 1.0
    shown = step_layer_grid(fig, grid, chosen, steps, layers, row=0, col=1, vmax=vmax,
                            step_rows=lambda i: rows_of(i, len(steps)))
    if shown is not None:
        fig.colorbar(shown, ax=fig.axes[top:], fraction=0.02,
                     label=f"attention to {word!r}\n(softmax weight, mean over heads, Σ over its tokens)")
    fig.suptitle(_wrap(f"{cell['prompt']!r}, seed {cell['seed']}: cross-attention per word (left: mean over steps "
                       f"and layers); {word!r} over steps × layers", _chars(fig, 8)), fontsize=8)
    return fig
