"""Interactive gate explorer: one self-contained HTML page (plotly.js inlined, works offline).

Controls pick the pair, the denoising step and the layer; the page shows the gate map over the
unsteered image, and the unsteered and steered images side by side (with latent blending, also the
blend mask after the chosen step). All gate maps share one colour scale, so what grows or shrinks
across steps and layers is visible. Given attention maps of the same prompts and seeds
(`dit_lens.readouts.attention_maps`), a word selector beside the gate shows the chosen word's
cross-attention map over the unsteered image at the same step and layer.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .figures import _require_gates, _title

__all__ = ["write_explorer"]

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dit-lens gate explorer</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 1em; }}
 .controls {{ display: flex; gap: 2em; align-items: center; flex-wrap: wrap; }}
 label {{ font-size: 0.9em; }} output {{ font-weight: bold; }}
</style></head><body>
<h3>{title}</h3>
<div class="controls">
 <label>pair <select id="pair">{pair_options}</select></label>
 <label>step <input id="step" type="range" min="0" max="{max_step}" value="0">
   <output id="step-label"></output></label>
 <label>layer <input id="layer" type="range" min="0" max="{max_layer}" value="0">
   <output id="layer-label"></output></label>
{word_control}</div>
<p id="verdict">{verdict_note}</p>
{plot}
<h4>Where and when the edit acted (this pair): gate mass, summed over the image, per step × layer{summary_note}</h4>
{summary}
<script>
const DATA = {data};
const gd = document.getElementById("gate-explorer");
const sd = document.getElementById("gate-summary");
function show() {{
  const p = +document.getElementById("pair").value;
  const s = +document.getElementById("step").value;
  const l = +document.getElementById("layer").value;
  document.getElementById("step-label").textContent =
      DATA.steps[s] + " (t=" + DATA.timesteps[s] + ")";
  document.getElementById("layer-label").textContent = DATA.layers[l];
  Plotly.restyle(gd, {{z: [DATA.gates[p][s][l]]}}, [1]);
  Plotly.restyle(gd, {{z: [DATA.images[p][0]]}}, [0]);
  Plotly.restyle(gd, {{z: [DATA.images[p][0]]}}, [2]);
  Plotly.restyle(gd, {{z: [DATA.images[p][1]]}}, [3]);
  if (DATA.blend) Plotly.restyle(gd, {{z: [DATA.blend[p][DATA.steps[s]]]}}, [4]);
  let word = null;
  if (DATA.attn) {{
    const w = +document.getElementById("word").value;
    const z = DATA.attn.maps[p][w][s][l];
    word = DATA.attn.words[w];
    Plotly.restyle(gd, {{z: [DATA.images[p][0]]}}, [DATA.attn.trace - 1]);
    Plotly.restyle(gd, {{z: [z === null ? DATA.attn.empty : z], zmax: [DATA.attn.zmax[w]]}}, [DATA.attn.trace]);
    document.getElementById("word-label").textContent = z === null ? "not recorded at this step and layer" : "";
  }}
  Plotly.restyle(sd, {{z: [DATA.mass[p]]}}, [0]);
  Plotly.restyle(sd, {{x: [[DATA.layers[l]]], y: [[DATA.steps[s]]]}}, [1]);
  if (DATA.summary_attn) {{
    Plotly.restyle(sd, {{z: [DATA.images[p][0]]}}, [2]);
    Plotly.restyle(sd, {{z: [DATA.summary_attn[p]]}}, [3]);
  }}
  if (DATA.verdicts) document.getElementById("verdict").textContent = DATA.verdicts[p];
  gd.dataset.shown = JSON.stringify({{pair: p, step: DATA.steps[s], layer: DATA.layers[l], word: word}});
}}
for (const id of ["pair", "step", "layer", "word"]) {{
  const control = document.getElementById(id);
  if (control) control.addEventListener("input", show);
}}
show();
</script></body></html>
"""


def write_explorer(out: xr.Dataset, path: str | Path, *, max_pairs: int = 16,
                   attention: xr.Dataset | xr.DataArray | None = None, judge: Any = None) -> Path:
    """Write the gate explorer for a `generate` result made with a steer and ``record_gates=True``.

    Args:
        out: The result of `dit_lens.interventions.generate`.
        path: The HTML file to write (parent folders are created).
        max_pairs: At most this many (prompt, seed) pairs are offered in the page.
        attention: Optionally, `attention_maps` of the same prompts and seeds (the Dataset or its
            ``attention`` variable): adds a word selector and the word's map over the unsteered
            image at the chosen step and layer (one colour scale per word; a step or layer the maps
            lack shows as not recorded). The summary beside the gate mass then shows the first word's
            map averaged over every recorded step and layer.
        judge: Optionally a classifier (e.g. `dit_lens.load_oracle()`): each pair's verdict, the class
            and probability of the original and of the counterfactual, is shown above the plots.

    Returns:
        The path written.

    Raises:
        ValueError: `out` has no gates or pairs, or `attention` lacks one of the pairs shown.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    gate = _require_gates(out)
    if len(out["branch"]) != 2:
        raise ValueError("the explorer needs pairs: generate with a steer")
    cells = [(str(p), int(s)) for p in out["prompt"].values for s in out["seed"].values][:max_pairs]
    images = [
        [_rgb8(out["image"].sel(prompt=p, seed=s, branch=b).values) for b in ("original", "edited")]
        for p, s in cells
    ]
    gates = [np.round(gate.sel(prompt=p, seed=s).values, 5).tolist() for p, s in cells]
    zmax = float(gate.max()) or 1.0
    height, width = out.sizes["y"], out.sizes["x"]
    rows, cols = out.sizes["row"], out.sizes["col"]

    blend = None
    if "blend_mask" in out:  # (pair, every step, latent_y, latent_x)
        blend = [np.round(out["blend_mask"].sel(prompt=p, seed=s).values, 3).tolist() for p, s in cells]
    attn = None if attention is None else _attention_data(attention, cells, gate)
    titles = ("gate over original", "original", "edited") + (("blend mask (1: steered kept)",) if blend else ())
    titles += ("attention to the word, over original",) if attn else ()
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles)
    fig.add_trace(go.Image(z=images[0][0]), row=1, col=1)
    fig.add_trace(
        go.Heatmap(
            z=gates[0][0][0], zmin=0, zmax=zmax, colorscale="Magma", opacity=0.6,
            x0=width / cols / 2 - 0.5, dx=width / cols, y0=height / rows / 2 - 0.5, dy=height / rows,
            colorbar={"title": {"text": "gate"}}, name="gate",
        ),
        row=1, col=1,
    )
    fig.add_trace(go.Image(z=images[0][0]), row=1, col=2)
    fig.add_trace(go.Image(z=images[0][1]), row=1, col=3)
    if blend:
        first = int(gate["step"].values[0])
        fig.add_trace(go.Heatmap(z=blend[0][first], zmin=0, zmax=1, colorscale="Viridis", showscale=False,
                                 name="blend mask"), row=1, col=4)
        fig.update_yaxes(autorange="reversed", scaleanchor="x4", row=1, col=4)
    if attn:
        column = len(titles)
        fig.add_trace(go.Image(z=images[0][0]), row=1, col=column)
        first = attn["maps"][0][0][0][0]
        fig.add_trace(
            go.Heatmap(
                z=attn["empty"] if first is None else first, zmin=0, zmax=attn["zmax"][0], colorscale="Viridis",
                opacity=0.65, x0=width / cols / 2 - 0.5, dx=width / cols, y0=height / rows / 2 - 0.5,
                dy=height / rows, colorbar={"title": {"text": "attention"}, "x": 1.1}, name="attention",
            ),
            row=1, col=column,
        )
        attn["trace"] = len(fig.data) - 1
    fig.update_layout(height=420, width=1100 + (330 if blend else 0) + (380 if attn else 0), margin={"t": 40, "b": 10})
    data = {
        "steps": [int(x) for x in gate["step"].values],
        "timesteps": [int(x) for x in gate["timestep"].values] if "timestep" in gate.coords
        else [int(x) for x in gate["step"].values],
        "layers": [int(x) for x in gate["layer"].values],
        "gates": gates,
        "images": images,
        "blend": blend,
        "attn": attn,
    }
    plot = fig.to_html(full_html=False, include_plotlyjs=True, div_id="gate-explorer")
    options = "".join(
        f'<option value="{i}">{html.escape(p)} · seed {s}</option>' for i, (p, s) in enumerate(cells)
    )
    word_control = "" if attn is None else (
        ' <label>word <select id="word">'
        + "".join(f'<option value="{k}">{html.escape(w)}</option>' for k, w in enumerate(attn["words"]))
        + '</select> <output id="word-label"></output></label>\n'
    )
    summary, data["mass"], data["summary_attn"] = _summary(out, gate, cells, attention, images[0][0])
    data["verdicts"] = None if judge is None else _verdict_lines(out, cells, judge)
    page = _PAGE.format(
        title=html.escape(_title(out, None)),
        verdict_note="" if judge is not None else "(no judge given: no verdicts)",
        summary=summary,
        summary_note="; beside it, the word's attention over the original, mean over steps and layers"
        if data["summary_attn"] is not None else "",
        word_control=word_control,
        pair_options=options,
        max_step=len(data["steps"]) - 1,
        max_layer=len(data["layers"]) - 1,
        plot=plot,
        data=json.dumps(data),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _attention_data(attention: xr.Dataset | xr.DataArray, cells: list[tuple[str, int]], gate: xr.DataArray) -> dict:
    """Attention maps per pair, word, gate step and gate layer (None where the maps lack them)."""
    maps = attention["attention"] if isinstance(attention, xr.Dataset) else attention
    if set(maps.dims) != {"prompt", "seed", "step", "layer", "word", "row", "col"}:
        raise ValueError(f"attention= takes the result of attention_maps, dims (prompt, seed, step, layer, word, row, "
                         f"col); got {maps.dims}")
    have = {(str(p), int(s)) for p in maps["prompt"].values for s in maps["seed"].values}
    missing = [cell for cell in cells if cell not in have]
    if missing:
        raise ValueError(f"attention maps lack the pairs {missing[:4]}; make them with attention_maps(lens, prompts, "
                         f"seeds=...) for the same prompts and seeds as the pairs")
    if (maps.sizes["row"], maps.sizes["col"]) != (gate.sizes["row"], gate.sizes["col"]):
        raise ValueError("attention maps and gates come from models with different token grids")
    words = [str(w) for w in maps["word"].values]
    step_at = {int(t): i for i, t in enumerate(maps["step"].values)}
    layer_at = {int(l): j for j, l in enumerate(maps["layer"].values)}
    pairs = []
    for prompt, seed in cells:
        values = np.round(maps.sel(prompt=prompt, seed=seed).transpose("word", "step", "layer", "row", "col").values, 4)
        pairs.append([[[values[w, step_at[t], layer_at[l]].tolist() if t in step_at and l in layer_at else None
                        for l in gate["layer"].values.tolist()] for t in gate["step"].values.tolist()]
                      for w in range(len(words))])
    shown = maps.sel(prompt=sorted({p for p, _ in cells}), seed=sorted({s for _, s in cells}))
    zmax = [float(shown.sel(word=w).max()) or 1.0 for w in words]
    empty = [[None] * maps.sizes["col"] for _ in range(maps.sizes["row"])]
    return {"words": words, "maps": pairs, "zmax": zmax, "empty": empty}


def _rgb8(image: np.ndarray) -> list:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8).tolist()


def _summary(out: xr.Dataset, gate: xr.DataArray, cells: list[tuple[str, int]],
             attention: xr.Dataset | xr.DataArray | None, first_image: list) -> tuple[str, list, list | None]:
    """The summary plot (gate mass per step × layer, the current step and layer marked, and the first
    word's mean attention map), its per-pair gate masses and mean maps."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    mass = gate.sum(("row", "col"))  # (prompt, seed, step, layer)
    masses = [np.round(mass.sel(prompt=p, seed=s).transpose("step", "layer").values, 4).tolist() for p, s in cells]
    steps, layers = [int(x) for x in gate["step"].values], [int(x) for x in gate["layer"].values]
    maps = None
    if attention is not None:
        a = attention["attention"] if isinstance(attention, xr.Dataset) else attention
        word = str(a["word"].values[0])
        maps = [np.round(a.sel(prompt=p, seed=s, word=word).mean(("step", "layer")).values, 4).tolist() for p, s in cells]
    titles = ("gate mass (Σ over image tokens)",) + ((f"attention to {word!r}, mean over steps and layers",) if maps else ())
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles)
    fig.add_trace(go.Heatmap(z=masses[0], x=layers, y=steps, colorscale="Magma", zmin=0,
                             zmax=float(mass.max()) or 1.0, colorbar={"title": {"text": "gate mass"}, "x": 0.45 if maps else 1.0},
                             hovertemplate="step %{y}, layer %{x}: %{z}<extra></extra>", name="gate mass"), row=1, col=1)
    fig.add_trace(go.Scatter(x=[layers[0]], y=[steps[0]], mode="markers", name="shown above",
                             marker={"symbol": "square-open", "size": 14, "color": "cyan", "line": {"width": 2}}),
                  row=1, col=1)
    fig.update_xaxes(title_text="layer", dtick=1, row=1, col=1)
    fig.update_yaxes(title_text="step", dtick=1, autorange="reversed", row=1, col=1)
    if maps:  # over the original image, in its pixels (as the panels above)
        height, width = out.sizes["y"], out.sizes["x"]
        rows, cols = gate.sizes["row"], gate.sizes["col"]
        fig.add_trace(go.Image(z=first_image), row=1, col=2)
        fig.add_trace(go.Heatmap(z=maps[0], colorscale="Viridis", zmin=0, opacity=0.65, name="attention",
                                 x0=width / cols / 2 - 0.5, dx=width / cols, y0=height / rows / 2 - 0.5,
                                 dy=height / rows, colorbar={"title": {"text": "attention"}}), row=1, col=2)
    fig.update_layout(height=360, width=1000 if maps else 560, margin={"t": 40, "b": 10}, showlegend=False)
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id="gate-summary"), masses, maps


def _verdict_lines(out: xr.Dataset, cells: list[tuple[str, int]], judge: Any) -> list[str]:
    labels = list(getattr(judge, "labels", []))
    lines = []
    for prompt, seed in cells:
        probs = np.asarray(judge(out["image"].sel(prompt=prompt, seed=seed, branch=["original", "edited"]).values))
        read = [(labels[int(p.argmax())] if labels else str(int(p.argmax())), float(p.max())) for p in probs]
        lines.append(f"verdict: original read as {read[0][0]} ({read[0][1]:.2f}); counterfactual read as "
                     f"{read[1][0]} ({read[1][1]:.2f})")
    return lines
