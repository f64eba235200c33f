import base64
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import xarray as xr
from PIL import Image

from dit_lens.views.explorer import write_explorer
from dit_lens.views.figures import gate_figure, pairs_figure
from dit_lens.interventions.generate import generate
from dit_lens.interventions.steer import Steer
from test_steer import unit_vector


@pytest.fixture
def pairs(tiny_lens):
    steer = Steer(unit_vector(4, 3, 16, seed=0), alpha=3.0, name="test")
    return generate(tiny_lens, ["a polyp", "normal"], seeds=[0, 5], steer=steer,
                    num_inference_steps=4, record_gates=True, progress=False)


def test_gate_figure_lays_out_steps_by_layers(pairs, tmp_path):
    fig = gate_figure(pairs, prompt="normal", seed=5, max_steps=3)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:2] == ["original", "edited"]
    assert titles.count("layer 0") == 1 and "layer 2" in titles
    assert sum(1 for ax in fig.axes[2:] if ax.get_ylabel().startswith("step")) == 3
    fig.savefig(tmp_path / "gates.png")
    assert (tmp_path / "gates.png").stat().st_size > 1000


def test_gate_figure_outlines_the_lesion_and_gives_the_gate_share_inside(pairs):
    height, width = pairs.sizes["y"], pairs.sizes["x"]
    rows, cols = pairs.sizes["row"], pairs.sizes["col"]
    mask = np.zeros((height, width), bool)
    mask[: height // 2, 3 : width // 2 + 1] = True  # not on token borders: tokens partly inside count in part
    fig = gate_figure(pairs, prompt="normal", seed=5, masks=mask)
    panels = [ax for ax in fig.axes[2:] if ax.get_images()]
    steps, layers = list(pairs["step"].values), list(pairs["layer"].values)
    assert len(panels) == len(steps) * len(layers)
    inside = mask.reshape(rows, height // rows, cols, width // cols).mean(axis=(1, 3))  # each token's share
    shares = []
    for ax, (step, layer) in zip(panels, [(s, l) for s in steps for l in layers]):
        g = pairs["gate"].sel(prompt="normal", seed=5, step=step, layer=layer).values
        (text,) = [t.get_text() for t in ax.texts]
        if g.sum() == 0:
            assert text == "no gate"
            continue
        want = (g * inside).sum() / g.sum()
        assert text == f"in lesion {want:.2f}" and 0 <= want <= 1
        shares.append(want)
        assert ax.collections  # the lesion's outline
    assert len(set(np.round(shares, 2))) > 1  # the share is read per map
    assert f"lesion (cyan) covers {mask.mean():.2f} of the image" in fig._suptitle.get_text()  # the baseline
    assert fig.axes[0].collections and fig.axes[0].get_title() == "original (cyan: lesion)"
    # the same from a segmenter run on the original, or from per-pair masks (prompts × seeds, in order)
    by_segmenter = gate_figure(pairs, prompt="normal", seed=5, segmenter=lambda images: np.stack([mask] * len(images)))
    per_pair = gate_figure(pairs, prompt="normal", seed=5, masks=np.stack([~mask, ~mask, ~mask, mask]))
    for other in (by_segmenter, per_pair):
        assert [t.get_text() for ax in other.axes for t in ax.texts] == [t.get_text() for ax in fig.axes
                                                                           for t in ax.texts]
    assert "gate per token" in fig.axes[-1].get_ylabel()
    none = gate_figure(pairs, prompt="normal", seed=5, masks=np.zeros_like(mask))  # the segmenter found nothing
    assert {t.get_text() for ax in none.axes for t in ax.texts} == {"no lesion"}
    assert "no lesion in the original's mask" in none._suptitle.get_text()
    with pytest.raises(ValueError, match=r"masks= holds 2 masks, but the result has 4 pairs"):
        gate_figure(pairs, masks=np.stack([mask, mask]))


def test_gate_figure_draws_the_layers_asked_for(pairs):
    fig = gate_figure(pairs, layers=[2, 0])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title().startswith("layer")]
    assert titles == ["layer 2", "layer 0"]
    assert "layers 0, 2 of 0-2" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match=r"layers=\[7\]: the result has gates for layers 0-2"):
        gate_figure(pairs, layers=[7])


def test_pairs_figure_title_fits_and_regions_are_outlined(pairs):
    two = pairs.drop_vars("gate")  # two columns, as a baseline without gates draws
    region = np.zeros((2, 2, pairs.sizes["y"], pairs.sizes["x"]), bool)
    region[..., 4:10, 2:12] = True
    two["region"] = (("prompt", "seed", "y", "x"), region)
    fig = pairs_figure(two)
    fig.canvas.draw()
    title = fig._suptitle.get_window_extent()
    assert 0 <= title.x0 and title.x1 <= fig.bbox.width  # nothing cut at either edge
    assert "dashed: the region the edit was held to" in fig._suptitle.get_text()
    images = [ax for ax in fig.axes if ax.get_images()]
    assert len(images) == 8 and all(len(ax.collections) == 1 for ax in images)  # each image's region outline
    assert not any(ax.collections for ax in pairs_figure(pairs).axes[:-1])  # no region: nothing drawn


def test_pairs_figure_and_errors(pairs, tmp_path, tiny_lens):
    fig = pairs_figure(pairs)
    assert len(fig.axes) == 4 * 3 + 1  # 4 pairs × (original, edited, gate), and the gate's colour bar
    assert fig.axes[-1].get_ylabel().startswith("gate per token, Σ over 4 steps × 3 layers")  # the sum's units
    height, width = pairs["image"].shape[-3:-1]
    for ax in fig.axes[:-1]:  # every panel in the image's pixels, the gate stretched over them
        assert [im.get_extent() for im in ax.get_images()][-1] == [0, width, height, 0]
    fig.savefig(tmp_path / "pairs.png")
    judged = pairs_figure(pairs, judge=lambda images: np.tile([0.2, 0.8], (len(images), 1)))
    assert judged.axes[0].get_title() == "original · seed 0\n1 0.80"
    with pytest.raises(ValueError, match="seed 9 is not in the result"):
        gate_figure(pairs, seed=9)
    blended = generate(tiny_lens, ["a polyp"], seeds=[0, 5], steer=Steer(unit_vector(4, 3, 16, seed=0), alpha=3.0),
                       num_inference_steps=4, record_gates=True, blend=0.9, progress=False)
    fig = pairs_figure(blended)
    assert [ax.get_title() for ax in fig.axes][3] == "blend mask over edited\n(1: edited kept)"
    assert len(fig.axes) == 2 * 4 + 2  # and two colour bars
    assert "Blend: threshold=0.9" in fig._suptitle.get_text()
    assert "MedSteer: α=3 at attn2, all layers, all steps, paper update" in fig._suptitle.get_text()
    plain = generate(tiny_lens, "x", seeds=[0], num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="record_gates=True"):
        gate_figure(plain)


def test_explorer_is_self_contained(pairs, tmp_path):
    path = write_explorer(pairs, tmp_path / "sub" / "explorer.html")
    page = path.read_text()
    assert "<script src=" not in page  # plotly.js is inlined: works offline
    assert "Plotly.restyle" in page and 'id="step"' in page and 'id="layer"' in page


def _quantum(values) -> float:
    """How far a map the explorer embeds (8-bit levels of its colour scale's maximum) may be off."""
    return float(np.max(values)) / 510 + 1e-6


def _page_data(page: str) -> dict:
    """The DATA object the explorer's script reads."""
    start = page.index("const DATA = ") + len("const DATA = ")
    return json.JSONDecoder().raw_decode(page, start)[0]


def _plot(page: str, div: str) -> tuple[list, dict]:
    """The traces and layout the page hands plotly for the plot in `div`."""
    at = page.index(f'"{div}",', page.index("Plotly.newPlot(", page.index(f'id="{div}"'))) + len(div) + 3
    decoder = json.JSONDecoder()
    data, end = decoder.raw_decode(page, page.index("[", at))
    layout, _ = decoder.raw_decode(page, page.index("{", end))
    return data, layout


def _maps(packed: str, top: float, shape: tuple) -> np.ndarray:
    return np.frombuffer(base64.b64decode(packed), dtype=np.uint8).reshape(shape) * (top / 255)


def _demo_shaped(pairs: int = 4, steps: int = 20, layers: int = 12) -> xr.Dataset:
    """A result shaped as the demo's (64×64 images, an 8×8 token grid), smooth images, random gates."""
    rng = np.random.default_rng(0)
    seeds = list(range(pairs))
    yy, xx = np.mgrid[0:64, 0:64] / 63
    image = np.stack([0.8 * yy, 0.5 * xx, 0.3 + 0.2 * xx * yy], -1)  # (y, x, rgb)
    images = np.broadcast_to(image, (1, pairs, 2, 64, 64, 3)) + rng.normal(0, 0.02, (1, pairs, 2, 64, 64, 3))
    gates = np.maximum(rng.normal(0, 1, (1, pairs, steps, layers, 8, 8)), 0)
    return xr.Dataset(
        {"image": (("prompt", "seed", "branch", "y", "x", "rgb"), np.clip(images, 0, 1)),
         "gate": (("prompt", "seed", "step", "layer", "row", "col"), gates)},
        coords={"prompt": ["a polyp"], "seed": seeds, "branch": ["original", "edited"], "step": list(range(steps)),
                "layer": list(range(layers)), "timestep": ("step", list(range(999, 999 - 50 * steps, -50)))},
    )


def test_explorer_opens_on_the_cell_with_the_most_gate_mass(pairs, tmp_path):
    page = write_explorer(pairs, tmp_path / "explorer.html").read_text()
    mass = pairs["gate"].sum(("row", "col")).transpose("prompt", "seed", "step", "layer").values
    mass = mass.reshape(-1, *mass.shape[2:])  # (pair: prompts × seeds in the page's order, step, layer)
    pair, step, layer = np.unravel_index(np.argmax(mass), mass.shape)
    assert (step, layer) != (0, 0) and mass[pair, step, layer] > mass[pair, 0, 0]  # the old opening was dark
    assert _page_data(page)["start"] == {"pair": pair, "step": step, "layer": layer}
    assert re.search(rf'id="step" type="range" min="0" max="3" value="{step}"', page)
    assert re.search(rf'id="layer" type="range" min="0" max="2" value="{layer}"', page)
    assert re.findall(r'<option value="(\d+)" selected>', page) == [str(pair)]
    gate = _plot(page, "gate-explorer")[0][1]  # the map drawn before any control moves is that cell's
    want = pairs["gate"].isel(prompt=pair // 2, seed=pair % 2, step=step, layer=layer).values
    np.testing.assert_allclose(np.array(gate["z"]), want, atol=_quantum(pairs["gate"]))


def test_explorer_overlay_is_light_and_the_gate_mass_axes_are_integer(pairs, tmp_path):
    page = write_explorer(pairs, tmp_path / "explorer.html").read_text()
    traces, _ = _plot(page, "gate-explorer")
    scale = traces[1]["colorscale"]  # the gate over the original: no gate leaves the image as it is
    assert traces[1]["name"] == "gate" and scale[0][1].replace(" ", "").endswith(",0)")
    assert all(float(c.rstrip(")").split(",")[-1]) <= 0.85 for _, c in scale)
    _, layout = _plot(page, "gate-summary")
    steps, layers = [int(s) for s in pairs["step"].values], [int(x) for x in pairs["layer"].values]
    assert layout["yaxis"]["range"] == [steps[-1] + 0.5, steps[0] - 0.5]  # no padding: no tick at -1
    assert layout["xaxis"]["range"] == [layers[0] - 0.5, layers[-1] + 0.5]
    assert set(layout["yaxis"]["tickvals"]) <= set(steps) and set(layout["xaxis"]["tickvals"]) <= set(layers)


def test_explorer_embeds_png_images_and_8bit_maps(pairs, tmp_path):
    page = write_explorer(pairs, tmp_path / "explorer.html").read_text()
    data = _page_data(page)
    uri = data["images"][3][1]  # "normal" · seed 5, the edited image
    assert uri.startswith("data:image/png;base64,")
    png = base64.b64decode(uri.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    want = (np.clip(pairs["image"].sel(prompt="normal", seed=5, branch="edited").values, 0, 1) * 255).round()
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), want.astype(np.uint8))  # lossless
    gate = pairs["gate"].sel(prompt="normal", seed=5).transpose("step", "layer", "row", "col")
    np.testing.assert_allclose(_maps(data["gates"][3], data["gate_scale"] * 255, gate.shape), gate.values,
                               atol=_quantum(pairs["gate"]))


def test_explorer_file_is_small_at_the_demos_shape(tmp_path):
    import plotly.offline

    out = _demo_shaped(pairs=4)
    size = write_explorer(out, tmp_path / "explorer.html").stat().st_size
    rest = size - len(plotly.offline.get_plotlyjs().encode())  # beside plotly.js, inlined to work offline
    assert rest < 400_000  # images and gates as numbers in text took 1.8 MB here


def test_explorer_script_shows_the_chosen_cell(worded, tmp_path):
    """The page's own script, run by node against a stand-in for the DOM and plotly."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    out, maps = worded
    page = write_explorer(out, tmp_path / "explorer.html", attention=maps).read_text()
    script = page[page.rindex("<script>") + len("<script>"):page.rindex("</script>")]
    harness = tmp_path / "harness.js"
    harness.write_text(_HARNESS)
    (tmp_path / "page.js").write_text(script)
    controls = {"pair": "3", "step": "2", "layer": "1", "word": "0"}
    run = subprocess.run([node, str(harness), str(tmp_path / "page.js"), json.dumps(controls)], capture_output=True,
                         text=True, timeout=60, check=True)
    shown = json.loads(run.stdout)
    assert json.loads(shown["shown"]) == {"pair": 3, "step": 2, "layer": 1, "word": "polyp"}
    np.testing.assert_allclose(np.array(shown["explorer"][1]["z"]),
                               out["gate"].sel(prompt="a polyp", seed=5, step=2, layer=1).values,
                               atol=_quantum(out["gate"]))
    assert shown["explorer"][0]["source"] == _page_data(page)["images"][3][0]
    assert np.isnan(np.array(shown["explorer"][5]["z"], dtype=float)).all()  # the maps skip step 2
    controls["step"] = "3"
    run = subprocess.run([node, str(harness), str(tmp_path / "page.js"), json.dumps(controls)], capture_output=True,
                         text=True, timeout=60, check=True)
    np.testing.assert_allclose(np.array(json.loads(run.stdout)["explorer"][5]["z"]),
                               maps["attention"].sel(prompt="a polyp", seed=5, word="polyp", step=3, layer=1).values,
                               atol=_quantum(maps["attention"].sel(word="polyp")))


def test_explorer_script_shows_the_blend_mask_of_the_chosen_step(tiny_lens, tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    out = generate(tiny_lens, ["a polyp"], seeds=[0], steer=Steer(unit_vector(4, 3, 16, seed=0), alpha=3.0),
                   num_inference_steps=4, record_gates=True, blend=0.9, progress=False)
    page = write_explorer(out, tmp_path / "explorer.html").read_text()
    (tmp_path / "page.js").write_text(page[page.rindex("<script>") + len("<script>"):page.rindex("</script>")])
    (tmp_path / "harness.js").write_text(_HARNESS)
    mask = out["blend_mask"].sel(prompt="a polyp", seed=0)
    for step in (0, 3):
        controls = json.dumps({"pair": "0", "step": str(step), "layer": "1"})
        run = subprocess.run([node, str(tmp_path / "harness.js"), str(tmp_path / "page.js"), controls],
                             capture_output=True, text=True, timeout=60, check=True)
        np.testing.assert_allclose(np.array(json.loads(run.stdout)["explorer"][4]["z"]),
                                   mask.sel(blend_step=step).values, atol=_quantum(1.0))


_HARNESS = """
const fs = require("fs");
const script = fs.readFileSync(process.argv[2], "utf8");
const controls = JSON.parse(process.argv[3]);
const elements = {};
function element(id) {
  if (!(id in elements)) elements[id] = {value: controls[id], dataset: {}, textContent: "", data: [],
                                         addEventListener() {}};
  return elements[id];
}
globalThis.document = {getElementById: (id) => (id in controls || !["pair", "step", "layer", "word"].includes(id))
                                               ? element(id) : null};
globalThis.Plotly = {restyle(gd, update, traces) {
  for (const t of traces) {
    gd.data[t] = gd.data[t] || {};
    for (const [key, values] of Object.entries(update)) gd.data[t][key] = values[0];
  }
}};
(0, eval)(script);
const gd = element("gate-explorer");
console.log(JSON.stringify({explorer: gd.data, shown: gd.dataset.shown}));
"""


def _chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    return found


@pytest.mark.browser
def test_explorer_renders_and_step_control_changes_the_map(pairs, tmp_path):
    executable = _chromium()
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    # make the gate at step 0 and step 3 of layer 1 differ, so the check can fail
    g = pairs["gate"].sel(prompt="a polyp", seed=0, layer=1)
    assert not np.array_equal(g.sel(step=0).values, g.sel(step=3).values)
    path = write_explorer(pairs, tmp_path / "explorer.html")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    read_z = "JSON.stringify(document.getElementById('gate-explorer').data[1].z)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=args)
        try:
            page = browser.new_page()
            page.goto(path.as_uri())
            page.wait_for_selector("#gate-explorer .main-svg")
            assert page.locator("#gate-explorer .heatmaplayer, #gate-explorer .imagelayer").count() > 0
            page.locator("#layer").fill("1")
            before = page.evaluate(read_z)
            page.locator("#step").fill("3")
            after = page.evaluate(read_z)
            assert before != after
            np.testing.assert_allclose(np.array(json.loads(after)), g.sel(step=3).values, atol=_quantum(pairs["gate"]))
            assert page.locator("#step-label").inner_text().startswith("3 ")
        finally:
            browser.close()


@pytest.mark.browser
def test_explorer_shows_the_blend_mask_of_the_chosen_step(tiny_lens, tmp_path):
    executable = _chromium()
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    out = generate(tiny_lens, ["a polyp"], seeds=[0], steer=Steer(unit_vector(4, 3, 16, seed=0), alpha=3.0),
                   num_inference_steps=4, record_gates=True, blend=0.9, progress=False)
    mask = out["blend_mask"].sel(prompt="a polyp", seed=0)
    assert not np.allclose(mask.sel(blend_step=0).values, mask.sel(blend_step=3).values, atol=1e-3)
    path = write_explorer(out, tmp_path / "explorer.html")
    read_z = "JSON.stringify(document.getElementById('gate-explorer').data[4].z)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(path.as_uri())
            page.wait_for_selector("#gate-explorer .main-svg")
            page.locator("#step").fill("0")  # the page opens on the step with the most gate mass
            np.testing.assert_allclose(np.array(json.loads(page.evaluate(read_z))), mask.sel(blend_step=0).values,
                                       atol=_quantum(1.0))
            page.locator("#step").fill("3")
            np.testing.assert_allclose(np.array(json.loads(page.evaluate(read_z))), mask.sel(blend_step=3).values,
                                       atol=_quantum(1.0))
        finally:
            browser.close()


@pytest.fixture
def worded(tiny_lens):
    """Pairs and the attention maps of the same prompts and seeds (maps at steps 0, 1, 3 only)."""
    from dit_lens.readouts.attention_maps import attention_maps

    steer = Steer(unit_vector(4, 3, 16, seed=0), alpha=3.0, name="test")
    prompts, seeds = ["a red polyp", "a polyp"], [0, 5]
    out = generate(tiny_lens, prompts, seeds=seeds, steer=steer, num_inference_steps=4, record_gates=True,
                   progress=False)
    maps = attention_maps(tiny_lens, prompts, seeds=seeds, words=["polyp", "a"], num_inference_steps=4,
                          steps=[0, 1, 3], progress=False)
    return out, maps


def test_attention_figure_shows_each_word_and_a_step_by_layer_grid(worded, tmp_path):
    from dit_lens.views.attention import attention_figure

    _, maps = worded
    fig = attention_figure(maps, prompt="a polyp", seed=5, word="a", max_steps=2)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["generated", "polyp", "a"]
    assert sum(1 for ax in fig.axes if ax.get_ylabel().startswith("step")) == 2
    assert titles.count("layer 0") == 1 and "layer 2" in titles
    grid = [ax for ax in fig.axes[3:] if ax.images]
    assert len(grid) == 2 * 3
    np.testing.assert_allclose(grid[-1].images[0].get_array(),
                               maps["attention"].sel(prompt="a polyp", seed=5, word="a", step=3, layer=2).values)
    fig.savefig(tmp_path / "attention.png")
    assert (tmp_path / "attention.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="word 'cecum' is not in these maps"):
        attention_figure(maps, word="cecum")


def test_attention_figure_has_no_empty_band_or_row(worded):
    from dit_lens.views.attention import attention_figure

    _, maps = worded
    fig = attention_figure(maps.sel(word=["polyp"]), prompt="a polyp", seed=5)  # one word, as the demo draws
    fig.canvas.draw()
    boxes = [ax.get_position() for ax in fig.axes]
    heights = np.linspace(min(b.y0 for b in boxes), max(b.y1 for b in boxes), 400)
    covered = np.array([sum(b.width for b in boxes if b.y0 <= y <= b.y1) for y in heights])  # figure widths
    blank = max(len(run) for run in "".join("0" if c == 0 else "1" for c in covered).split("1"))
    assert blank / len(heights) < 0.03  # no blank band across the figure, only the gaps between rows
    assert (covered >= 0.5).mean() > 0.8  # and no row holding a panel or two in a wide figure
    title = fig._suptitle.get_window_extent()
    assert 0 <= title.x0 and title.x1 <= fig.bbox.width


def test_explorer_with_attention_needs_the_same_pairs(worded, pairs, tmp_path):
    out, maps = worded
    page = write_explorer(out, tmp_path / "e.html", attention=maps).read_text()
    assert 'id="word"' in page and ">polyp</option>" in page
    with pytest.raises(ValueError, match=r"attention maps lack the pairs \[\('normal', 0\)"):
        write_explorer(pairs, tmp_path / "f.html", attention=maps)
    plain = write_explorer(out, tmp_path / "g.html").read_text()
    assert 'id="word"' not in plain


@pytest.mark.browser
def test_explorer_word_selector_follows_step_and_layer(worded, tmp_path):
    executable = _chromium()
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    out, maps = worded
    m = maps["attention"].sel(prompt="a polyp", seed=5)
    assert not np.allclose(m.sel(word="polyp", step=3, layer=1).values, m.sel(word="a", step=3, layer=1).values)
    tolerance = {w: _quantum(maps["attention"].sel(word=w)) for w in ("polyp", "a")}
    path = write_explorer(out, tmp_path / "explorer.html", attention=maps)
    read = "JSON.stringify(document.getElementById('gate-explorer').data[5].z)"
    shown = "JSON.parse(document.getElementById('gate-explorer').dataset.shown)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(path.as_uri())
            page.wait_for_selector("#gate-explorer .main-svg")
            page.locator("#pair").select_option("3")  # "a polyp" · seed 5
            page.locator("#layer").fill("1")
            page.locator("#step").fill("3")
            np.testing.assert_allclose(np.array(json.loads(page.evaluate(read))),
                                       m.sel(word="polyp", step=3, layer=1).values, atol=tolerance["polyp"])
            page.locator("#word").select_option("1")
            np.testing.assert_allclose(np.array(json.loads(page.evaluate(read))),
                                       m.sel(word="a", step=3, layer=1).values, atol=tolerance["a"])
            assert page.evaluate(shown) == {"pair": 3, "step": 3, "layer": 1, "word": "a"}
            page.locator("#step").fill("0")
            np.testing.assert_allclose(np.array(json.loads(page.evaluate(read))),
                                       m.sel(word="a", step=0, layer=1).values, atol=tolerance["a"])
            page.locator("#step").fill("2")  # the maps skip step 2
            assert np.isnan(np.array(json.loads(page.evaluate(read)), dtype=float)).all()
            assert page.locator("#word-label").inner_text() == "not recorded at this step and layer"
            np.testing.assert_allclose(np.array(json.loads(page.evaluate(
                "JSON.stringify(document.getElementById('gate-explorer').data[1].z)"))),
                out["gate"].sel(prompt="a polyp", seed=5, step=2, layer=1).values,
                atol=_quantum(out["gate"]))  # the gate still follows
        finally:
            browser.close()


@pytest.mark.browser
def test_explorer_summary_and_verdicts_follow_the_chosen_pair(pairs, tmp_path):
    executable = _chromium()
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

    class Judge:  # reads the mean red: a real (if simple) verdict that differs between images
        labels = ["dark", "bright"]

        def __call__(self, images):
            p = np.clip(images[..., 0].mean(axis=(1, 2)), 0, 1)
            return np.stack([1 - p, p], axis=1)

    path = write_explorer(pairs, tmp_path / "explorer.html", judge=Judge())
    mass = pairs["gate"].sel(prompt="a polyp").sum(("row", "col"))  # (seed, step, layer)
    seeds = [int(s) for s in pairs["seed"].values]
    assert not np.allclose(mass.sel(seed=seeds[0]).values, mass.sel(seed=seeds[1]).values)
    read_mass = "JSON.stringify(document.getElementById('gate-summary').data[0].z)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(path.as_uri())
            page.wait_for_selector("#gate-summary .main-svg")
            for i, seed in enumerate(seeds[:2]):
                page.select_option("#pair", str(i))
                np.testing.assert_allclose(np.array(json.loads(page.evaluate(read_mass))),
                                           mass.sel(seed=seed).transpose("step", "layer").values, atol=1e-3)
                image = pairs["image"].sel(prompt="a polyp", seed=seed)
                want = Judge()(image.sel(branch=["original", "edited"]).values)
                text = page.locator("#verdict").inner_text()
                assert f"({want[0].max():.2f})" in text and f"({want[1].max():.2f})" in text
            page.locator("#layer").fill("1")
            page.locator("#step").fill("2")
            marker = page.evaluate("JSON.stringify([document.getElementById('gate-summary').data[1].x, "
                                   "document.getElementById('gate-summary').data[1].y])")
            assert json.loads(marker) == [[1], [2]]
            page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
            assert (tmp_path / "explorer.png").stat().st_size > 10_000
        finally:
            browser.close()
