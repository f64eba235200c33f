"""Static gate-map figures (matplotlib): where and when the model was steered, beside each pair.

Every function takes the Dataset returned by `dit_lens.interventions.generate` (with ``record_gates=True`` for the
gate panels) and returns a matplotlib Figure; callers save it (``fig.savefig(path)``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import xarray as xr

from .describe import describe_result, span

__all__ = ["gate_figure", "gate_share", "pairs_figure"]


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pick(values: Sequence[int], most: int) -> list[int]:
    """At most `most` evenly spaced entries of `values`, first and last included."""
    values = list(values)
    if len(values) <= most:
        return values
    index = np.unique(np.linspace(0, len(values) - 1, most).round().astype(int))
    return [values[i] for i in index]


def _require_gates(out: xr.Dataset) -> xr.DataArray:
    if "gate" not in out:
        raise ValueError("this result has no gates; generate it with record_gates=True and a steer")
    gate = out["gate"]
    if "steer" in gate.dims:
        gate = gate.sum("steer")
    return gate


def step_layer_grid(fig: Any, grid: Any, maps: xr.DataArray, steps: Sequence[int], layers: Sequence[int], *,
                    row: int, col: int, vmax: float, step_rows: Any = None) -> Any:
    """Draw ``maps.sel(step, layer)`` on the steps × layers block of `grid` whose corner is (row, col),
    one colour scale; returns the last image drawn (for a colour bar), or None. `step_rows(i)` gives the
    grid rows of the i-th step when they are not ``row + i`` (e.g. bands of several rows)."""
    image = None
    for i, step in enumerate(steps):
        for j, layer in enumerate(layers):
            ax = fig.add_subplot(grid[row + i if step_rows is None else step_rows(i), col + j])
            image = ax.imshow(maps.sel(step=step, layer=layer).values, vmin=0, vmax=vmax, cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"layer {layer}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"step {step}", fontsize=8)
    return image


def gate_figure(
    out: xr.Dataset,
    *,
    prompt: int | str = 0,
    seed: int | None = None,
    max_steps: int = 6,
    max_layers: int = 8,
    layers: Sequence[int] | None = None,
    masks: Any = None,
    segmenter: Callable | None = None,
) -> Any:
    """One pair (original | edited) beside its gate maps over steps (rows) × layers (columns).

    All gate panels share one colour scale, so brightness compares across steps and layers. With more
    steps or layers than `max_steps` / `max_layers`, evenly spaced ones are drawn (first and last
    included) and the title says which of how many.

    With the lesion's mask (`masks`, or a `segmenter` run on the original image), its outline is drawn
    on the original and on every map, and each map says the share of its gate mass inside the lesion
    (the gate weighted by how much of each token's patch the lesion covers, over the map's total); the
    title gives the share a gate spread evenly over the image would have (the lesion's area), the
    baseline to compare with.

    Args:
        out: A `generate` result with gates (``record_gates=True``).
        prompt: The prompt (its index or text).
        seed: The seed (default: the first).
        max_steps: At most this many evenly spaced steps.
        max_layers: At most this many evenly spaced layers (unless `layers` is given).
        layers: Exactly these layers (their numbers), in this order.
        masks: The lesion: a boolean ``(H, W)`` mask of this pair's original, ``(n, H, W)`` with one per
            pair of `out` (prompts × seeds, in order), or a DataArray with ``prompt``/``seed`` (and
            ``branch``: the original's is used) dims, such as `dit_lens.metrics.segment` returns.
        segmenter: Instead of `masks`, a segmenter (images ``(n, H, W, 3)`` → masks ``(n, H, W)``) run on
            the original image.

    Returns:
        The Figure.

    Raises:
        ValueError: no gates, no such prompt, seed or layer, or masks of the wrong shape.
    """
    plt = _pyplot()
    gate = _require_gates(out)
    cell = _cell(out, prompt, seed)
    g = gate.sel(cell)  # (step, layer, row, col)
    all_steps, all_layers = list(g["step"].values), list(g["layer"].values)
    steps = _pick(all_steps, max_steps)
    layers = _pick(all_layers, max_layers) if layers is None else _chosen_layers(layers, all_layers)
    vmax = float(g.sel(step=steps, layer=layers).max()) or 1.0
    pair = out["image"].sel(cell)
    lesion = _lesion(out, cell, masks, segmenter)  # (H, W) float in [0, 1], or None
    fig = plt.figure(figsize=(4.6 + 1.25 * len(layers), max(3.4, 1.25 * len(steps) + 1.2)), layout="constrained")
    grid = fig.add_gridspec(len(steps), 2 + len(layers), width_ratios=[2.2, 2.2] + [1] * len(layers))
    for k, branch in enumerate(pair["branch"].values):
        ax = fig.add_subplot(grid[:, k])
        ax.imshow(np.clip(pair.sel(branch=branch).values, 0, 1))
        if lesion is not None and k == 0 and _has_edge(lesion):
            ax.contour(lesion, levels=[0.5], colors="cyan", linewidths=1.0)
        ax.set_title(str(branch) + (" (cyan: lesion)" if lesion is not None and k == 0 else ""), fontsize=9)
        ax.set_axis_off()
    image = step_layer_grid(fig, grid, g, steps, layers, row=0, col=2, vmax=vmax)
    if lesion is not None:
        rows, cols = g.sizes["row"], g.sizes["col"]
        inside = _area_mean(lesion, (rows, cols))  # (rows, cols): share of each token's patch in the lesion
        height, width = lesion.shape
        x = (np.arange(width) + 0.5) * cols / width - 0.5  # pixel centres in token coordinates
        y = (np.arange(height) + 0.5) * rows / height - 0.5
        for ax, (step, layer) in zip(fig.axes[2:], [(s, l) for s in steps for l in layers]):
            if _has_edge(lesion):
                ax.contour(x, y, lesion, levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_xlim(-0.5, cols - 0.5)
            ax.set_ylim(rows - 0.5, -0.5)
            share = gate_share(g.sel(step=step, layer=layer).values, inside)
            text = "no gate" if share is None else f"in lesion {share:.2f}"
            ax.text(0.03, 0.03, text if lesion.any() else "no lesion", transform=ax.transAxes,
                    fontsize=6, color="white", bbox={"facecolor": "black", "alpha": 0.55, "pad": 1, "linewidth": 0})
    if image is not None:
        fig.colorbar(image, ax=fig.axes[2:], fraction=0.02,
                     label="gate per token: g = max(0, h·v), v a unit vector")
    shown = (f"layers {span(layers)} of {span(all_layers)}, steps {span(steps)} of {span(all_steps)}"
             if (len(layers), len(steps)) != (len(all_layers), len(all_steps)) else "every layer and step")
    baseline = "" if lesion is None else (
        f"\nlesion (cyan) covers {lesion.mean():.2f} of the image: a gate spread evenly would put that share of "
        f"its mass inside" if lesion.any() else "\nno lesion in the original's mask: no share inside it")
    fig.suptitle(_wrap(f"{_title(out, cell)}\ngates shown: {shown}{baseline}", _chars(fig, 8)), fontsize=8)
    return fig


def gate_share(gate: np.ndarray, inside: np.ndarray) -> float | None:
    """The share of a gate map's mass inside a region: ``Σ g·inside / Σ g`` over tokens, `inside` being
    the share of each token's patch in the region ``(rows, cols)``; None where the gate is 0 everywhere."""
    total = float(np.sum(gate))
    return None if total <= 0 else float(np.sum(gate * inside)) / total


def _has_edge(mask: np.ndarray) -> bool:
    """Whether a mask has pixels on both sides of 0.5 (an outline to draw)."""
    return bool((np.asarray(mask) > 0.5).any() and (np.asarray(mask) < 0.5).any())


def _chosen_layers(layers: Sequence[int], have: list) -> list[int]:
    chosen = [int(layer) for layer in layers]
    missing = [layer for layer in chosen if layer not in [int(h) for h in have]]
    if not chosen or missing:
        raise ValueError(f"layers={list(layers)}: the result has gates for layers {span(have)}; choose among them")
    return chosen


def _lesion(out: xr.Dataset, cell: dict, masks: Any, segmenter: Callable | None) -> np.ndarray | None:
    """The lesion mask of `cell`'s original image ``(H, W)`` as floats in [0, 1], or None."""
    if masks is not None and segmenter is not None:
        raise ValueError("give masks= or segmenter=, not both")
    original = out["image"].sel(cell).sel(branch=str(out["branch"].values[0])).values  # (H, W, 3)
    size = original.shape[:2]
    if segmenter is not None:
        mask = np.asarray(segmenter(np.clip(original, 0, 1)[None]))
        if mask.shape != (1, *size):
            raise ValueError(f"segmenter= returned masks of shape {mask.shape} for one {size[0]}×{size[1]} image; "
                             f"it must map images (n, H, W, 3) to masks (n, H, W)")
        mask = mask[0]
    elif masks is None:
        return None
    elif isinstance(masks, xr.DataArray):
        picked = {d: cell[d] for d in ("prompt", "seed") if d in masks.dims}
        mask = masks.sel(picked)
        if "branch" in mask.dims:
            mask = mask.sel(branch=str(out["branch"].values[0]))
        mask = mask.values
    else:
        mask = np.asarray(masks)
        if mask.ndim == 3:
            cells = [(str(p), int(s)) for p in out["prompt"].values for s in out["seed"].values]
            if len(mask) != len(cells):
                raise ValueError(f"masks= holds {len(mask)} masks, but the result has {len(cells)} pairs (prompts × "
                                 f"seeds); give one per pair, or this pair's (H, W) mask")
            mask = mask[cells.index((str(cell["prompt"]), int(cell["seed"])))]
    mask = np.asarray(mask, dtype=np.float64)
    if mask.shape != size:
        raise ValueError(f"masks= has a mask of shape {mask.shape}; the images are {size[0]}×{size[1]}: give (H, W) "
                         f"masks of the original images")
    if not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError("masks= must be boolean (or shares in [0, 1]): the lesion's pixels")
    return mask


def _area_mean(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """`mask` ``(H, W)`` averaged over each cell of a `shape` grid (adaptive average pooling)."""
    height, width = mask.shape
    rows, cols = shape
    out = np.empty(shape)
    for i in range(rows):
        top, bottom = (i * height) // rows, -(-((i + 1) * height) // rows)
        for j in range(cols):
            left, right = (j * width) // cols, -(-((j + 1) * width) // cols)
            out[i, j] = mask[top:bottom, left:right].mean()
    return out


def pairs_figure(out: xr.Dataset, *, max_pairs: int = 8, judge: Any = None) -> Any:
    """A grid of pairs: original, edited, the gate (summed over steps and layers) over the original, and
    with latent blending the blend mask (mean over steps; 1: the edited latent kept) over the edited
    image. Every panel is in image pixels; gate and mask have colour bars. With a `judge` (a classifier
    such as `dit_lens.load_oracle()`), each image is titled with its class and probability. A result
    with a ``region`` (methods that edit inside one, such as ``insert`` and ``local``) has the region's
    outline drawn dashed on both images."""
    plt = _pyplot()
    cells = [{"prompt": p, "seed": s} for p in out["prompt"].values for s in out["seed"].values][:max_pairs]
    has_gate, has_mask = "gate" in out, "blend_mask" in out
    branches = [str(b) for b in out["branch"].values]
    columns = len(branches) + has_gate + has_mask
    fig, axes = plt.subplots(len(cells), columns, figsize=(2.3 * columns + 0.6, 2.45 * len(cells) + 0.8),
                             squeeze=False, layout="constrained")
    gate = _require_gates(out).sum(("step", "layer")) if has_gate else None
    vmax = (float(gate.max()) or 1.0) if has_gate else None
    verdicts = _verdicts(out, cells, judge) if judge is not None else None
    height, width = out["image"].shape[-3:-1]
    extent = (0, width, height, 0)  # token- and latent-grid maps stretched over the image's pixels
    region = out["region"] if "region" in out else None
    gate_image = mask_image = None
    for i, cell in enumerate(cells):
        pair = out["image"].sel(cell)
        for k, branch in enumerate(branches):
            axes[i, k].imshow(np.clip(pair.sel(branch=branch).values, 0, 1), extent=extent)
            if region is not None:
                _outline(axes[i, k], region.sel({d: cell[d] for d in cell if d in region.dims}).values)
            title = f"{branch} · seed {cell['seed']}"
            if verdicts is not None:
                label, p = verdicts[i][branch]
                title += f"\n{label} {p:.2f}"
            axes[i, k].set_title(title, fontsize=7)
        if has_gate:
            ax = axes[i, len(branches)]
            ax.imshow(np.clip(pair.sel(branch=branches[0]).values, 0, 1), extent=extent)
            gate_image = ax.imshow(gate.sel(cell).values, vmin=0, vmax=vmax, cmap="magma", alpha=0.6, extent=extent)
            ax.set_title("gate over original\n(Σ steps & layers)", fontsize=7)
        if has_mask:
            ax = axes[i, -1]
            ax.imshow(np.clip(pair.sel(branch=branches[-1]).values, 0, 1), extent=extent)
            mask_image = ax.imshow(out["blend_mask"].sel(cell).mean("blend_step").values, vmin=0, vmax=1,
                                   cmap="viridis", alpha=0.6, extent=extent)
            ax.set_title("blend mask over edited\n(1: edited kept)", fontsize=7)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    if gate_image is not None:
        n_steps, n_layers = out["gate"].sizes["step"], out["gate"].sizes["layer"]
        fig.colorbar(gate_image, ax=axes[:, len(branches)], fraction=0.05, shrink=0.6,
                     label=f"gate per token, Σ over {n_steps} steps × {n_layers} layers\n"
                           f"of max(0, h·v), v a unit vector")
    if mask_image is not None:
        fig.colorbar(mask_image, ax=axes[:, -1], fraction=0.05, shrink=0.6, label="blend mask")
    note = "; dashed: the region the edit was held to" if region is not None else ""
    fig.suptitle(_wrap(_title(out, None) + note, _chars(fig, 8)), fontsize=8)
    return fig


def _outline(ax: Any, region: np.ndarray) -> None:
    """The outline of a region mask (at image or token-grid size) over an image drawn with extent (0, W, H, 0)."""
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()  # (H, 0): the image's extent
    rows, cols = region.shape[-2:]
    x = (np.arange(cols) + 0.5) * (x1 - x0) / cols
    y = (np.arange(rows) + 0.5) * (y0 - y1) / rows
    if _has_edge(region):
        ax.contour(x, y, np.asarray(region, dtype=float), levels=[0.5], colors="yellow", linewidths=1.0,
                   linestyles="--")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)


def _verdicts(out: xr.Dataset, cells: list[dict], judge: Any) -> list[dict[str, tuple[str, float]]]:
    """Per cell and branch: the judge's class and its probability."""
    labels = list(getattr(judge, "labels", []))
    found = []
    for cell in cells:
        images = out["image"].sel(cell).values  # (branch, H, W, 3)
        probs = np.asarray(judge(images))
        found.append({str(b): (labels[int(p.argmax())] if labels else str(int(p.argmax())), float(p.max()))
                      for b, p in zip(out["branch"].values, probs)})
    return found


def _chars(fig: Any, fontsize: float) -> int:
    """About how many characters of `fontsize` points fit across `fig`."""
    return max(30, int(fig.get_figwidth() * 72 / (0.55 * fontsize)))


def _wrap(text: str, width: int = 120) -> str:
    import textwrap

    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


def _cell(out: xr.Dataset, prompt: int | str, seed: int | None) -> dict:
    prompts = [str(p) for p in out["prompt"].values]
    if isinstance(prompt, int):
        if not 0 <= prompt < len(prompts):
            raise ValueError(f"prompt index {prompt} out of range: the result has {len(prompts)} prompts")
        prompt = prompts[prompt]
    elif prompt not in prompts:
        raise ValueError(f"prompt {prompt!r} is not in the result; it has {prompts}")
    seeds = [int(s) for s in out["seed"].values]
    seed = seeds[0] if seed is None else int(seed)
    if seed not in seeds:
        raise ValueError(f"seed {seed} is not in the result; it has {seeds}")
    return {"prompt": prompt, "seed": seed}


def _title(out: xr.Dataset, cell: dict | None) -> str:
    """The edit the result records, in words, led by the pair's prompt and seed when one is shown."""
    head = f"{cell['prompt']!r}, seed {cell['seed']}: " if cell else ""
    return head + describe_result(out)
