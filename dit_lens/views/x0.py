"""Views of an x̂₀ lens (`dit_lens.readouts.x0_lens`): what the model would predict after each block of
each step.

`x0_lens_figure` draws one run's predictions as a grid, steps down and layers across, with the model's own
x̂₀ of each step (the denoiser's output) in the last column and the image the run made beside the grid.
`write_x0_explorer` writes a self-contained HTML page (plotly.js inlined, works offline) with a run
selector and step and layer sliders over the same images, and a step × layer map of how far each block's
prediction is from the model's x̂₀ at that step; `dit_lens.views.explorer.write_explorer` hands an x̂₀ lens
to it.

Examples:
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> from dit_lens.readouts.x0_lens import x0_lens
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> ds = x0_lens(lens, ["a polyp"], seeds=[0], num_inference_steps=2, progress=False)
    >>> fig = x0_lens_figure(ds)
    >>> [ax.get_title() for ax in fig.axes[:4]]
    ['generated', 'after block 0', 'after block 1', "model's x̂₀"]
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .describe import describe_result, span
from .encode import PAGE_STYLE, int_ticks, png_uri, write_page
from .figures import _cell, _chars, _pick, _pyplot, _wrap

__all__ = ["x0_distance", "x0_lens_figure", "write_x0_explorer"]


def _require_lens(ds: xr.Dataset, caller: str) -> None:
    if not isinstance(ds, xr.Dataset) or not {"image", "image_final", "generated"} <= set(ds.data_vars) \
            or "layer" not in ds["image"].dims:
        raise ValueError(f"{caller} takes the Dataset returned by x0_lens (with 'image' over step and layer, "
                         f"'image_final' and 'generated')")


def x0_distance(ds: xr.Dataset) -> xr.DataArray:
    """How far each block's prediction is from the model's own x̂₀ of the same step: the mean absolute
    difference of the decoded images (in [0, 1]) ``(prompt, seed, step, layer)``; 0 at the last block."""
    _require_lens(ds, "x0_distance")
    return abs(ds["image"] - ds["image_final"]).mean(("y", "x", "rgb"))


def x0_lens_figure(ds: xr.Dataset, *, prompt: int | str = 0, seed: int | None = None, max_steps: int = 6,
                   max_layers: int = 8) -> Any:
    """One run's x̂₀ predictions over steps (rows) × layers (columns), the model's own x̂₀ of each step in the
    last column and the generated image on the left.

    Each panel is titled by its block and says its distance from the model's x̂₀ of the step (`x0_distance`:
    the mean absolute difference of the images); each row's label gives the step and its timestep. With more
    steps or layers than `max_steps` / `max_layers`, evenly spaced ones are drawn (first and last included)
    and the title says which of how many.

    Args:
        ds: A result of `x0_lens`.
        prompt: The prompt (its index or text).
        seed: The seed (default: the first).
        max_steps: At most this many evenly spaced steps.
        max_layers: At most this many evenly spaced layers.

    Returns:
        The Figure.

    Raises:
        ValueError: `ds` is not an `x0_lens` result, or has no such prompt or seed.
    """
    _require_lens(ds, "x0_lens_figure")
    plt = _pyplot()
    cell = _cell(ds, prompt, seed)
    lens = ds["image"].sel(cell)  # (step, layer, y, x, rgb)
    all_steps, all_layers = [int(t) for t in lens["step"].values], [int(l) for l in lens["layer"].values]
    steps, layers = _pick(all_steps, max_steps), _pick(all_layers, max_layers)
    distance = x0_distance(ds).sel(cell)
    columns = 1 + len(layers) + 1
    fig = plt.figure(figsize=(1.45 * columns + 0.6, 1.45 * len(steps) + 1.0), layout="constrained")
    grid = fig.add_gridspec(len(steps), columns, width_ratios=[1.6] + [1] * (columns - 1))
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(np.clip(ds["generated"].sel(cell).values, 0, 1), interpolation="nearest")
    ax.set_title("generated", fontsize=8)
    ax.set_axis_off()
    timesteps = lens["timestep"].values if "timestep" in lens.coords else lens["step"].values
    for i, step in enumerate(steps):
        shown = [(f"after block {layer}", lens.sel(step=step, layer=layer).values,
                  float(distance.sel(step=step, layer=layer))) for layer in layers]
        shown.append(("model's x̂₀", ds["image_final"].sel(cell).sel(step=step).values, None))
        for j, (title, image, far) in enumerate(shown):
            ax = fig.add_subplot(grid[i, 1 + j])
            ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if far is not None:
                ax.text(0.03, 0.03, f"|Δ| {far:.3f}", transform=ax.transAxes, fontsize=6, color="white",
                        bbox={"facecolor": "black", "alpha": 0.55, "pad": 1, "linewidth": 0})
            if i == 0:
                ax.set_title(title, fontsize=7)
            if j == 0:
                ax.set_ylabel(f"step {step} (t={float(timesteps[all_steps.index(step)]):g})", fontsize=7)
    shown_cells = (f"layers {span(layers)} of {span(all_layers)}, steps {span(steps)} of {span(all_steps)}"
                   if (len(layers), len(steps)) != (len(all_layers), len(all_steps)) else "every layer and step")
    fig.suptitle(_wrap(f"{cell['prompt']!r}, seed {cell['seed']}: x̂₀ predicted after each block, "
                       f"{ds.attrs.get('prediction', '?')} parameterisation; {describe_result(ds)}\n{shown_cells}; "
                       f"|Δ|: mean absolute difference from the model's x̂₀ of the step", _chars(fig, 8)),
                 fontsize=8)
    return fig


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dit-lens x0 lens</title>
{style}</head><body>
<h3>{title}</h3>
<div class="controls">
 <label>run <select id="run">{run_options}</select></label>
 <label>step <input id="step" type="range" min="0" max="{max_step}" value="0">
   <output id="step-label"></output></label>
 <label>layer <input id="layer" type="range" min="0" max="{max_layer}" value="{max_layer}">
   <output id="layer-label"></output></label>
</div>
<p>What the model would predict (x̂₀, decoded) if the denoiser stopped after the chosen block of the chosen
step; beside it, the model's own x̂₀ of that step and the image the run made. Below: how far each block's
prediction is from the model's x̂₀ of its step (mean absolute difference of the images, 0 at the last block).</p>
{plot}
{summary}
<script>
const DATA = {data};
const gd = document.getElementById("x0-explorer");
const sd = document.getElementById("x0-distance");
function show() {{
  const r = +document.getElementById("run").value;
  const s = +document.getElementById("step").value;
  const l = +document.getElementById("layer").value;
  document.getElementById("step-label").textContent = DATA.steps[s] + " (t=" + DATA.timesteps[s] + ")";
  document.getElementById("layer-label").textContent = DATA.layers[l];
  Plotly.restyle(gd, {{source: [DATA.lens[r][s][l]]}}, [0]);
  Plotly.restyle(gd, {{source: [DATA.final[r][s]]}}, [1]);
  Plotly.restyle(gd, {{source: [DATA.generated[r]]}}, [2]);
  Plotly.restyle(sd, {{z: [DATA.distance[r]]}}, [0]);
  Plotly.restyle(sd, {{x: [[DATA.layers[l]]], y: [[DATA.steps[s]]]}}, [1]);
  gd.dataset.shown = JSON.stringify({{run: r, step: DATA.steps[s], layer: DATA.layers[l]}});
}}
for (const id of ["run", "step", "layer"]) document.getElementById(id).addEventListener("input", show);
show();
</script></body></html>
"""


def write_x0_explorer(ds: xr.Dataset, path: str | Path, *, max_runs: int = 16) -> Path:
    """Write the x̂₀ lens explorer for an `x0_lens` result: a run selector, step and layer sliders, the chosen
    block's prediction beside the model's x̂₀ of the step and the generated image, and the step × layer map
    of their distance (the chosen cell marked).

    Images are embedded as PNG (8 bits per channel), one per run, step and layer: at 64×64 pixels, 20 steps
    and 12 layers, about 1.5 MB per run besides plotly.js (4.8 MB).

    Args:
        ds: A result of `dit_lens.readouts.x0_lens.x0_lens`.
        path: The HTML file to write (parent folders are created).
        max_runs: At most this many (prompt, seed) runs are offered in the page.

    Returns:
        The path written.

    Raises:
        ValueError: `ds` is not an `x0_lens` result, or `max_runs` is below 1.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots


    _require_lens(ds, "write_x0_explorer")
    if not isinstance(max_runs, int) or max_runs < 1:
        raise ValueError(f"max_runs must be a positive integer, got {max_runs!r}")
    cells = [(str(p), int(s)) for p in ds["prompt"].values for s in ds["seed"].values][:max_runs]
    steps, layers = [int(t) for t in ds["step"].values], [int(l) for l in ds["layer"].values]
    lens = ds["image"].transpose("prompt", "seed", "step", "layer", "y", "x", "rgb")
    distance = x0_distance(ds).transpose("prompt", "seed", "step", "layer")
    data = {
        "steps": steps,
        "timesteps": [float(t) for t in ds["timestep"].values] if "timestep" in ds.coords else steps,
        "layers": layers,
        "lens": [[[png_uri(lens.sel(prompt=p, seed=s).values[i, j]) for j in range(len(layers))]
                  for i in range(len(steps))] for p, s in cells],
        "final": [[png_uri(image) for image in ds["image_final"].sel(prompt=p, seed=s).transpose("step", ...).values]
                  for p, s in cells],
        "generated": [png_uri(ds["generated"].sel(prompt=p, seed=s).values) for p, s in cells],
        "distance": [np.round(distance.sel(prompt=p, seed=s).values, 5).tolist() for p, s in cells],
    }
    titles = ("after the chosen block", "model's x̂₀ at this step", "generated")
    fig = make_subplots(rows=1, cols=3, subplot_titles=titles)
    first = (data["lens"][0][0][-1], data["final"][0][0], data["generated"][0])
    for k, (source, name) in enumerate(zip(first, ("lens", "model x0", "generated"))):
        fig.add_trace(go.Image(source=source, name=name), row=1, col=k + 1)
    fig.update_layout(height=380, width=1000, margin={"t": 40, "b": 10})
    plot = fig.to_html(full_html=False, include_plotlyjs=True, div_id="x0-explorer")

    summary = go.Figure()
    summary.add_trace(go.Heatmap(z=data["distance"][0], x=layers, y=steps, colorscale="Magma", zmin=0,
                                 zmax=float(distance.max()) or 1.0, name="distance",
                                 colorbar={"title": {"text": "|x̂₀(block) − x̂₀(model)|<br>mean over pixels"}},
                                 hovertemplate="step %{y}, layer %{x}: %{z}<extra></extra>"))
    summary.add_trace(go.Scatter(x=[layers[-1]], y=[steps[0]], mode="markers", name="shown above", cliponaxis=False,
                                 marker={"symbol": "square-open", "size": 14, "color": "cyan", "line": {"width": 2}}))
    summary.update_xaxes(title_text="layer", range=[layers[0] - 0.5, layers[-1] + 0.5], tickmode="array",
                         tickvals=int_ticks(layers))
    summary.update_yaxes(title_text="step", range=[steps[-1] + 0.5, steps[0] - 0.5], tickmode="array",
                         tickvals=int_ticks(steps))
    summary.update_layout(height=360, width=600, margin={"t": 30, "b": 10}, showlegend=False,
                          title={"text": "distance from the model's x̂₀ of the step", "font": {"size": 13}})
    options = "".join(f'<option value="{i}">{html.escape(p)} · seed {s}</option>' for i, (p, s) in enumerate(cells))
    page = _PAGE.format(
        style=PAGE_STYLE,
        title=html.escape(f"x̂₀ lens: {describe_result(ds)}"),
        run_options=options,
        max_step=len(steps) - 1,
        max_layer=len(layers) - 1,
        plot=plot,
        summary=summary.to_html(full_html=False, include_plotlyjs=False, div_id="x0-distance"),
        data=json.dumps(data),
    )
    return write_page(path, page)
