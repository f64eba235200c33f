"""Study figures (`dit_lens.views.study`), drawn from small synthetic study results."""

import json

import numpy as np
import pytest
import xarray as xr

from dit_lens.views.study import study_figure, tradeoff_figure

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
