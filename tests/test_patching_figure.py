"""The patching figure draws what the result holds: the seed-mean effect on one diverging scale, the clean and
corrupt images of the chosen seed, and a title that says what was patched."""

import numpy as np
import pytest

from dit_lens import load, patching
from dit_lens.testing import PixArtSpec, build_pixart
from dit_lens.views.patching import patching_figure


def brightness(images):
    return images.astype(np.float64).mean(axis=(1, 2, 3))


@pytest.fixture(scope="module")
def lens():
    return load(build_pixart(PixArtSpec(num_layers=2, num_heads=2, head_dim=8, sample_size=8, patch_size=2), seed=0))


@pytest.fixture(scope="module")
def cell_result(lens):
    return patching(lens, clean="a red polyp", corrupt="a pale mucosa", seeds=[0, 1], metric=brightness,
                    num_inference_steps=2, progress=False)


def test_the_cell_heatmap_is_the_seed_mean_effect_on_a_scale_centred_on_zero(cell_result):
    fig = patching_figure(cell_result, seed=1)
    heat = fig.axes[2].images[0]
    mean = cell_result.effect.mean("seed").transpose("step", "layer").values
    np.testing.assert_array_equal(heat.get_array(), mean)
    low, high = heat.get_clim()
    assert low == -high and high == pytest.approx(np.abs(mean).max())
    clean = fig.axes[0].images[0].get_array()
    np.testing.assert_array_equal(clean, np.clip(cell_result.image_clean.sel(seed=1).values, 0, 1))
    assert "seed 1" in fig.axes[0].get_title()
    title = fig._suptitle.get_text()
    assert "attn2" in title and "brightness" in title and "'a red polyp'" in title


def test_layer_grid_bars_are_the_seed_mean_with_every_seed_drawn(lens):
    result = patching(lens, clean="a red polyp", corrupt="a pale mucosa", seeds=[0, 1], metric=brightness,
                      grid="layer", num_inference_steps=2, progress=False)
    fig = patching_figure(result)
    ax = fig.axes[2]
    heights = [bar.get_height() for bar in ax.patches]
    np.testing.assert_allclose(heights, result.effect.mean("seed").values)
    dots = [line for line in ax.lines if line.get_marker() == "."]
    assert len(dots) == 2  # one line of dots per seed


def test_window_bars_are_labelled_by_their_windows(lens):
    result = patching(lens, clean="a red polyp", corrupt="a pale mucosa", seeds=[0], metric=brightness,
                      grid=[(None, None), ((0, 0.5), [1])], num_inference_steps=2, progress=False)
    fig = patching_figure(result)
    labels = [t.get_text() for t in fig.axes[2].get_xticklabels()]
    assert labels == ["blocks all\nsteps all", "blocks 0-0.5\nsteps 1"]


def test_bad_input_is_refused(cell_result):
    with pytest.raises(ValueError, match="seed 7 is not among"):
        patching_figure(cell_result, seed=7)
    with pytest.raises(ValueError, match="dit_lens.patching"):
        patching_figure(cell_result.drop_vars("effect"))


def test_the_explorer_offers_the_mean_and_every_seed_and_shows_one_at_a_time(cell_result, tmp_path):
    from dit_lens import write_explorer
    from dit_lens.views.patching import patching_explorer_figure

    fig = patching_explorer_figure(cell_result)
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["mean of 2 seeds", "seed 0", "seed 1"]
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    np.testing.assert_allclose(heatmaps[0].z, cell_result.effect.mean("seed").transpose("step", "layer").values)
    np.testing.assert_allclose(heatmaps[2].z, cell_result.effect.sel(seed=1).transpose("step", "layer").values)
    np.testing.assert_allclose(heatmaps[2].customdata,
                               cell_result.metric_patched.sel(seed=1).transpose("step", "layer").values)
    for button in buttons:  # each entry shows its effect and its seed's two images, nothing else
        visible = button.args[0]["visible"]
        assert sum(visible) == 3 and sum(v for v, t in zip(visible, fig.data) if t.type == "image") == 2
    seed1 = buttons[2].args[0]["visible"]
    assert [t.name for v, t in zip(seed1, fig.data) if v and t.type == "image"][0].startswith("clean, seed 1")
    page = write_explorer(cell_result, tmp_path / "patching.html")
    assert "patching-explorer" in page.read_text() and "attn2" in page.read_text()
    with pytest.raises(ValueError, match="max_seeds"):
        patching_explorer_figure(cell_result, max_seeds=0)


def test_the_explorer_draws_bars_for_a_layer_grid(lens):
    from dit_lens.views.patching import patching_explorer_figure

    result = patching(lens, clean="a red polyp", corrupt="a pale mucosa", seeds=[0], metric=brightness,
                      grid="layer", num_inference_steps=2, progress=False)
    bars = [t for t in patching_explorer_figure(result).data if t.type == "bar"]
    np.testing.assert_allclose(bars[1].y, result.effect.sel(seed=0).values)
