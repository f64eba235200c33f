"""studies/segmentation.py --quick: every map kind of every source is in the record with its supervision, the
figures are proportions with ordered intervals, what it prints is what it saved, the trained kinds never saw the
measured seeds, and the probe and SAE-feature maps of generated runs are recomputed here by hand (raw pipeline
calls, raw torch hooks on attn2) and scored again to the record's figures."""

import importlib.util
import re
import sys

import numpy as np
import pytest
import torch

from dit_lens.metrics.segmentation import METRICS, segmentation_scores
from dit_lens.storage import read_record
from dit_lens.study.cli import find_study

NUMBER = r"(-?\d+\.\d+)"
INTERVAL = rf"{NUMBER} \[{NUMBER}, {NUMBER}\]"
SUPERVISION = {"probe": "trained on tuning-seed masks", "sae_feature": "feature selected on tuning seeds"}


def load_study():
    spec = importlib.util.spec_from_file_location("segmentation_study", find_study("segmentation"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while the file runs
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The study module after one ``--quick`` run, what it printed and the record it wrote."""
    import contextlib
    import io
    import os

    root = tmp_path_factory.mktemp("segmentation")
    old = os.environ.get("DIT_LENS_CACHE")
    os.environ["DIT_LENS_CACHE"] = str(root / "cache")
    study, printed = load_study(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            assert study.main(["--quick", "--out", str(root / "out")]) == 0
    finally:
        if old is None:
            del os.environ["DIT_LENS_CACHE"]
        else:
            os.environ["DIT_LENS_CACHE"] = old
    return study, printed.getvalue(), read_record(root / "out" / "results.json", what="the segmentation study's result")


def rows(record, **where):
    return [r for r in record["results"] if all(r[k] == v for k, v in where.items())]


def test_every_kind_of_every_source_with_its_supervision(quick):
    study, _, record = quick
    label = record["classes"][0]
    assert record["classes"] == [label] and record["num_inference_steps"] == 10
    for source in ("given", "generated"):
        kinds = list(study.MAP_KINDS) + (list(study.BOUNDS) if source == "given" else [])
        assert [r["kind"] for r in rows(record, source=source, **{"class": "all"})] == kinds
        for kind in kinds:
            assert [r["class"] for r in rows(record, source=source, kind=kind)] == [label, "all"]
            for row in rows(record, source=source, kind=kind):
                want = SUPERVISION.get(kind, study.REFERENCE if kind in study.BOUNDS else "zero-shot")
                assert row["supervision"] == want
                assert 1 <= row["n"] <= 4
                for metric in METRICS:
                    value, low, high = row[metric]
                    assert 0.0 <= low <= value <= high <= 1.0, (source, kind, metric, row[metric])
                gap = row.get("miou_minus_cross_attention")
                assert (gap is None) == (kind == "cross_attention")
                if gap:
                    assert -1.0 <= gap[1] <= gap[0] <= gap[2] <= 1.0


def test_reference_rows_bound_the_grid(quick):
    study, _, record = quick
    truth, noise = (rows(record, source="given", kind=k, **{"class": "all"})[0] for k in study.BOUNDS)
    for metric in ("miou", "pixel_accuracy", "ap", "lesion_iou"):
        assert truth[metric][0] >= noise[metric][0], metric
    assert truth["ap"][0] > 0.9 and noise["ap"][0] < 0.3  # the true mask ranks its own pixels; noise does not


def test_the_true_mask_on_the_grid_recomputed(quick):
    from dit_lens.world.procedural import render

    _, _, record = quick
    label, (first, last) = record["classes"][0], record["seeds"]
    masks = render([label] * (last - first + 1), list(range(first, last + 1))).lesion
    share = masks.reshape(len(masks), 8, 8, 8, 8).mean((2, 4))  # 64 px / 8 tokens: each token's share
    scored = segmentation_scores(share, masks, n_boot=1000, seed=0)["summary"]
    row = rows(record, source="given", kind="bound_truth_on_grid", **{"class": "all"})[0]
    for metric in METRICS:
        assert row[metric] == pytest.approx(scored.sel(metric=metric).values.tolist(), abs=1e-4)


def test_trained_kinds_never_saw_the_measured_seeds(quick):
    _, _, record = quick
    first, last = record["seeds"]
    label = record["classes"][0]
    trained = record["trained_on_tuning_seeds"]
    assert set(trained) == {f"{s}/{k}/{label}" for s in ("given", "generated") for k in SUPERVISION}
    for key, info in trained.items():
        assert info["seeds"] == list(range(100_000, 100_004)), key
        assert not set(info["seeds"]) & set(range(first, last + 1))
    assert first == 200_000


def test_printed_lines_are_the_record(quick):
    _, printed, record = quick
    pattern = (r"^(given|generated) +(\S+) +(.+?) +n= *(\d+) " + "  ".join(rf"{m} {INTERVAL}" for m in METRICS)
               + r"(?:  miou - cross_attention ([-+]\d+\.\d+) \[([-+]\d+\.\d+), ([-+]\d+\.\d+)\])?(?:  \((.+)\))?$")
    lines = [re.match(pattern, line) for line in printed.splitlines() if re.match(r"^(given|generated) ", line)]
    assert len(lines) == len(record["results"]) and all(lines)
    for found, row in zip(lines, record["results"]):
        g = found.groups()
        assert (g[0], g[1], g[2], int(g[3])) == (row["source"], row["kind"], row["class"], row["n"])
        numbers = [float(x) for x in g[4:4 + 3 * len(METRICS)]]
        assert numbers == pytest.approx([x for m in METRICS for x in row[m]], abs=6e-4)
        gap = row.get("miou_minus_cross_attention")
        assert (g[-4] is None) == (gap is None)
        if gap:
            assert [float(x) for x in g[-4:-1]] == pytest.approx(gap, abs=6e-4)
        assert g[-1] == (None if row["supervision"] == "zero-shot" else row["supervision"])


def test_generated_probe_and_feature_maps_by_hand(quick):
    """The measured runs again through the plain pipeline, attn2's conditional rows taken by raw hooks: the
    probe's logistic map at its cell and the SAE feature's mean over its blocks, scored as the study scores them."""
    import dit_lens
    from dit_lens.world import load_segmenter
    from dit_lens.world.procedural import caption

    study, _, record = quick
    label, (first, last) = record["classes"][0], record["seeds"]
    seeds, steps = list(range(first, last + 1)), record["num_inference_steps"]
    lens = dit_lens.load("embedded")
    outputs = {layer: [] for layer in range(lens.num_layers)}
    handles = [lens.site_module("attn2", layer).register_forward_hook(
        lambda _m, _a, out, layer=layer: outputs[layer].append(out[len(seeds):].detach().clone()))
        for layer in range(lens.num_layers)]  # guidance batch: unconditional rows first
    try:
        with torch.no_grad():
            images = lens.pipeline([caption(label)] * len(seeds), generator=[lens.generator(s) for s in seeds],
                                   num_inference_steps=steps, guidance_scale=4.5, output_type="np",
                                   **lens.pipeline_kwargs).images
    finally:
        for h in handles:
            h.remove()
    masks = load_segmenter()(images)
    keep = masks.reshape(len(seeds), -1).any(1) & ~masks.reshape(len(seeds), -1).all(1)

    result, cell = study._TRAINED[("probe", False, label, steps, 4)]
    weights = result.sel(layer=cell["layer"], step=cell["step"])
    x = outputs[cell["layer"]][cell["step"]].double().numpy()  # (n, tokens, channels)
    probe_map = 1 / (1 + np.exp(-(x @ weights["weight"].values + float(weights["bias"]))))
    sae, feature = study._TRAINED[("sae", False, label, steps, 4)]
    feature_map = np.stack([np.stack([sae.encode(outputs[layer][t])[..., feature].numpy() for layer in sae.layers])
                            .mean(0) for t in range(steps)], 1)  # (n, step, tokens)
    choice = record["chosen"]["generated/sae_feature"]
    window = [t for t in range(steps) if choice["steps"][0] * steps <= t < choice["steps"][1] * steps]
    for kind, by_hand in (("probe", probe_map), ("sae_feature", feature_map[:, window].mean(1))):
        maps, made = study.MAP_KINDS[kind].read(lens, label, seeds, False)
        np.testing.assert_allclose(made, images, atol=1e-5)
        pooled = study.pooled(maps, "generated", record["chosen"][f"generated/{kind}"], lens.num_layers)
        np.testing.assert_allclose(pooled.reshape(len(seeds), -1), by_hand, rtol=1e-4, atol=1e-5)
        scored = segmentation_scores(by_hand.reshape(-1, 8, 8)[keep], masks[keep], n_boot=1000, seed=0)["summary"]
        row = rows(record, source="generated", kind=kind, **{"class": "all"})[0]
        assert row["n"] == int(keep.sum())
        for metric in METRICS:
            assert row[metric] == pytest.approx(scored.sel(metric=metric).values.tolist(), abs=2e-4), (kind, metric)
