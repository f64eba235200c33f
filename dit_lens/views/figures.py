"""Static gate-map figures (matplotlib): where and when the model was steered, beside each pair.

Every function takes the Dataset returned by `dit_lens.interventions.generate` (with ``record_gates=True`` for the
gate panels) and returns a matplotlib Figure; callers save it (``fig.savefig(path)``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import xarray as xr

from .describe import describe_result, span

__all__ = ["gate_figure", "pairs_figure"]


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
                    row: int, col: int, vmax: float) -> Any:
    """Draw ``maps.sel(step, layer)`` on the steps × layers block of `grid` whose corner is (row, col),
    one colour scale; returns the last image drawn (for a colour bar), or None."""
    image = None
    for i, step in enumerate(steps):
        for j, layer in enumerate(layers):
            ax = fig.add_subplot(grid[row + i, col + j])
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
) -> Any:
    """One pair (original | edited) beside its gate maps over steps (rows) × layers (columns).

    All gate panels share one colour scale, so brightness compares across steps and layers. With more
    steps or layers than `max_steps` / `max_layers`, evenly spaced ones are drawn (first and last
    included) and the title says which of how many.
    """
    plt = _pyplot()
    gate = _require_gates(out)
    cell = _cell(out, prompt, seed)
    g = gate.sel(cell)  # (step, layer, row, col)
    all_steps, all_layers = list(g["step"].values), list(g["layer"].values)
    steps, layers = _pick(all_steps, max_steps), _pick(all_layers, max_layers)
    vmax = float(g.max()) or 1.0
    fig = plt.figure(figsize=(4.6 + 1.25 * len(layers), max(3.4, 1.25 * len(steps) + 1.2)), layout="constrained")
    grid = fig.add_gridspec(len(steps), 2 + len(layers), width_ratios=[2.2, 2.2] + [1] * len(layers))
    pair = out["image"].sel(cell)
    for k, branch in enumerate(pair["branch"].values):
        ax = fig.add_subplot(grid[:, k])
        ax.imshow(np.clip(pair.sel(branch=branch).values, 0, 1))
        ax.set_title(str(branch), fontsize=9)
        ax.set_axis_off()
    image = step_layer_grid(fig, grid, g, steps, layers, row=0, col=2, vmax=vmax)
    if image is not None:
        fig.colorbar(image, ax=fig.axes[2:], fraction=0.02, label="gate g = max(0, h·v)")
    shown = (f"layers {span(layers)} of {span(all_layers)}, steps {span(steps)} of {span(all_steps)}"
             if (len(layers), len(steps)) != (len(all_layers), len(all_steps)) else "every layer and step")
    fig.suptitle(_wrap(f"{_title(out, cell)}\ngates shown: {shown}"), fontsize=8)
    return fig


def pairs_figure(out: xr.Dataset, *, max_pairs: int = 8, judge: Any = None) -> Any:
    """A grid of pairs: original, edited, the gate (summed over steps and layers) over the original, and
    with latent blending the blend mask (mean over steps; 1: the edited latent kept) over the edited
    image. Every panel is in image pixels; gate and mask have colour bars. With a `judge` (a classifier
    such as `dit_lens.load_oracle()`), each image is titled with its class and probability."""
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
    gate_image = mask_image = None
    for i, cell in enumerate(cells):
        pair = out["image"].sel(cell)
        for k, branch in enumerate(branches):
            axes[i, k].imshow(np.clip(pair.sel(branch=branch).values, 0, 1), extent=extent)
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
        fig.colorbar(gate_image, ax=axes[:, len(branches)], fraction=0.05, shrink=0.6, label="gate")
    if mask_image is not None:
        fig.colorbar(mask_image, ax=axes[:, -1], fraction=0.05, shrink=0.6, label="blend mask")
    fig.suptitle(_wrap(_title(out, None)), fontsize=8)
    return fig


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
