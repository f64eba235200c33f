"""MedSteer where="causal": the steered cells are the top cells of an exact patching grid on the vector's own
prompts and seeds, never on the evaluation seeds; the study script's pieces."""

import numpy as np
import pytest
import torch

from dit_lens import patching
from dit_lens.interventions.generate import generate
from dit_lens.interventions.steer import Steer
from dit_lens.methods import ConceptPair, MethodContext, Vectors, get
from dit_lens.methods import medsteer
from dit_lens.world.judges import Oracle, OracleNet

T = 3
PAIR = ConceptPair("polyps", "normal cecum", contexts=("An image of {}", "A photo of {}"))
LABELS = ("normal cecum", "polyps")


@pytest.fixture
def judge():
    torch.manual_seed(0)
    return Oracle(OracleNet(width=4, num_classes=2), labels=LABELS)


@pytest.fixture
def context(tiny_lens, judge):
    medsteer._GRIDS.clear()  # each test computes its own grid
    return MethodContext(num_inference_steps=T, vectors=Vectors(tiny_lens, seeds=2, num_inference_steps=T),
                         oracle=judge)


SETTINGS = {"where": "causal", "top": 0.25, "vector_seeds": 2, "causal_seeds": 2, "alpha": 6.0}


def reference_cells(lens, judge, top):
    """The grid made here: seed i with the vector's i-th prompt pair, the judge's log-probability of polyps."""
    def log_polyps(images):
        return np.log(judge(images)[:, LABELS.index("polyps")])

    effects = [patching(lens, clean=PAIR.positive()[i], corrupt=PAIR.negative()[i], seeds=[i], metric=log_polyps,
                        num_inference_steps=T, progress=False).effect.isel(seed=0) for i in (0, 1)]
    mean = (effects[0] + effects[1]) / 2  # (step, layer)
    flat = [(float(mean.sel(step=t, layer=l)), t, l) for t in mean.step.values for l in mean.layer.values]
    count = round(top * len(flat))
    return [[int(t), int(l)] for _, t, l in sorted(flat, key=lambda x: (-x[0], x[1], x[2]))[:count]]


def test_causal_steers_the_cells_of_largest_mean_effect_on_the_vectors_prompts_and_seeds(tiny_lens, judge, context):
    out = get("medsteer").run(tiny_lens, PAIR, [100, 101], SETTINGS, context=context)
    expected = reference_cells(tiny_lens, judge, 0.25)
    assert len(expected) == 2  # a quarter of the 3 steps × 3 layers
    causal = out.attrs["causal"]
    assert causal["cells"] == expected and out.attrs["steers"][0]["cells"] == expected
    assert causal["seeds"] == [0, 1] and causal["clean"] == PAIR.positive() and causal["corrupt"] == PAIR.negative()
    assert causal["direction"] == "denoise" and causal["grid_cells"] == 9
    assert causal["effect"] == sorted(causal["effect"], reverse=True)
    # the vector's provenance: the same prompts and seeds the grid ran on
    vector = context.vectors(PAIR, 2)
    assert list(vector.attrs["positive_seeds"]) == [0, 1] and list(vector.attrs["positive_prompts"]) == PAIR.positive()
    # and the edited images are the ones a Steer at exactly those cells makes
    steer = Steer(vector, alpha=6.0, cells=[tuple(c) for c in expected], name=PAIR.name)
    same = generate(tiny_lens, PAIR.source_prompt, seeds=[100, 101], steer=steer, num_inference_steps=T, progress=False)
    assert np.array_equal(out["image"].values, same["image"].values)


def test_causal_layers_steers_the_most_necessary_blocks_at_every_step(tiny_lens, judge, context):
    """where="causal_layers": a block-by-block "noise" grid on the vector's prompts and seeds, made here by hand; the
    blocks whose patch loses the most of the judge's gap are steered at every step."""
    def log_polyps(images):
        return np.log(judge(images)[:, LABELS.index("polyps")])

    effects = [patching(tiny_lens, clean=PAIR.positive()[i], corrupt=PAIR.negative()[i], seeds=[i], metric=log_polyps,
                        grid="layer", direction="noise", num_inference_steps=T, progress=False).effect.isel(seed=0)
               for i in (0, 1)]
    mean = (effects[0] + effects[1]) / 2  # (layer,): 1 − mean is the share of the gap a block's patch loses
    expected = [int(mean.layer[i]) for i in np.argsort(mean.values, kind="stable")[:1]]
    settings = {**SETTINGS, "where": "causal_layers", "top": 0.34}  # a third of 3 blocks: one
    out = get("medsteer").run(tiny_lens, PAIR, [100, 101], settings, context=context)
    causal = out.attrs["causal"]
    assert causal["layers"] == expected and causal["direction"] == "noise" and causal["grid_layers"] == 3
    assert causal["effect"] == pytest.approx([float(mean.sel(layer=l)) for l in expected], rel=1e-3)  # log of softmax
    assert out.attrs["steers"][0]["layers"] == expected and "cells" not in out.attrs["steers"][0]
    steer = Steer(context.vectors(PAIR, 2), alpha=6.0, layers=expected, name=PAIR.name)
    same = generate(tiny_lens, PAIR.source_prompt, seeds=[100, 101], steer=steer, num_inference_steps=T, progress=False)
    assert np.array_equal(out["image"].values, same["image"].values)
    named = {"window": (0.0, 1.0), "steps": (0.0, 1.0), "renormalize": False, "blend": 0.0, **settings}
    assert get("medsteer").cell_name(0, named).endswith("_atcausal_layers_top0.34_cs2")


def test_causal_cells_never_depend_on_the_evaluation_seeds(tiny_lens, context):
    first = get("medsteer").run(tiny_lens, PAIR, [100], SETTINGS, context=context).attrs["causal"]
    medsteer._GRIDS.clear()  # computed again, for other evaluation seeds
    other = get("medsteer").run(tiny_lens, PAIR, [7, 300], SETTINGS, context=context).attrs["causal"]
    assert first == other and first["seeds"] == [0, 1]


def test_the_default_where_steers_the_windows_as_before(tiny_lens, context):
    settings = {"alpha": 6.0, "vector_seeds": 2, "window": (0.0, 0.5)}
    out = get("medsteer").run(tiny_lens, PAIR, [100], settings, context=context)
    window = get("medsteer").run(tiny_lens, PAIR, [100], {**settings, "where": "window"}, context=context)
    assert "causal" not in out.attrs and "cells" not in out.attrs["steers"][0]
    assert out.attrs["steers"][0]["layers"] == [0, 1] and out.attrs["steers"] == window.attrs["steers"]
    assert np.array_equal(out["image"].values, window["image"].values)
    assert get("medsteer").cell_name(0, get("medsteer").settings(settings)) == "p0_w0-0.5_t0-1_a6_r0_n2"
    assert not medsteer._GRIDS  # no patching grid was made


def test_top_cells_within_the_windows_and_at_least_one(tiny_lens, context):
    settings = {**SETTINGS, "window": (0.5, 1.0), "steps": (0.0, 0.5), "top": 0.01}
    out = get("medsteer").run(tiny_lens, PAIR, [100], settings, context=context)
    causal = out.attrs["causal"]
    assert causal["grid_cells"] == 2 and len(causal["cells"]) == 1  # steps [0] × layers [1, 2]
    assert causal["cells"][0][0] == 0 and causal["cells"][0][1] in (1, 2)


@pytest.mark.parametrize("change, match", [
    ({"where": "nowhere"}, "setting 'where': expected one of \\['window', 'causal', 'causal_layers'\\]"),
    ({"top": 0.0}, "setting 'top': expected a fraction of the grid's cells in \\(0, 1\\]"),
    ({"top": 1.5}, "setting 'top': expected a fraction"),
    ({"causal_seeds": 0}, "setting 'causal_seeds': expected a positive integer"),
    ({"causal_seeds": 3}, "causal_seeds 3 must be at most vector_seeds 2"),
])
def test_bad_causal_settings_are_refused(tiny_lens, context, change, match):
    with pytest.raises(ValueError, match=match):
        get("medsteer").run(tiny_lens, PAIR, [100], {**SETTINGS, **change}, context=context)


def test_causal_needs_a_judge_that_knows_the_source_class(tiny_lens, context):
    from dataclasses import replace

    with pytest.raises(ValueError, match="where='causal' picks its cells by the judge.*MethodContext\\(oracle=...\\)"):
        get("medsteer").run(tiny_lens, PAIR, [100], SETTINGS, context=replace(context, oracle=None))
    other = Oracle(OracleNet(width=4, num_classes=2), labels=("normal cecum", "esophagitis"))
    with pytest.raises(ValueError, match="'polyps' is not a class of the oracle"):
        get("medsteer").run(tiny_lens, PAIR, [100], SETTINGS, context=replace(context, oracle=other))


def test_top_cells_refuses_an_undefined_grid():
    import xarray as xr

    effect = xr.DataArray(np.full((1, 2, 2), np.nan), dims=("seed", "step", "layer"),
                          coords={"seed": [0], "step": [0, 1], "layer": [0, 1]})
    with pytest.raises(ValueError, match="undefined at every cell"):
        medsteer.top_cells(effect, 0.5)
    effect[0, 1, 0] = 0.5
    assert medsteer.top_cells(effect, 0.5) == [(1, 0), (0, 0)]  # NaN cells last, ties by step then layer


def test_the_study_compares_the_cells_with_layer_sweeps_windows_on_the_same_seeds():
    import runpy

    from dit_lens.study.cli import find_study

    module = runpy.run_path(str(find_study("localise")))
    sweep = runpy.run_path(str(find_study("layer_sweep")))["STUDY"]
    pairs = runpy.run_path(str(find_study("concept_pairs")))["PAIRS"]
    for quick in (False, True):
        windows, causal = (module["WINDOWS"].quick_version(), module["STUDY"].quick_version()) if quick else \
            (module["WINDOWS"], module["STUDY"])
        reference = sweep.quick_version() if quick else sweep
        assert windows.methods["medsteer"] == reference.methods["medsteer"]  # layer_sweep's windows, α, vector seeds
        cells = causal.methods["medsteer"]
        assert cells["where"] == ("causal", "causal_layers") and cells["top"] == (0.1,) and cells["window"] == ((0.0, 1.0),)
        for key in ("alpha", "vector_seeds"):
            assert cells[key] == reference.methods["medsteer"][key]
        for study in (windows, causal):  # the same fresh evaluation seeds, disjoint from the vector's
            assert (study.eval_seeds, study.eval_seed_base) == (reference.eval_seeds, reference.eval_seed_base)
            assert study.eval_seed_base >= study.vector_seeds()
        assert windows.pairs == causal.pairs == (pairs[:1] if quick else pairs)
    # the quick version: 7 cells of 4 pairs, 4 vector seeds, one patched seed on a 10-step grid
    assert len(windows.methods["medsteer"]["window"]) + 1 <= 8 and causal.eval_seeds * 7 <= 32
    assert causal.vector_seeds() <= 4 and cells["causal_seeds"] == (1,) and causal.num_inference_steps == 10
