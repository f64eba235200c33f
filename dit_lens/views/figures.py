"""Static gate-map figures (matplotlib): where and when the model was steered, beside each pair.

Every function takes the Dataset returned by `dit_lens.interventions.generate` (with ``record_gates=True`` for the
gate panels) and returns a matplotlib Figure; callers save it (``fig.savefig(path)``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import xarray as xr

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
    """One pair (unsteered | steered) beside its gate maps over steps (rows) × layers (columns).

    All gate panels share one colour scale, so brightness compares across steps and layers.
    """
    plt = _pyplot()
    gate = _require_gates(out)
    cell = _cell(out, prompt, seed)
    g = gate.sel(cell)  # (step, layer, row, col)
    steps = _pick(list(g["step"].values), max_steps)
    layers = _pick(list(g["layer"].values), max_layers)
    vmax = float(g.max()) or 1.0
    fig = plt.figure(figsize=(4.2 + 1.25 * len(layers), max(3.0, 1.25 * len(steps) + 0.6)))
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
    fig.suptitle(_title(out, cell), fontsize=9)
    return fig


def pairs_figure(out: xr.Dataset, *, max_pairs: int = 8) -> Any:
    """A grid of pairs: unsteered, steered, the gate summed over steered steps and layers, and with
    latent blending the blend mask averaged over steps (1: the steered latent kept, 0: the unsteered)."""
    plt = _pyplot()
    cells = [{"prompt": p, "seed": s} for p in out["prompt"].values for s in out["seed"].values][:max_pairs]
    has_gate, has_mask = "gate" in out, "blend_mask" in out
    columns = len(out["branch"]) + has_gate + has_mask
    fig, axes = plt.subplots(len(cells), columns, figsize=(2.1 * columns, 2.1 * len(cells)), squeeze=False)
    gate = _require_gates(out).sum(("step", "layer")) if has_gate else None
    vmax = (float(gate.max()) or 1.0) if has_gate else None
    for i, cell in enumerate(cells):
        pair = out["image"].sel(cell)
        for k, branch in enumerate(pair["branch"].values):
            axes[i, k].imshow(np.clip(pair.sel(branch=branch).values, 0, 1))
            axes[i, k].set_title(f"{branch} · seed {cell['seed']}", fontsize=7)
        if has_gate:
            axes[i, 2].imshow(gate.sel(cell).values, vmin=0, vmax=vmax, cmap="magma")
            axes[i, 2].set_title("gate, Σ steps & layers", fontsize=7)
        if has_mask:
            axes[i, -1].imshow(out["blend_mask"].sel(cell).mean("blend_step").values, vmin=0, vmax=1, cmap="viridis")
            axes[i, -1].set_title("blend mask, mean over steps", fontsize=7)
        for ax in axes[i]:
            ax.set_axis_off()
    fig.suptitle(_title(out, None), fontsize=8)
    fig.tight_layout()
    return fig


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
    import json

    steers = json.loads(out.attrs.get("steers", "[]"))
    parts = [f"{s.get('name') or 'steer'}: α={s['alpha']:g}, {s['update']} update" for s in steers]
    head = f"{cell['prompt']!r}, seed {cell['seed']} — " if cell else ""
    blend = f"; latent blending τ={out.attrs['blend']:g}" if out.attrs.get("blend") else ""
    return head + ("; ".join(parts) or "original") + blend
