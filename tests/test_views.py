"""Study figures (`dit_lens.views.study`), drawn from small synthetic study results; the x̂₀ lens figure and
explorer (`dit_lens.views.x0`), drawn from a tiny model's lens."""

import json

import numpy as np
import pytest
import xarray as xr

from dit_lens.views.study import study_figure, tradeoff_figure
from dit_lens.views.x0 import x0_distance, x0_lens_figure

WINDOWS = ["0-0.25", "0.25-0.5", "0.5-0.75", "0.75-1"]


def study_result(*, windows=tuple(WINDOWS), alphas=(3.0,), methods=("medsteer", "reprompt"), name="layer_sweep"):
    """A result shaped as `run_study` assembles it: the baseline's cells repeat along the window and α."""
    rng = np.random.default_rng(0)
    coords = {"method": list(methods), "pair": ["polyps -> normal cecum"], "window": list(windows),
              "alpha": list(alphas)}
    shape = tuple(len(v) for v in coords.values())
    data = {}
    for m in ("flip_rate", "bg_ssim"):
        v = rng.uniform(0.3, 0.9, shape)
        v[1:] = v[1:, :, :1, :1]  # reprompt has neither axis
        data.update({m: (tuple(coords), v), f"{m}_low": (tuple(coords), v - 0.05),
                     f"{m}_high": (tuple(coords), v + 0.05), f"{m}_n": (tuple(coords), np.full(shape, 8.0))})
    result = xr.Dataset(data, coords=coords)
    result.attrs.update(method_axes=json.dumps({"medsteer": ["window", "alpha"], "reprompt": []}),
                        study=json.dumps({"name": name}), metrics=json.dumps(["flip_rate", "bg_ssim"]))
    return result


def _joined(ax) -> list:
    """Lines on `ax` that join two or more data points (error bar caps and rules excluded)."""
    return [line for line in ax.get_lines()
            if line.get_linestyle() not in ("None", "none", "", " ") and len(line.get_xdata()) > 1
            and len(set(np.round(np.asarray(line.get_xdata(), float), 6))) > 1
            and line.get_marker() in ("o", "*")]


def test_layer_windows_are_categories_and_the_baseline_is_its_own_mark():
    result = study_result()
    fig = study_figure(result)
    axes = [ax for ax in fig.axes if ax.get_title() in ("flip_rate", "bg_ssim")]
    assert len(axes) == 2
    for ax, metric in zip(axes, ("flip_rate", "bg_ssim")):
        assert not _joined(ax)  # windows are never joined by a line as if continuous
        assert [t.get_text() for t in ax.get_xticklabels()] == WINDOWS + ["reprompt"]
        points = [line for line in ax.get_lines() if line.get_marker() in ("o", "*")]
        windows = [line for line in points if line.get_marker() == "o"]
        (star,) = [line for line in points if line.get_marker() == "*"]
        assert len(windows[0].get_xdata()) == len(WINDOWS)
        np.testing.assert_allclose(windows[0].get_ydata(), result[metric].sel({"method": "medsteer"}).squeeze().values)
        assert len(star.get_xdata()) == 1 and star.get_xdata()[0] > len(WINDOWS) - 1  # beside the windows
        baseline = result[metric].sel({"method": "reprompt"}).isel(pair=0, window=0, alpha=0)
        assert star.get_ydata()[0] == pytest.approx(float(baseline))
    labels = axes[0].get_legend_handles_labels()[1]
    assert "reprompt (no window)" in labels
    title = fig._suptitle.get_text()
    assert "layer_sweep" in title and "α=3" in title


def test_a_numeric_axis_is_still_drawn_as_lines_and_the_tradeoff_names_the_study():
    result = study_result(windows=("0-1",), alphas=(1.0, 2.0, 3.0))
    fig = study_figure(result)
    ax = fig.axes[0]
    assert _joined(ax)  # α is a number: its values are joined
    assert "layer_sweep" in fig._suptitle.get_text() and "α=" not in fig._suptitle.get_text()  # α is the axis
    both = study_result(alphas=(1.0, 3.0), name="alpha_windows")
    assert "study 'alpha_windows'" in tradeoff_figure(both)._suptitle.get_text()


@pytest.fixture(scope="module")
def x0_result():
    from dit_lens import load
    from dit_lens.model.builders import PixArtSpec, build_pixart
    from dit_lens.readouts.x0_lens import x0_lens

    lens = load(build_pixart(PixArtSpec(num_layers=3), seed=0))
    return x0_lens(lens, ["a polyp", "normal"], seeds=[0, 2], num_inference_steps=4, progress=False)


def test_x0_figure_lays_out_steps_by_layers_and_ends_each_row_on_the_models_x0(x0_result):
    fig = x0_lens_figure(x0_result, prompt="normal", seed=2, max_steps=3)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:5] == ["generated", "after block 0", "after block 1", "after block 2", "model's x̂₀"]
    rows = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert rows == ["step 0 (t=999)", "step 2 (t=500)", "step 3 (t=250)"]
    cell = x0_result.sel(prompt="normal", seed=2)
    drawn = [np.asarray(ax.images[0].get_array()) for ax in fig.axes]
    np.testing.assert_array_equal(drawn[0], cell.generated.values)
    np.testing.assert_array_equal(drawn[1 + 4 + 2], cell.image.sel(step=2, layer=2).values)  # row 2, block 2
    np.testing.assert_array_equal(drawn[-1], cell.image_final.sel(step=3).values)
    far = x0_distance(x0_result).sel(prompt="normal", seed=2, step=0)
    assert float(far.sel(layer=0)) > 1e-3 and float(far.sel(layer=2)) < 1e-5  # the last block is the output
    assert [t.get_text() for t in fig.axes[1].texts] == [f"|Δ| {float(far.sel(layer=0)):.3f}"]
    with pytest.raises(ValueError, match="takes the Dataset returned by x0_lens"):
        x0_lens_figure(x0_result.drop_vars("image_final"))
    with pytest.raises(ValueError, match="seed 7 is not in the result"):
        x0_lens_figure(x0_result, seed=7)


def _x0_page_data(page: str) -> dict:
    start = page.index("const DATA = ") + len("const DATA = ")
    return json.JSONDecoder().raw_decode(page, start)[0]


def _png_pixels(uri: str) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))), dtype=np.float64) / 255


def test_x0_explorer_holds_every_run_step_and_layer(x0_result, tmp_path):
    from dit_lens.views.explorer import write_explorer

    path = write_explorer(x0_result, tmp_path / "sub" / "x0.html")  # the explorer hands an x0 lens to its page
    page = path.read_text()
    assert "<script src=" not in page and 'id="step"' in page and 'id="layer"' in page and 'id="run"' in page
    data = _x0_page_data(page)
    assert data["steps"] == [0, 1, 2, 3] and data["layers"] == [0, 1, 2]
    assert len(data["lens"]) == 4 and len(data["lens"][0]) == 4 and len(data["lens"][0][0]) == 3
    # run 3 is ("normal", seed 2); each cell's picture is that cell's image to 8 bits
    run = x0_result.sel(prompt="normal", seed=2)
    eight_bits = 0.5 / 255 + 1e-6
    np.testing.assert_allclose(_png_pixels(data["lens"][3][1][0]), run.image.sel(step=1, layer=0).values,
                               atol=eight_bits)
    np.testing.assert_allclose(_png_pixels(data["final"][3][2]), run.image_final.sel(step=2).values, atol=eight_bits)
    np.testing.assert_allclose(np.array(data["distance"][3]),
                               x0_distance(x0_result).sel(prompt="normal", seed=2).values, atol=1e-5)
    with pytest.raises(ValueError, match="takes neither"):
        write_explorer(x0_result, tmp_path / "x0.html", judge=lambda images: images)


@pytest.mark.browser
def test_x0_explorer_sliders_change_the_shown_prediction(x0_result, tmp_path):
    import shutil

    from dit_lens.views.x0 import write_x0_explorer

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    path = write_x0_explorer(x0_result, tmp_path / "x0.html")
    data = _x0_page_data(path.read_text())
    assert data["lens"][1][0][0] != data["lens"][1][0][2]  # the cells differ, so the check can fail
    shown = "document.getElementById('x0-explorer').data[0].source"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(path.as_uri())
            page.wait_for_selector("#x0-explorer .main-svg")
            assert page.evaluate(shown) == data["lens"][0][0][2]  # opens on the last block of the first step
            page.locator("#run").select_option("1")
            page.locator("#layer").fill("0")
            assert page.evaluate(shown) == data["lens"][1][0][0]
            page.locator("#step").fill("3")
            assert page.evaluate(shown) == data["lens"][1][3][0]
            assert page.evaluate("document.getElementById('x0-explorer').data[1].source") == data["final"][1][3]
            assert page.locator("#step-label").inner_text().startswith("3 ")
        finally:
            browser.close()
