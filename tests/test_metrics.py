import re

import numpy as np
import pytest
import xarray as xr

from dit_lens import metrics

LABELS = ["normal cecum", "polyps", "dyed lifted polyps"]


def pairs_dataset(unsteered, steered):
    """A `generate`-shaped result from arrays (prompt, seed, y, x, rgb)."""
    image = np.stack([unsteered, steered], axis=2)
    p, s = image.shape[:2]
    return xr.Dataset(
        {"image": (("prompt", "seed", "branch", "y", "x", "rgb"), image)},
        coords={"prompt": [f"p{i}" for i in range(p)], "seed": list(range(s)), "branch": ["original", "edited"]},
    )


class MeanColourOracle:
    """A real (if simple) classifier: red-dominant → polyps, blue → dyed, else normal."""

    labels = LABELS

    def __call__(self, images):
        m = images.mean(axis=(1, 2))  # (N, 3)
        logits = np.stack([m[:, 1], m[:, 0], m[:, 2]], axis=1) * 20
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


def test_estimate_interval_and_degenerate_cases():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=200)
    e = metrics.estimate(x)
    assert e.n == 200 and e.low < x.mean() < e.high and e.high - e.low < 0.2
    assert metrics.estimate(np.array([1.0, 1.0])).to_dict() == {"value": 1.0, "low": 1.0, "high": 1.0, "n": 2}
    assert metrics.estimate(np.array([np.nan])).n == 0


def test_flips_confidence_and_dye():
    red, green, blue = (np.zeros((1, 3, 4, 4, 3)) for _ in range(3))
    red[..., 0], green[..., 1], blue[..., 2] = 1, 1, 1
    steered = np.concatenate([green[:, :2], red[:, 2:]], axis=1)  # two flip to normal, one stays
    out = pairs_dataset(red, steered)
    probs = metrics.classify(out, MeanColourOracle())
    assert probs.dims == ("prompt", "seed", "branch", "class")
    np.testing.assert_array_equal(metrics.flips(probs, "polyps").values, [[1, 1, 0]])
    drop = metrics.confidence_drop(probs, "polyps").values
    assert drop[0, 0] > 0.99 and abs(drop[0, 2]) < 1e-12
    from dit_lens.world.domain import dyed

    np.testing.assert_array_equal(dyed(probs, branch="edited", dye_classes=["dyed lifted polyps"]).values, [[0, 0, 0]])
    blue_probs = metrics.classify(pairs_dataset(blue, blue), MeanColourOracle())
    np.testing.assert_array_equal(dyed(blue_probs, dye_classes=["dyed lifted polyps"]).values, [[1, 1, 1]])
    with pytest.raises(ValueError, match="must be among the classifier's labels"):
        dyed(blue_probs)  # the world's dye classes include resection margins, which this oracle lacks
    with pytest.raises(ValueError, match="not one of the classifier's labels"):
        metrics.flips(probs, "ulcerative colitis")


def test_target_rate_counts_only_the_class_asked_for():
    red, green, blue = (np.zeros((1, 1, 4, 4, 3)) for _ in range(3))
    red[..., 0], green[..., 1], blue[..., 2] = 1, 1, 1
    steered = np.concatenate([green, blue, red], axis=1)  # -> normal, -> dyed (a flip, not the target), unchanged
    probs = metrics.classify(pairs_dataset(np.concatenate([red] * 3, axis=1), steered), MeanColourOracle())
    np.testing.assert_array_equal(metrics.flips(probs, "polyps").values, [[1, 1, 0]])
    np.testing.assert_array_equal(metrics.target_rate(probs, "normal cecum").values, [[1, 0, 0]])
    np.testing.assert_array_equal(metrics.target_rate(probs, "polyps", branch="original").values, [[1, 1, 1]])
    with pytest.raises(ValueError, match="not one of the classifier's labels"):
        metrics.target_rate(probs, "esophagitis")


def test_background_metrics_ignore_the_lesion():
    rng = np.random.default_rng(1)
    base = rng.uniform(size=(1, 2, 32, 32, 3))
    edited = base.copy()
    edited[:, :, 8:24, 8:24] = 0.0  # change only inside the lesion
    out = pairs_dataset(base, edited)
    masks = np.zeros((1, 2, 2, 32, 32), bool)
    masks[:, :, 1, 8:24, 8:24] = True  # lesion found in the steered image only
    masks = xr.DataArray(masks, dims=("prompt", "seed", "branch", "y", "x"), coords={k: out[k].values for k in ("prompt", "seed", "branch")})
    bg = metrics.background_mask(masks)
    assert int((~bg).sum()) == 2 * 256
    everywhere = xr.ones_like(bg)
    ssim_bg, ssim_all = metrics.background_ssim(out, bg), metrics.background_ssim(out, everywhere)
    # every background pixel is untouched, so the masked windows see no change at all
    np.testing.assert_allclose(ssim_bg.values, 1.0, atol=1e-12)
    assert float(ssim_all.max()) < 0.9
    # the plain SSIM map still sees the lesion edge from background pixels near it
    plain = metrics.background_ssim(out, bg, masked_windows=False)
    assert float(plain.max()) < 0.99
    assert (metrics.background_psnr(out, bg).values == metrics.PSNR_CEILING).all()  # untouched: the ceiling
    assert float(metrics.background_psnr(out, everywhere).max()) < 20
    far = bg.copy()
    far[:, :, 5:27, 5:27] = False  # background beyond the window's reach of the lesion
    assert float(metrics.background_ssim(out, far, masked_windows=False).min()) == pytest.approx(1.0)
    # one changed background pixel is seen
    nudged = edited.copy()
    nudged[:, :, 2, 2] = 1.0 - nudged[:, :, 2, 2]
    assert float(metrics.background_ssim(pairs_dataset(base, nudged), bg).max()) < 0.999


def test_masked_ssim_is_scikit_image_ssim_on_a_full_mask():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(3)
    a = rng.uniform(size=(24, 20, 3))
    b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    _, reference = structural_similarity(a, b, channel_axis=-1, data_range=1.0, full=True)
    np.testing.assert_allclose(metrics.masked_ssim_map(a, b, np.ones((24, 20), bool)), reference, atol=1e-12)
    keep = rng.uniform(size=(24, 20)) > 0.5
    inside = metrics.masked_ssim_map(a, b, keep)
    assert np.isfinite(inside).all() and not np.allclose(inside, reference)
    with pytest.raises(ValueError, match="mask"):
        metrics.masked_ssim_map(a, b, keep[:5])


def test_segment_and_shape_errors():
    out = pairs_dataset(np.zeros((1, 2, 8, 8, 3)), np.ones((1, 2, 8, 8, 3)))
    masks = metrics.segment(out, lambda x: x[..., 0] > 0.5)
    assert masks.dims == ("prompt", "seed", "branch", "y", "x")
    assert not masks.sel(branch="original").any() and masks.sel(branch="edited").all()
    with pytest.raises(ValueError, match="segmenter returned shape"):
        metrics.segment(out, lambda x: x[:, :4, :4, 0] > 0)
    with pytest.raises(ValueError, match="classifier returned shape"):
        metrics.classify(out, lambda x: x.mean((1, 2, 3)))


def test_lpips_reports_unavailability_instead_of_a_number():
    out = pairs_dataset(np.zeros((1, 2, 8, 8, 3)), np.ones((1, 2, 8, 8, 3)))
    bg = xr.DataArray(np.ones((1, 2, 8, 8), bool), dims=("prompt", "seed", "y", "x"))
    reason = metrics.lpips_unavailable("alex")
    da = metrics.background_lpips(out, bg, unavailable="nan")
    if reason is not None:
        assert np.isnan(da.values).all() and da.attrs["status"] == reason
        with pytest.raises(metrics.MetricUnavailableError, match=re.escape(f"Bg-LPIPS is {reason}")):
            metrics.background_lpips(out, bg)  # from the API, never a silent NaN
    else:
        assert np.isfinite(da.values).all() and np.isfinite(metrics.background_lpips(out, bg).values).all()


def test_bg_psnr_scores_untouched_backgrounds_at_its_ceiling_and_keeps_them():
    same, changed = np.zeros((4, 8, 8, 3)), np.full((4, 8, 8, 3), 0.1)
    out = metrics.as_pairs(np.concatenate([same, same]), np.concatenate([same, changed]))
    bg = xr.DataArray(np.ones((1, 8, 8, 8), bool), dims=("prompt", "seed", "y", "x"))
    est = metrics.estimate(metrics.background_psnr(out, bg))
    assert est.n == 8 and est.value == pytest.approx((4 * metrics.PSNR_CEILING + 4 * 20.0) / 8)
    identical = metrics.estimate(metrics.background_psnr(metrics.as_pairs(same, same), bg.isel(seed=slice(4))))
    assert identical.n == 4 and identical.value == metrics.PSNR_CEILING


def test_lpips_says_which_file_enables_it(tmp_path, monkeypatch):
    import importlib.util

    import torch

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lpips" else real(name, *a))
    which = "lpips package is" if real("torchvision") is not None else "lpips and torchvision packages are"
    assert metrics.lpips_unavailable() == f"unavailable: the {which} not installed (pip install lpips torchvision)"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # both packages "installed"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    reason = metrics.lpips_unavailable("vgg")
    assert reason.startswith(metrics.LPIPS_UNAVAILABLE) and str(tmp_path / "checkpoints" / "vgg16-397923af.pth") in reason
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"")
    assert metrics.lpips_unavailable("vgg") is None
    with pytest.raises(ValueError, match="must be one of"):
        metrics.lpips_unavailable("resnet")


def test_polyp_kept_needs_the_class_and_the_lesion():
    from dit_lens.world.domain import MIN_LESION_PIXELS, polyp_kept

    red = np.zeros((1, 2, 8, 8, 3))
    red[..., 0] = 1
    out = pairs_dataset(red, red)
    probs = metrics.classify(out, MeanColourOracle())
    masks = xr.zeros_like(out["image"].isel(rgb=0), dtype=bool)
    masks[0, 0, 1, :, :] = True  # seed 0's steered image keeps a 64-pixel lesion, seed 1's none
    assert MIN_LESION_PIXELS <= 64
    kept = polyp_kept(metrics.Judged(out, probs, masks, "dyed lifted polyps", "polyps"))
    np.testing.assert_array_equal(kept.values, [[1.0, 0.0]])


def _region_judged(original_mask, edited_mask, region, edited_probs):
    """One pair (8×8 images) with given lesion masks, a region and the counterfactual's probabilities."""
    rng = np.random.default_rng(1)
    a = rng.uniform(size=(1, 1, 8, 8, 3))
    b = a.copy()
    b[0, 0][edited_mask & ~original_mask] = 0.9  # the counterfactual differs only where a lesion was added
    out = pairs_dataset(a, b)
    out["region"] = (("prompt", "seed", "y", "x"), region[None, None])
    masks = xr.DataArray(np.stack([original_mask, edited_mask])[None, None], dims=("prompt", "seed", "branch", "y", "x"),
                         coords={"prompt": out["prompt"].values, "seed": out["seed"].values,
                                 "branch": ["original", "edited"]})
    probs = xr.DataArray(np.stack([[1.0, 0.0, 0.0], edited_probs])[None, None],
                         dims=("prompt", "seed", "branch", "class"),
                         coords={"prompt": out["prompt"].values, "seed": out["seed"].values,
                                 "branch": ["original", "edited"], "class": LABELS})
    return metrics.Judged(out, probs, masks, "normal cecum", "polyps")


def test_region_metrics_by_hand():
    region = np.zeros((8, 8), bool); region[:4, :4] = True          # 16 pixels
    before = np.zeros((8, 8), bool); before[6:, 6:] = True           # a false lesion on the original: 4 pixels
    after = before.copy(); after[1:3, 1:4] = True; after[5, 0] = True  # 6 inserted inside, 1 outside
    judged = _region_judged(before, after, region, [0.2, 0.7, 0.1])
    value = lambda fn: float(fn(judged).values.item())  # noqa: E731
    assert value(metrics.target_read) == 1.0
    assert value(metrics.lesion_inside) == pytest.approx(6 / 11)       # the original's false lesion counts against it
    assert value(metrics.inserted_inside) == pytest.approx(6 / 7)      # only what the edit added
    assert value(metrics.region_dice) == pytest.approx(2 * 6 / (11 + 16))
    assert value(metrics.outside_ssim) < 1.0                          # the pixel inserted outside
    untouched = _region_judged(before, before, region, [0.9, 0.05, 0.05])
    assert float(metrics.target_read(untouched).values.item()) == 0.0
    assert float(metrics.inserted_inside(untouched).values.item()) == 0.0  # nothing inserted
    assert float(metrics.outside_ssim(untouched).values.item()) == pytest.approx(1.0)
    del judged.out["region"]
    with pytest.raises(ValueError, match="needs the region"):
        metrics.inserted_inside(judged)


def test_proportion_has_a_wilson_interval_that_stays_informative_at_the_ends():
    from dit_lens.metrics import proportion

    all_hit = proportion(np.ones(64, bool))
    assert (all_hit.value, all_hit.high, all_hit.n) == (1.0, 1.0, 64)
    assert all_hit.low == pytest.approx(64 / (64 + 1.959964 ** 2), abs=1e-6)  # Wilson at n of n: n / (n + z²)
    some = proportion([1, 0, 1, 1, float("nan")])
    assert some.n == 4 and some.value == 0.75 and some.low == pytest.approx(0.3006, abs=1e-4)
    with pytest.raises(ValueError, match="takes hits"):
        proportion([0.5, 1.0])


def test_as_pairs_lays_out_your_arrays_for_every_metric():
    a, b = np.zeros((3, 8, 8, 3)), np.ones((3, 8, 8, 3))
    out = metrics.as_pairs(a, b, seeds=[7, 8, 9])
    np.testing.assert_array_equal(out["image"].sel(seed=8, branch="edited").values[0], b[1])
    np.testing.assert_array_equal(out["image"].sel(seed=8, branch="original").values[0], a[1])
    probs = metrics.classify(out, MeanColourOracle())
    assert probs.dims == ("prompt", "seed", "branch", "class") and list(probs["seed"].values) == [7, 8, 9]
    with pytest.raises(ValueError, match="same shape"):
        metrics.as_pairs(a, b[:2])
    with pytest.raises(ValueError, match="divide 0-255 images by 255"):
        metrics.as_pairs(a + 255, b)
    with pytest.raises(ValueError, match="one distinct seed per pair"):
        metrics.as_pairs(a, b, seeds=[1, 1, 2])
