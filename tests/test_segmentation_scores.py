"""segmentation_scores (dit_lens.metrics.segmentation) against values computed by hand on tiny arrays."""

import numpy as np
import pytest
import xarray as xr

from dit_lens.metrics.segmentation import segmentation_scores, upsample


def test_metrics_by_hand_at_the_masks_size():
    maps = np.array([[[0.9, 0.1], [0.2, 0.1]]])  # mean 0.325: only the top-left pixel is predicted
    masks = np.array([[[True, True], [False, False]]])
    s = segmentation_scores(maps, masks, n_boot=50)
    assert s["pixel_accuracy"].item() == pytest.approx(3 / 4)
    assert s["lesion_iou"].item() == pytest.approx(1 / 2)  # 1 shared of 2 in the union
    assert s["background_iou"].item() == pytest.approx(2 / 3)  # 2 shared of 3
    assert s["miou"].item() == pytest.approx((1 / 2 + 2 / 3) / 2)
    # ranked 0.9 (lesion), 0.2 (bg), 0.1 (lesion, bg tied): AP = 0.5·1 + 0.5·(2/4)
    assert s["ap"].item() == pytest.approx(0.75)
    assert s.attrs["threshold"] == "mean" and s.attrs["n"] == 1 and "bilinear" in s.attrs["upsampling"]


def test_a_fixed_threshold_and_the_summary_over_images():
    maps = np.array([[[0.9, 0.1], [0.2, 0.1]], [[0.0, 0.0], [0.0, 1.0]]])
    masks = np.array([[[True, True], [False, False]], [[False, False], [False, True]]])
    s = segmentation_scores(maps, masks, threshold=0.15, n_boot=200)
    # image 0: predicted {0.9, 0.2}: accuracy 2/4, lesion IoU 1/3, background IoU 1/3; image 1: perfect
    np.testing.assert_allclose(s["pixel_accuracy"].values, [0.5, 1.0])
    np.testing.assert_allclose(s["lesion_iou"].values, [1 / 3, 1.0])
    np.testing.assert_allclose(s["background_iou"].values, [1 / 3, 1.0])
    summary = s["summary"].sel(metric="lesion_iou")
    assert summary.sel(stat="value").item() == pytest.approx(2 / 3)
    assert summary.sel(stat="low").item() >= 1 / 3 - 1e-12 and summary.sel(stat="high").item() <= 1.0 + 1e-12
    assert s.attrs["threshold"] == 0.15


def test_maps_are_upsampled_bilinearly_to_the_mask():
    grid = np.array([[[1.0, 2.0], [3.0, 5.0]]])
    up = upsample(grid, (4, 4))[0]
    w = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])  # half-pixel centres, edges clamped
    np.testing.assert_allclose(up, w @ grid[0] @ w.T)
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 2:, 2:] = True
    s = segmentation_scores(grid, masks, n_boot=10)
    pred = up > up.mean()
    assert s["pixel_accuracy"].item() == pytest.approx((pred == masks[0]).mean())


def test_a_dataarray_of_maps_in_any_order():
    maps = np.random.default_rng(0).random((3, 2, 2))
    masks = np.zeros((3, 8, 8), bool)
    masks[:, :4, :4] = True
    da = xr.DataArray(maps.transpose(1, 2, 0), dims=("row", "col", "item"))
    a, b = segmentation_scores(da, masks, n_boot=10), segmentation_scores(maps, masks, n_boot=10)
    np.testing.assert_allclose(a["miou"].values, b["miou"].values)


@pytest.mark.parametrize("maps, masks, message", [
    (np.zeros((2, 2, 2)), np.ones((3, 4, 4), bool), "2 maps but 3 masks"),
    (np.zeros((1, 8, 8)), np.ones((1, 4, 4), bool), "smaller than"),
    (np.ones((2, 2, 2)), np.stack([np.eye(4, dtype=bool), np.zeros((4, 4), bool)]), r"masks \[1\] are all False"),
    (np.ones((1, 2, 2)), np.ones((1, 4, 4), bool), "all True"),
    (np.full((1, 2, 2), np.nan), np.eye(4, dtype=bool)[None], "NaN"),
    (np.ones((1, 2, 2)), np.full((1, 4, 4), 2), "boolean"),
    (np.ones((1, 2, 2)), np.eye(4, dtype=bool)[None, None], r"\(n, H, W\)"),
])
def test_bad_input_is_refused(maps, masks, message):
    with pytest.raises(ValueError, match=message):
        segmentation_scores(maps, masks)


def test_bad_threshold_and_resampling_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        segmentation_scores(np.ones((1, 2, 2)), np.eye(2, dtype=bool)[None], threshold="otsu")
    with pytest.raises(ValueError, match="n_boot"):
        segmentation_scores(np.ones((1, 2, 2)), np.eye(2, dtype=bool)[None], n_boot=1)
