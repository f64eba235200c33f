import json
import os
import shutil

import numpy as np
import pytest

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


def test_pairs_figure_and_errors(pairs, tmp_path, tiny_lens):
    fig = pairs_figure(pairs)
    assert len(fig.axes) == 4 * 3 + 1  # 4 pairs × (original, edited, gate), and the gate's colour bar
    assert fig.axes[-1].get_ylabel() == "gate"
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
            np.testing.assert_allclose(np.array(json.loads(after)), g.sel(step=3).values, atol=1e-4)
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
            np.testing.assert_allclose(np.array(json.loads(page.evaluate(read_z))), mask.sel(blend_step=0).values,
                                       atol=1e-3)
            page.locator("#step").fill("3")
            np.testing.assert_allclose(np.array(json.loads(page.evaluate(read_z))), mask.sel(blend_step=3).values,
                                       atol=1e-3)
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
                                       m.sel(word="polyp", step=3, layer=1).values, atol=1e-4)
            page.locator("#word").select_option("1")
            np.testing.assert_allclose(np.array(json.loads(page.evaluate(read))),
                                       m.sel(word="a", step=3, layer=1).values, atol=1e-4)
            assert page.evaluate(shown) == {"pair": 3, "step": 3, "layer": 1, "word": "a"}
            page.locator("#step").fill("0")
            np.testing.assert_allclose(np.array(json.loads(page.evaluate(read))),
                                       m.sel(word="a", step=0, layer=1).values, atol=1e-4)
            page.locator("#step").fill("2")  # the maps skip step 2
            assert np.isnan(np.array(json.loads(page.evaluate(read)), dtype=float)).all()
            assert page.locator("#word-label").inner_text() == "not recorded at this step and layer"
            np.testing.assert_allclose(np.array(json.loads(page.evaluate(
                "JSON.stringify(document.getElementById('gate-explorer').data[1].z)"))),
                out["gate"].sel(prompt="a polyp", seed=5, step=2, layer=1).values, atol=1e-4)  # the gate still follows
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
