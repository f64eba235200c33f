"""Linear probes: the control stays at chance, a planted signal is found where it is, the split never mixes
seeds, and every figure agrees with scikit-learn fitted by hand on the same split (features from raw hooks)."""

import numpy as np
import pytest
import xarray as xr
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dit_lens.readouts.probes import probe, probe_maps

DIMS = ("prompt", "seed", "step", "layer", "channel")
TOKEN_DIMS = ("prompt", "seed", "step", "layer", "token", "channel")


def capture_like(values, prompts=None, token_grid=None):
    dims = TOKEN_DIMS if values.ndim == 6 else DIMS
    coords = {"prompt": prompts or [f"p{i}" for i in range(values.shape[0])], "seed": range(values.shape[1]),
              "step": range(values.shape[2]), "layer": range(values.shape[3])}
    attrs = {"model_fingerprint": "abc"} | ({"token_grid": list(token_grid)} if token_grid else {})
    return xr.Dataset({"attn2": (dims, values)}, coords=coords, attrs=attrs)


def by_hand(x_train, y_train, C=1.0):
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=1000))
    return model.fit(x_train, y_train)


def test_planted_signal_is_found_at_its_layer_and_the_control_stays_at_chance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 400, 1, 3, 16))  # 800 runs: 400 test runs put chance at 0.5 +- 0.025
    direction = rng.normal(size=16)
    x[0, :, :, 1] += 1.5 * direction / np.linalg.norm(direction)  # class "polyps" told apart at layer 1 only
    result = probe(capture_like(x, ["polyps", "normal"]), labels=["polyps", "normal"], n_boot=300, progress=False)
    acc, control = result.accuracy.sel(step=0), result.control_accuracy.sel(step=0)
    assert float(acc.sel(layer=1)) > 0.75
    for layer in (0, 2):  # nothing to read there
        assert abs(float(acc.sel(layer=layer)) - 0.5) < 0.08
    # the control (shuffled training labels) is at chance everywhere, the signal's layer included; had it
    # trained on the true labels it would read the signal there as the probe does
    assert (abs(control - 0.5) < 0.08).all(), control.values
    assert float(result.selectivity.sel(layer=1, step=0)) > 0.2
    assert float(result.selectivity_low.sel(layer=1, step=0)) > 0.1
    # one control probe is a random direction: alone it reads the strong signal above or below chance by luck;
    # the mean over shuffles is near chance, and how far one shuffle strays is reported
    assert result.attrs["n_controls"] == 5 and (result.control_spread > 0).all()
    single = probe(capture_like(x, ["polyps", "normal"]), labels=["polyps", "normal"], n_boot=50, n_controls=1,
                   progress=False)
    assert (single.control_spread == 0).all() and (abs(single.control_accuracy - 0.5) < 0.1).all()
    assert result.accuracy_low.sel(layer=1, step=0) < acc.sel(layer=1) < result.accuracy_high.sel(layer=1, step=0)
    np.testing.assert_allclose(result.selectivity, result.accuracy - result.control_accuracy, atol=1e-12)
    assert result.converged.all()


def test_the_seed_split_never_mixes():
    """Each seed's two runs are +r_s and -r_s for a random r_s: a probe memorises them on the training seeds,
    and can do no better than chance on a seed it never saw; had a test seed been trained on, it would be read."""
    rng = np.random.default_rng(1)
    r = rng.normal(size=(60, 1, 1, 128))
    x = np.stack([r, -r])  # (prompt, seed, step, layer, channel)
    result = probe(capture_like(x, ["a", "b"]), labels={"a": 0, "b": 1}, n_boot=100, progress=False)
    train, test = result.attrs["train_seeds"], result.attrs["test_seeds"]
    assert not set(train) & set(test) and sorted(train + test) == list(range(60)) and len(train) == 30
    assert float(result.train_accuracy.squeeze()) == 1.0  # memorised
    assert float(result.accuracy.squeeze()) < 0.75  # not seen
    # the same seed gives the same split and values; another seed another split
    again = probe(capture_like(x, ["a", "b"]), labels={"a": 0, "b": 1}, n_boot=100, progress=False)
    xr.testing.assert_identical(result, again)
    other = probe(capture_like(x, ["a", "b"]), labels={"a": 0, "b": 1}, n_boot=100, seed=5, progress=False)
    assert other.attrs["train_seeds"] != train


def test_agrees_with_sklearn_by_hand_on_a_real_capture(tiny_lens, tmp_path):
    from reference import attn2_token_means

    from dit_lens import capture

    prompts, seeds, T = ["a red polyp", "a polyp", "normal mucosa", "a normal cecum"], list(range(6)), 2
    labels = {"a red polyp": "polyp", "a polyp": "polyp", "normal mucosa": "normal", "a normal cecum": "normal"}
    ds = capture(tiny_lens, prompts, seeds=seeds, num_inference_steps=T, store=tmp_path / "c.zarr", batch_size=1)
    result = probe(tmp_path / "c.zarr", labels=labels, n_boot=200, progress=False)
    assert result.accuracy.dims == ("layer", "step") and result.accuracy.shape == (3, 2)
    assert result.attrs["model_fingerprint"] == tiny_lens.fingerprint and result.attrs["classes"] == ["normal", "polyp"]
    assert result.attrs["capture_key"] == ds.attrs["capture_key"] and "sklearn_version" in result.attrs
    raw = np.stack([[attn2_token_means(tiny_lens, p, s, T, 4.5) for s in seeds] for p in prompts])  # raw hooks
    np.testing.assert_allclose(ds.attn2.values, raw, rtol=1e-4, atol=1e-5)
    train = [seeds.index(s) for s in result.attrs["train_seeds"]]
    test = [seeds.index(s) for s in result.attrs["test_seeds"]]
    y = np.array([[labels[p] == "polyp"] * len(seeds) for p in prompts])
    for layer in range(3):
        for step in range(T):
            x = ds.attn2.values[:, :, step, layer].astype(np.float64)  # (prompt, seed, channel)
            model = by_hand(x[:, train].reshape(-1, 16), y[:, train].ravel())
            expected = np.mean(model.predict(x[:, test].reshape(-1, 16)) == y[:, test].ravel())
            assert float(result.accuracy.sel(layer=layer, step=step)) == pytest.approx(expected, abs=1e-12)
    # prompts differ in their text only, which attn2 carries: the probe reads them; the control does not
    assert float(result.accuracy.mean()) > 0.9 and abs(float(result.control_accuracy.mean()) - 0.5) < 0.25


def blobs(rng, n, size=16, grid=4):
    """Random axis-aligned boxes, each covering whole tokens and some partial ones."""
    m, k = np.zeros((n, size, size), bool), size // 16
    for i in range(n):
        y0, x0 = rng.integers(0, size - 6 * k, 2)
        h, w = rng.integers(3 * k, 7 * k, 2)
        m[i, y0 : y0 + h, x0 : x0 + w] = True
    return m


def token_labels_by_hand(masks, grid, threshold=0.5):
    n, size = masks.shape[0], masks.shape[1]
    cell = size // grid
    out = np.zeros((n, grid * grid), bool)
    for i in range(n):
        for r in range(grid):
            for c in range(grid):
                block = masks[i, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
                out[i, r * grid + c] = block.mean() >= threshold
    return out


def test_token_probe_finds_a_planted_map_at_its_layer():
    rng = np.random.default_rng(2)
    masks = blobs(rng, 80)
    y = token_labels_by_hand(masks, 4)  # (item, token)
    x = rng.normal(size=(1, 80, 1, 2, 16, 8))
    x[0, :, 0, 1, :, 0] += 3.0 * y  # lesion tokens stand out at layer 1
    result = probe(capture_like(x, ["polyps"], token_grid=(4, 4)), masks=masks, token_level=True, n_boot=200,
                   progress=False)
    assert float(result.auc.sel(layer=1, step=0)) > 0.95 and float(result.balanced_accuracy.sel(layer=1, step=0)) > 0.9
    assert result.auc_low.sel(layer=0, step=0) < 0.5 < result.auc_high.sel(layer=0, step=0)
    assert (abs(result.control_balanced_accuracy - 0.5) < 0.1).all()
    assert float(result.selectivity_low.sel(layer=1, step=0)) > 0.3
    maps = result.probe_map.sel(layer=1, step=0)  # (prompt, seed, row, col) of the test runs
    assert maps.dims == ("prompt", "seed", "row", "col") and list(maps.seed.values) == result.attrs["test_seeds"]
    truth = y[result.attrs["test_seeds"]].reshape(-1, 4, 4)
    assert maps.values[0][truth].mean() > 0.8 > 0.2 > maps.values[0][~truth].mean()


def test_token_probe_agrees_with_sklearn_by_hand_on_a_real_capture(tiny_lens, tmp_path):
    from dit_lens import capture

    seeds, T = list(range(10)), 2
    ds = capture(tiny_lens, ["a polyp"], seeds=seeds, num_inference_steps=T, reduce=None, store=tmp_path / "t.zarr")
    masks = blobs(np.random.default_rng(3), len(seeds), size=64)  # world-sized masks, 16 x 16 pixels a token
    result = probe(ds, masks=masks, token_level=True, layers=[2], n_boot=100, progress=False)
    assert ds.attrs["token_grid"] == [4, 4] and result.probe_map.shape == (1, T, 1, 5, 4, 4)
    y = token_labels_by_hand(masks, 4)
    train, test = result.attrs["train_seeds"], result.attrs["test_seeds"]
    for step in range(T):
        x = ds.attn2.sel(layer=2, step=step).values[0].astype(np.float64)  # (seed, token, channel)
        model = by_hand(x[train].reshape(-1, 16), y[train].ravel())
        prob = model.predict_proba(x[test].reshape(-1, 16))[:, 1]
        cell = result.sel(layer=2, step=step)
        np.testing.assert_allclose(cell.probe_map.values.ravel(), prob, rtol=1e-6, atol=1e-9)
        truth = y[test].ravel()
        assert float(cell.auc) == pytest.approx(roc_auc_score(truth, prob), abs=1e-9)
        assert float(cell.balanced_accuracy) == pytest.approx(balanced_accuracy_score(truth, prob >= 0.5), abs=1e-9)
        assert float(cell.accuracy) == pytest.approx(np.mean((prob >= 0.5) == truth), abs=1e-9)
        assert float(cell.auc_low) <= float(cell.auc) <= float(cell.auc_high)
        # the kept weights map any capture of the model: on the test runs, the same maps
        again = probe_maps(result, ds, layer=2, step=step).sel(seed=test)
        np.testing.assert_allclose(again.values, cell.probe_map.values, rtol=1e-5, atol=1e-7)
    # or captures the runs it is given, with the probe's settings
    fresh = probe_maps(result, tiny_lens, prompts=["a polyp"], seeds=test, layer=2, step=1)
    np.testing.assert_allclose(fresh.values, result.probe_map.sel(layer=2, step=1).values, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"no cell \(layer 0, step 1\)"):
        probe_maps(result, tiny_lens, prompts=["a polyp"], seeds=test, layer=0, step=1)


def test_bad_input_gets_a_clear_error(tmp_path):
    rng = np.random.default_rng(4)
    ds = capture_like(rng.normal(size=(2, 6, 1, 2, 4)), ["polyps", "normal"])
    with pytest.raises(ValueError, match=r"holds no tokens.*reduce=None"):
        probe(ds, masks=np.zeros((12, 8, 8), bool), token_level=True, progress=False)
    with pytest.raises(ValueError, match=r"no label for \['normal'\]"):
        probe(ds, labels={"polyps": 1}, progress=False)
    with pytest.raises(ValueError, match=r"does not hold: \['cecum'\]"):
        probe(ds, labels={"polyps": 1, "normal": 0, "cecum": 0}, progress=False)
    with pytest.raises(ValueError, match="give one per prompt"):
        probe(ds, labels=[1, 0, 1], progress=False)
    with pytest.raises(ValueError, match="one class only"):
        probe(ds, labels={"polyps": 1, "normal": 1}, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        probe(ds.isel(seed=[0]), labels={"polyps": 1, "normal": 0}, progress=False)
    with pytest.raises(ValueError, match=r"layers \[7\] are not in the capture"):
        probe(ds, labels={"polyps": 1, "normal": 0}, layers=[7], progress=False)
    with pytest.raises(ValueError, match="train_fraction"):
        probe(ds, labels={"polyps": 1, "normal": 0}, train_fraction=1.0, progress=False)
    with pytest.raises(ValueError, match="no capture store"):
        probe(tmp_path / "absent.zarr", labels={"polyps": 1}, progress=False)
    unfinished = ds.assign(done=(("prompt", "seed"), np.arange(12).reshape(2, 6) != 3))
    unfinished.to_zarr(tmp_path / "unfinished.zarr", zarr_format=2)
    with pytest.raises(ValueError, match="1 unfinished runs of 12"):
        probe(tmp_path / "unfinished.zarr", labels={"polyps": 1, "normal": 0}, progress=False)
    tokens = capture_like(rng.normal(size=(1, 6, 1, 1, 4, 3)), ["polyps"], token_grid=(2, 2))
    with pytest.raises(ValueError, match=r"masks have shape \(5, 8, 8\); expected \(1, 6, H, W\)"):
        probe(tokens, masks=np.zeros((5, 8, 8), bool), token_level=True, progress=False)
    with pytest.raises(ValueError, match="multiples of the token grid"):
        probe(tokens, masks=np.zeros((6, 7, 7), bool), token_level=True, progress=False)
    with pytest.raises(ValueError, match="one class only"):  # no token is in a mask
        probe(tokens, masks=np.zeros((6, 8, 8), bool), token_level=True, progress=False)
    with pytest.raises(ValueError, match="labelled by masks"):
        probe(tokens, labels=[1], masks=np.ones((6, 8, 8), bool), token_level=True, progress=False)
    with pytest.raises(ValueError, match="token_level=True"):
        probe(ds, labels={"polyps": 1, "normal": 0}, masks=np.ones((12, 8, 8), bool), progress=False)
    with pytest.raises(ValueError, match="token-level"):
        probe_maps(probe(ds, labels={"polyps": 1, "normal": 0}, n_boot=10, progress=False), tokens, layer=0, step=0)


def test_figure_draws_accuracy_and_selectivity_over_layer_and_step():
    from dit_lens.views.probes import probe_figure

    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 20, 3, 2, 4))
    x[0, :, 2, 1] += 2.0
    result = probe(capture_like(x, ["polyps", "normal"]), labels=[1, 0], n_boot=50, progress=False)
    fig = probe_figure(result)
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title().split("\n")[0] for ax in heatmaps] == ["accuracy", "selectivity"]
    assert heatmaps[0].get_xlabel() == "step" and heatmaps[0].get_ylabel() == "layer"
    np.testing.assert_allclose(heatmaps[0].images[0].get_array(), result.accuracy.values)
    np.testing.assert_allclose(heatmaps[1].images[0].get_array(), result.selectivity.values)
    with pytest.raises(ValueError, match="probe"):
        probe_figure(xr.Dataset({"effect": (("layer",), [1.0])}))


def test_a_token_capture_is_probed_on_its_token_means_and_both_branches_on_the_conditional(tiny_lens, tmp_path):
    from dit_lens import capture

    prompts, seeds, labels = ["a polyp", "normal mucosa"], list(range(6)), [1, 0]
    settings = dict(seeds=seeds, num_inference_steps=2, batch_size=1)
    mean = capture(tiny_lens, prompts, **settings, store=tmp_path / "m.zarr")
    tokens = capture(tiny_lens, prompts, **settings, reduce=None, store=tmp_path / "t.zarr")
    both = capture(tiny_lens, prompts, **settings, branch="both", store=tmp_path / "b.zarr")
    a, b = (probe(ds, labels=labels, n_boot=50, progress=False) for ds in (mean, tokens))
    np.testing.assert_array_equal(a.accuracy.values, b.accuracy.values)
    np.testing.assert_array_equal(a.control_accuracy.values, b.control_accuracy.values)
    c = probe(both, labels=labels, n_boot=50, progress=False)
    np.testing.assert_array_equal(a.accuracy.values, c.accuracy.values)
    uncond = probe(both.sel(branch="uncond"), labels=labels, n_boot=50, progress=False)
    assert (uncond.accuracy == 0.5).all()  # the unconditional half never sees the prompt: a seed's two runs are alike
