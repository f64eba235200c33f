"""Interactive gate explorer: one self-contained HTML page (plotly.js inlined, works offline).

Controls pick the pair, the denoising step and the layer (the page opens on the cell with the most
gate mass); the page shows the gate map over the unsteered image (fading to transparent where the
gate is small, so the image stays readable), and the unsteered and steered images side by side
(with latent blending, also the blend mask after the chosen step). All gate maps share one colour
scale, so what grows or shrinks across steps and layers is visible. Given attention maps of the same
prompts and seeds (`dit_lens.readouts.attention_maps`), a word selector beside the gate shows the
chosen word's cross-attention map over the unsteered image at the same step and layer. Given an x̂₀ lens
(`dit_lens.readouts.x0_lens`) instead, it writes the x̂₀ explorer (`dit_lens.views.x0.write_x0_explorer`).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .encode import PAGE_STYLE, int_ticks, png_uri, write_page
from .figures import _require_gates, _title
from .patching import is_patching, write_patching_explorer
from .x0 import write_x0_explorer

__all__ = ["write_explorer"]

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dit-lens gate explorer</title>
{style}</head><body>
<h3>{title}</h3>
<div class="controls">
 <label>pair <select id="pair">{pair_options}</select></label>
 <label>step <input id="step" type="range" min="0" max="{max_step}" value="{start_step}">
   <output id="step-label"></output></label>
 <label>layer <input id="layer" type="range" min="0" max="{max_layer}" value="{start_layer}">
   <output id="layer-label"></output></label>
{word_control}</div>
<p>Opened on the pair, step and layer with the most gate mass. {verdict_note}</p>
<p id="verdict"></p>
{plot}
<h4>Where and when the edit acted (this pair): gate mass, summed over the image, per step × layer{summary_note}</h4>
{summary}
<script>
const DATA = {data};
const gd = document.getElementById("gate-explorer");
const sd = document.getElementById("gate-summary");
const decoded = new Map();
function levels(packed) {{  // base64 of uint8 levels, decoded once
  if (!decoded.has(packed)) {{
    const text = atob(packed);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    decoded.set(packed, bytes);
  }}
  return decoded.get(packed);
}}
function grid(packed, index, scale) {{  // map number `index` of a pack of rows × cols maps, in its units
  const bytes = levels(packed), rows = DATA.grid[0], cols = DATA.grid[1], z = [];
  for (let r = 0; r < rows; r++) {{
    const row = [];
    for (let c = 0; c < cols; c++) row.push(bytes[(index * rows + r) * cols + c] * scale);
    z.push(row);
  }}
  return z;
}}
function show() {{
  const p = +document.getElementById("pair").value;
  const s = +document.getElementById("step").value;
  const l = +document.getElementById("layer").value;
  const nl = DATA.layers.length;
  document.getElementById("step-label").textContent =
      DATA.steps[s] + " (t=" + DATA.timesteps[s] + ")";
  document.getElementById("layer-label").textContent = DATA.layers[l];
  Plotly.restyle(gd, {{z: [grid(DATA.gates[p], s * nl + l, DATA.gate_scale)]}}, [1]);
  Plotly.restyle(gd, {{source: [DATA.images[p][0]]}}, [0, 2]);
  Plotly.restyle(gd, {{source: [DATA.images[p][1]]}}, [3]);
  if (DATA.blend) {{
    const b = DATA.blend;
    const rows = b.grid[0], cols = b.grid[1], bytes = levels(b.maps[p]), z = [];
    const at = b.steps.indexOf(DATA.steps[s]);
    for (let r = 0; r < rows; r++) {{
      const row = [];
      for (let c = 0; c < cols; c++) row.push(bytes[(at * rows + r) * cols + c] / 255);
      z.push(row);
    }}
    Plotly.restyle(gd, {{z: [z]}}, [4]);
  }}
  let word = null;
  if (DATA.attn) {{
    const w = +document.getElementById("word").value;
    const recorded = DATA.attn.recorded[s][l];
    word = DATA.attn.words[w];
    const z = recorded ? grid(DATA.attn.maps[p][w], s * nl + l, DATA.attn.scale[w]) : DATA.attn.empty;
    Plotly.restyle(gd, {{source: [DATA.images[p][0]]}}, [DATA.attn.trace - 1]);
    Plotly.restyle(gd, {{z: [z], zmax: [DATA.attn.zmax[w]]}}, [DATA.attn.trace]);
    document.getElementById("word-label").textContent = recorded ? "" : "not recorded at this step and layer";
  }}
  Plotly.restyle(sd, {{z: [DATA.mass[p]]}}, [0]);
  Plotly.restyle(sd, {{x: [[DATA.layers[l]]], y: [[DATA.steps[s]]]}}, [1]);
  if (DATA.summary_attn) {{
    Plotly.restyle(sd, {{source: [DATA.images[p][0]]}}, [2]);
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

#: Overlays fade in with the value: 0 leaves the image as it is, the largest value is 85% opaque.
_GATE_COLOURS = [[0.0, "rgba(0,0,4,0)"], [0.15, "rgba(59,15,112,0.2)"], [0.4, "rgba(140,41,129,0.45)"],
                 [0.7, "rgba(222,73,104,0.65)"], [1.0, "rgba(252,253,191,0.85)"]]
_ATTENTION_COLOURS = [[0.0, "rgba(68,1,84,0)"], [0.3, "rgba(59,82,139,0.35)"], [0.6, "rgba(33,145,140,0.6)"],
                      [1.0, "rgba(253,231,37,0.85)"]]


def write_explorer(out: xr.Dataset, path: str | Path, *, max_pairs: int = 16,
                   attention: xr.Dataset | xr.DataArray | None = None, judge: Any = None) -> Path:
    """Write the gate explorer for a `generate` result made with a steer and ``record_gates=True`` (or, for
    an `x0_lens` result, the x̂₀ explorer of `dit_lens.views.x0.write_x0_explorer`, `max_pairs` runs; for a
    `patching` result, `dit_lens.views.patching.write_patching_explorer`, `max_pairs` seeds; for a feature
    dashboard, `dit_lens.views.features.write_feature_explorer`; for `concept_maps`,
    `dit_lens.views.concept_maps.write_concept_explorer`, `max_pairs` items).

    The page opens on the pair, step and layer with the most gate mass (the gate summed over the
    image). Images are embedded as PNG; gate, blend and attention maps as 8-bit levels of their
    shared colour scale (a map's values are exact to 1/510 of that scale's maximum): at the demo's
    shape (64×64 images, 8×8 tokens, 20 steps, 12 layers, one word's attention) the page is plotly.js
    (4.8 MB) and about 65 kB per pair.

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

    if out.attrs.get("readout") == "x0_lens":
        if attention is not None or judge is not None:
            raise ValueError("attention= and judge= belong to the gate explorer; an x0_lens result takes neither")
        return write_x0_explorer(out, path, max_runs=max_pairs)
    if is_patching(out):
        if attention is not None or judge is not None:
            raise ValueError("attention= and judge= belong to the gate explorer; a patching result takes neither")
        return write_patching_explorer(out, path, max_seeds=max_pairs)
    if out.attrs.get("readout") == "concept_maps":
        if attention is not None or judge is not None:
            raise ValueError("attention= and judge= belong to the gate explorer; concept maps take neither")
        from .concept_maps import write_concept_explorer

        return write_concept_explorer(out, path, max_items=max_pairs)
    if out.attrs.get("readout") == "feature_dashboard":
        if attention is not None or judge is not None:
            raise ValueError("attention= and judge= belong to the gate explorer; a feature dashboard takes neither")
        from .features import write_feature_explorer

        return write_feature_explorer(out, path)
    gate = _require_gates(out)
    if len(out["branch"]) != 2:
        raise ValueError("the explorer needs pairs: generate with a steer")
    cells = [(str(p), int(s)) for p in out["prompt"].values for s in out["seed"].values][:max_pairs]
    images = [[png_uri(out["image"].sel(prompt=p, seed=s, branch=b).values) for b in ("original", "edited")]
              for p, s in cells]
    shown = xr.concat([gate.sel(prompt=p, seed=s).transpose("step", "layer", "row", "col") for p, s in cells], "pair")
    zmax = float(shown.max()) or 1.0
    gates = [_levels(g, zmax) for g in shown.values]  # (pair, step, layer, row, col) as bytes
    mass = shown.sum(("row", "col")).values  # (pair, step, layer)
    start = np.unravel_index(int(np.argmax(mass)), mass.shape)  # the cell with the most gate mass
    height, width = out.sizes["y"], out.sizes["x"]
    rows, cols = shown.sizes["row"], shown.sizes["col"]
    over = {"x0": width / cols / 2 - 0.5, "dx": width / cols, "y0": height / rows / 2 - 0.5, "dy": height / rows}
    first_gate = (shown.values[start] / zmax * 255).round() * zmax / 255  # what the page shows on opening

    blend = None
    if "blend_mask" in out:  # (pair, every step, latent_y, latent_x)
        masks = [out["blend_mask"].sel(prompt=p, seed=s).transpose("blend_step", ...) for p, s in cells]
        blend = {"steps": [int(x) for x in masks[0]["blend_step"].values], "grid": list(masks[0].shape[-2:]),
                 "maps": [_levels(m.values, 1.0) for m in masks]}
    attn = None if attention is None else _attention_data(attention, cells, gate)
    titles = ("gate over original", "original", "edited") + (("blend mask (1: steered kept)",) if blend else ())
    titles += ("attention to the word, over original",) if attn else ()
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles)
    fig.add_trace(go.Image(source=images[start[0]][0], name="original"), row=1, col=1)
    fig.add_trace(
        go.Heatmap(z=first_gate.tolist(), zmin=0, zmax=zmax, colorscale=_GATE_COLOURS, **over,
                   colorbar={"title": {"text": "gate g = max(0, h·v)"}}, name="gate",
                   hovertemplate="gate %{z:.3g}<extra></extra>"),
        row=1, col=1,
    )
    fig.add_trace(go.Image(source=images[start[0]][0], name="original"), row=1, col=2)
    fig.add_trace(go.Image(source=images[start[0]][1], name="edited"), row=1, col=3)
    if blend:
        fig.add_trace(go.Heatmap(z=np.zeros(blend["grid"]).tolist(), zmin=0, zmax=1, colorscale="Viridis",
                                 showscale=False, name="blend mask"), row=1, col=4)
        fig.update_yaxes(autorange="reversed", scaleanchor="x4", row=1, col=4)
    if attn:
        column = len(titles)
        fig.add_trace(go.Image(source=images[start[0]][0], name="original"), row=1, col=column)
        fig.add_trace(
            go.Heatmap(z=attn["empty"], zmin=0, zmax=attn["zmax"][0], colorscale=_ATTENTION_COLOURS, **over,
                       colorbar={"title": {"text": "attention"}, "x": 1.1}, name="attention",
                       hovertemplate="attention %{z:.3g}<extra></extra>"),
            row=1, col=column,
        )
        attn["trace"] = len(fig.data) - 1
    fig.update_layout(height=420, width=1100 + (330 if blend else 0) + (380 if attn else 0), margin={"t": 40, "b": 10})
    data = {
        "steps": [int(x) for x in shown["step"].values],
        "timesteps": [int(x) for x in shown["timestep"].values] if "timestep" in shown.coords
        else [int(x) for x in shown["step"].values],
        "layers": [int(x) for x in shown["layer"].values],
        "grid": [rows, cols],
        "gates": gates,
        "gate_scale": zmax / 255,
        "images": images,
        "blend": blend,
        "attn": attn,
        "start": {"pair": int(start[0]), "step": int(start[1]), "layer": int(start[2])},
    }
    plot = fig.to_html(full_html=False, include_plotlyjs=True, div_id="gate-explorer")
    options = "".join(
        f'<option value="{i}"{" selected" if i == start[0] else ""}>{html.escape(p)} · seed {s}</option>'
        for i, (p, s) in enumerate(cells)
    )
    word_control = "" if attn is None else (
        ' <label>word <select id="word">'
        + "".join(f'<option value="{k}">{html.escape(w)}</option>' for k, w in enumerate(attn["words"]))
        + '</select> <output id="word-label"></output></label>\n'
    )
    summary, data["mass"], data["summary_attn"] = _summary(out, shown, mass, start, attention, cells,
                                                           images[start[0]][0])
    data["verdicts"] = None if judge is None else _verdict_lines(out, cells, judge)
    page = _PAGE.format(
        style=PAGE_STYLE,
        title=html.escape(_title(out, None)),
        verdict_note="" if judge is not None else "(No judge given: no verdicts.)",
        summary=summary,
        summary_note="; beside it, the word's attention over the original, mean over steps and layers"
        if data["summary_attn"] is not None else "",
        word_control=word_control,
        pair_options=options,
        max_step=len(data["steps"]) - 1,
        max_layer=len(data["layers"]) - 1,
        start_step=int(start[1]),
        start_layer=int(start[2]),
        plot=plot,
        data=json.dumps(data),
    )
    return write_page(path, page)


def _attention_data(attention: xr.Dataset | xr.DataArray, cells: list[tuple[str, int]], gate: xr.DataArray) -> dict:
    """Attention maps per pair and word as 8-bit levels over the gate's steps × layers (0 where the
    maps lack a step or layer, which ``recorded`` marks), one scale per word."""
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
    steps, layers = [int(t) for t in gate["step"].values], [int(l) for l in gate["layer"].values]
    recorded = [[t in set(maps["step"].values.tolist()) and l in set(maps["layer"].values.tolist()) for l in layers]
                for t in steps]
    shown = maps.sel(prompt=sorted({p for p, _ in cells}), seed=sorted({s for _, s in cells}))
    zmax = [float(shown.sel(word=w).max()) or 1.0 for w in words]
    # (step, layer) of the gate's grid, filled where the maps have them: (word, step, layer, row, col)
    grid = xr.DataArray(np.zeros((len(words), len(steps), len(layers), maps.sizes["row"], maps.sizes["col"])),
                        dims=("word", "step", "layer", "row", "col"),
                        coords={"word": words, "step": steps, "layer": layers})
    pairs = []
    for prompt, seed in cells:
        values = grid.copy()
        found = maps.sel(prompt=prompt, seed=seed).transpose("word", "step", "layer", "row", "col")
        found = found.sel(step=[t for t in found["step"].values if int(t) in steps],
                          layer=[l for l in found["layer"].values if int(l) in layers])
        values.loc[{"step": found["step"].values, "layer": found["layer"].values}] = found.values
        pairs.append([_levels(values.values[w], zmax[w]) for w in range(len(words))])
    empty = [[None] * maps.sizes["col"] for _ in range(maps.sizes["row"])]
    return {"words": words, "maps": pairs, "recorded": recorded, "zmax": zmax, "scale": [z / 255 for z in zmax],
            "empty": empty}


def _levels(values: np.ndarray, top: float) -> str:
    """Values in [0, `top`] as base64 bytes, 0-255 levels of `top` (row-major)."""
    q = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64) / top * 255), 0, 255).round().astype(np.uint8)
    return base64.b64encode(np.ascontiguousarray(q).tobytes()).decode("ascii")


def _summary(out: xr.Dataset, shown: xr.DataArray, mass: np.ndarray, start: tuple,
             attention: xr.Dataset | xr.DataArray | None, cells: list[tuple[str, int]],
             first_image: str) -> tuple[str, list, list | None]:
    """The summary plot (gate mass per step × layer, the shown step and layer marked, and the first
    word's mean attention map), its per-pair gate masses and mean maps."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    masses = np.round(mass, 4).tolist()  # (pair, step, layer)
    steps, layers = [int(x) for x in shown["step"].values], [int(x) for x in shown["layer"].values]
    maps = None
    if attention is not None:
        a = attention["attention"] if isinstance(attention, xr.Dataset) else attention
        word = str(a["word"].values[0])
        maps = [np.round(a.sel(prompt=p, seed=s, word=word).mean(("step", "layer")).values, 4).tolist()
                for p, s in cells]
    titles = ("gate mass (Σ over image tokens)",)
    titles += (f"attention to {word!r}, mean over steps and layers",) if maps else ()
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles)
    units = f"gate mass<br>Σ of g over<br>{shown.sizes['row'] * shown.sizes['col']} tokens"
    fig.add_trace(go.Heatmap(z=masses[start[0]], x=layers, y=steps, colorscale="Magma", zmin=0,
                             zmax=float(mass.max()) or 1.0,
                             colorbar={"title": {"text": units}, "x": 0.45 if maps else 1.0},
                             hovertemplate="step %{y}, layer %{x}: %{z}<extra></extra>", name="gate mass"),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=[layers[start[2]]], y=[steps[start[1]]], mode="markers", name="shown above",
                             cliponaxis=False,
                             marker={"symbol": "square-open", "size": 14, "color": "cyan", "line": {"width": 2}}),
                  row=1, col=1)
    # integer axes over exactly the cells (no padding, so no tick beyond the first or last step)
    fig.update_xaxes(title_text="layer", range=[layers[0] - 0.5, layers[-1] + 0.5], tickmode="array",
                     tickvals=int_ticks(layers), row=1, col=1)
    fig.update_yaxes(title_text="step", range=[steps[-1] + 0.5, steps[0] - 0.5], tickmode="array",
                     tickvals=int_ticks(steps), row=1, col=1)
    if maps:  # over the original image, in its pixels (as the panels above)
        height, width = out.sizes["y"], out.sizes["x"]
        rows, cols = shown.sizes["row"], shown.sizes["col"]
        fig.add_trace(go.Image(source=first_image), row=1, col=2)
        fig.add_trace(go.Heatmap(z=maps[start[0]], colorscale=_ATTENTION_COLOURS, zmin=0, name="attention",
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
