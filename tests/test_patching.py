"""Exact activation patching (`dit_lens.patching`) against a hand-written patching loop: the plain pipeline call
with raw torch forward hooks that save one run's site outputs and put them into the other run."""

import numpy as np
import pytest

from dit_lens import load, patching
from dit_lens.methods.axes import window_layers
from dit_lens.model.sana import SanaSpec, build_sana
from test_families import raw_call  # the plain call with raw hooks, the one reference of every family test

STEPS = 3
CLEAN, CORRUPT = "a red polyp", "a pale mucosa"


class Projection:
    """A metric that tells images apart: a fixed random projection of every pixel, (n, H, W, 3) -> (n,)."""

    name = "projection"

    def __init__(self, size: int) -> None:
        self.weights = np.random.default_rng(0).standard_normal(size) / np.sqrt(size)

    def __call__(self, images):  # image by image: a batched product may round rows differently
        return np.array([float(image.astype(np.float64).ravel() @ self.weights) for image in images])


def metric_for(lens):
    side = lens.pipeline_kwargs["height"]
    return Projection(side * side * 3)


def hand_patched(pipeline, site, source, target, seed, patches):
    """Per patch (a set of (step, layer) cells), the `target` prompt's image with `site`'s output at those cells
    replaced by the `source` prompt's run there (every row of the guidance batch): the plain pipeline and raw
    hooks only. Returns the source image, the target image and one image per patch."""
    blocks = pipeline.transformer.transformer_blocks
    modules = [blocks[layer] if site == "block" else getattr(blocks[layer], site) for layer in range(len(blocks))]
    saved = {}

    def save(layer):
        return lambda t, out: saved.__setitem__((t, layer), out.clone())

    source_image = raw_call(pipeline, source, seed, [(m, save(layer)) for layer, m in enumerate(modules)])
    target_image = raw_call(pipeline, target, seed)

    def put(layer, cells):
        return lambda t, out: saved[(t, layer)] if (t, layer) in cells else None

    images = [raw_call(pipeline, target, seed, [(m, put(layer, cells)) for layer, m in enumerate(modules)])
              for cells in patches]
    return source_image, target_image, images


def test_patching_attn2_everywhere_makes_the_clean_image_and_the_corrupt_row_is_the_corrupt_image(tiny_lens):
    pipeline, metric = tiny_lens.pipeline, metric_for(tiny_lens)
    out = patching(tiny_lens, clean=CLEAN, corrupt=CORRUPT, seeds=[3], metric=metric, grid=[(None, None)],
                   num_inference_steps=STEPS, progress=False)
    assert out.effect.dims == ("seed", "window") and out.effect.shape == (1, 1)
    # within one batch the patched row is the clean row bit for bit: text reaches image tokens only through attn2
    assert out.metric_patched.item() == out.metric_clean.item() and out.effect.item() == 1.0
    clean, corrupt, (whole,) = hand_patched(pipeline, "attn2", CLEAN, CORRUPT, 3,
                                            [{(t, l) for t in range(STEPS) for l in range(tiny_lens.num_layers)}])
    np.testing.assert_array_equal(whole, clean)  # the raw-hook reference says the same, bit for bit
    assert np.abs(clean - corrupt).max() > 1e-2  # the prompts make different images
    # across batches, to float rounding only
    np.testing.assert_allclose(out.image_clean.values[0], clean, atol=1e-5)
    np.testing.assert_allclose(out.image_corrupt.values[0], corrupt, atol=1e-5)
    np.testing.assert_allclose(out.metric_clean.item(), metric(clean[None])[0], atol=1e-5)
    np.testing.assert_allclose(out.metric_corrupt.item(), metric(corrupt[None])[0], atol=1e-5)
    assert out.attrs["patches"] == [[[t, l] for t in range(STEPS) for l in range(3)]]


def test_the_cell_grid_agrees_with_a_hand_written_patching_loop(tiny_lens):
    metric = metric_for(tiny_lens)
    out = patching(tiny_lens, clean=CLEAN, corrupt=CORRUPT, seeds=[3, 4], metric=metric, grid="cell",
                   num_inference_steps=STEPS, batch_size=4, progress=False)  # calls that hold two seeds
    assert out.effect.dims == ("seed", "step", "layer") and out.effect.shape == (2, STEPS, 3)
    assert out.step.values.tolist() == [0, 1, 2] and out.timestep.dims == ("step",)
    cells = [(t, l) for t in range(STEPS) for l in range(3)]
    for seed in (3, 4):
        clean, corrupt, images = hand_patched(tiny_lens.pipeline, "attn2", CLEAN, CORRUPT, seed,
                                              [{cell} for cell in cells])
        m_clean, m_corrupt = metric(clean[None])[0], metric(corrupt[None])[0]
        want = np.array([metric(image[None])[0] for image in images]).reshape(STEPS, 3)
        got = out.sel(seed=seed)
        np.testing.assert_allclose(got.metric_patched.values, want, atol=1e-5)
        np.testing.assert_allclose([got.metric_clean.item(), got.metric_corrupt.item()], [m_clean, m_corrupt], atol=1e-5)
        spread = got.metric_clean.item() - got.metric_corrupt.item()
        np.testing.assert_allclose(got.effect.values, (got.metric_patched.values - got.metric_corrupt.item()) / spread,
                                   rtol=1e-12)
        assert np.ptp(got.effect.values) > 0.05  # cells differ: the comparison is not of constants


def test_noise_direction_and_layer_and_step_grids_agree_with_the_hand_written_loop(tiny_lens):
    metric = metric_for(tiny_lens)
    layer_grid = patching(tiny_lens, clean=CLEAN, corrupt=CORRUPT, seeds=[5], metric=metric, grid="layer",
                          direction="noise", num_inference_steps=STEPS, batch_size=2, progress=False)
    assert layer_grid.effect.dims == ("seed", "layer") and layer_grid.layer.values.tolist() == [0, 1, 2]
    # "noise": the clean prompt runs with the corrupt run's activation
    _, _, images = hand_patched(tiny_lens.pipeline, "attn2", CORRUPT, CLEAN, 5,
                                [{(t, l) for t in range(STEPS)} for l in range(3)])
    want = np.array([metric(image[None])[0] for image in images])
    np.testing.assert_allclose(layer_grid.metric_patched.values[0], want, atol=1e-5)
    step_grid = patching(tiny_lens, clean=CLEAN, corrupt=CORRUPT, seeds=[5], metric=metric, grid="step", site="ff",
                         layers=[0, 2], steps=[1, 2], num_inference_steps=STEPS, batch_size=1, progress=False)
    assert step_grid.effect.dims == ("seed", "step") and step_grid.step.values.tolist() == [1, 2]
    _, _, images = hand_patched(tiny_lens.pipeline, "ff", CLEAN, CORRUPT, 5, [{(t, 0), (t, 2)} for t in (1, 2)])
    want = np.array([metric(image[None])[0] for image in images])
    np.testing.assert_allclose(step_grid.metric_patched.values[0], want, atol=1e-5)
    everywhere = patching(tiny_lens, clean=CLEAN, corrupt=CORRUPT, seeds=[5], metric=metric, grid=[(None, None)],
                          direction="noise", num_inference_steps=STEPS, progress=False)
    assert everywhere.metric_patched.item() == everywhere.metric_corrupt.item() and everywhere.effect.item() == 0.0


def test_windows_are_fractions_as_tuples_or_indices_as_lists(tiny_lens):
    metric = metric_for(tiny_lens)
    out = patching(tiny_lens, clean=CLEAN, corrupt=CORRUPT, seeds=[1], metric=metric,
                   grid=[((0, 0.5), None), ([2], (0.5, 1)), (range(1, 3), [0])], site="block",
                   num_inference_steps=STEPS, progress=False)
    assert out.layer_window.values.tolist() == ["0-0.5", "2", "1,2"]
    assert out.step_window.values.tolist() == ["all", "0.5-1", "0"]
    first, second, third = out.attrs["windows"]
    assert first["layers"] == window_layers((0, 0.5), 3) == [0, 1] and first["steps"] == [0, 1, 2]
    assert second["layers"] == [2] and second["steps"] == window_layers((0.5, 1), STEPS) == [2]
    assert third == {"layer_window": "1,2", "step_window": "0", "layers": [1, 2], "steps": [0]}
    assert out.attrs["direction"] == "denoise" and out.attrs["metric"] == "projection"
    assert out.attrs["model_fingerprint"] == tiny_lens.fingerprint and out.attrs["seeds"] == [1]


def test_patching_attn2_everywhere_makes_the_clean_image_on_sana():
    sana = load(build_sana(SanaSpec(num_layers=2), seed=0))
    metric = metric_for(sana)
    out = patching(sana, clean=CLEAN, corrupt=CORRUPT, seeds=[2], metric=metric, grid=[(None, None), (None, [0])],
                   num_inference_steps=STEPS, progress=False)
    assert out.metric_patched.values[0, 0] == out.metric_clean.item()  # the same batch: bit for bit
    clean, corrupt, (whole, first) = hand_patched(
        sana.pipeline, "attn2", CLEAN, CORRUPT, 2, [{(t, l) for t in range(STEPS) for l in range(2)}, {(0, 0), (0, 1)}])
    np.testing.assert_array_equal(whole, clean)
    np.testing.assert_allclose(out.metric_patched.values[0, 1], metric(first[None])[0], atol=1e-5)
    np.testing.assert_allclose(out.metric_corrupt.item(), metric(corrupt[None])[0], atol=1e-5)


def test_a_metric_that_cannot_tell_the_prompts_apart_gives_nan_with_a_warning(tiny_lens):
    with pytest.warns(UserWarning, match=r"the metric constant scores the clean and the corrupt image alike at seeds \[0\]"):
        out = patching(tiny_lens, clean=CLEAN, corrupt=CORRUPT, seeds=[0], metric=constant, grid="layer", num_inference_steps=2, progress=False)
    assert np.isnan(out.effect.values).all() and (out.metric_patched.values == 1.0).all()


def constant(images):
    return np.ones(len(images))


def wrong_shape(images):
    return np.ones((len(images), 2))


def not_a_number(images):
    return np.full(len(images), np.nan)


@pytest.mark.parametrize("kwargs, message", [
    (dict(site="attn3"), r"unknown site 'attn3' for PixArtTransformer2DModel"),
    (dict(site="attn2.weights"), r"patching copies a site's output: choose one of \['attn1', 'attn2', 'ff', 'block'\]"),
    (dict(corrupt=CLEAN), r"clean and corrupt are the same prompt \('a red polyp'\)"),
    (dict(seeds=[]), r"seeds is empty"),
    (dict(metric=wrong_shape), r"the metric wrong_shape returned shape \(5, 2\) for 5 images; it must return one "
                               r"number per image, shape \(5,\)"),
    (dict(metric=not_a_number), r"the metric not_a_number returned NaN or inf for 5 of 5 images"),
    (dict(heads=True), r"heads=True\) is not available yet"),
    (dict(method="attribution"), r"attribution patching \(method='attribution'\) is not available yet"),
    (dict(direction="up"), r"direction must be 'denoise'"),
    (dict(grid=[]), r"grid is an empty list: there is nothing to patch"),
    (dict(grid="cells"), r"grid must be 'cell', 'layer', 'step' or a list"),
    (dict(grid=[((2, 5), None)]), r"a block window is fractions \(start, stop\)"),
    (dict(grid=[([0.5], None)]), r"a list of blocks must hold integer indices.*write fractions as a tuple"),
    (dict(grid=[([7], None)]), r"blocks \[7\] are not among the 3 blocks this patch can reach \(0\.\.2\)"),
    (dict(grid=[(None, None)], layers=[0]), r"layers= and steps= choose the rows"),
    (dict(layers=[3]), r"layers must be block indices in 0\.\.2, got 3"),
    (dict(steps=[2]), r"steps \[2\] are not among the 2 steps"),
    (dict(batch_size=0), r"batch_size must be an integer >= 1"),
])
def test_bad_input_is_refused_naming_what_to_change(tiny_lens, kwargs, message):
    args = dict(clean=CLEAN, corrupt=CORRUPT, seeds=[0], metric=constant, grid="layer", num_inference_steps=2,
                progress=False)
    with pytest.raises(ValueError, match=message):
        patching(tiny_lens, **{**args, **kwargs})


def test_each_call_holds_the_runs_it_copies_from_and_each_unpatched_run_once(tiny_lens):
    sizes = []

    def counted(images):
        sizes.append(len(images))
        return images.mean(axis=(1, 2, 3))

    out = patching(tiny_lens, clean=CLEAN, corrupt=CORRUPT, seeds=[0, 1], metric=counted, grid="layer",
                   num_inference_steps=2, batch_size=2, progress=False)
    # calls of patched runs (seed 0: layers 0, 1), (seed 0: layer 2; seed 1: layer 0), (seed 1: layers 1, 2), beside
    # each seed's clean run, and its corrupt run in its first call
    assert sizes == [2 + 2, 2 + 1 + 2, 2 + 1]
    assert np.isfinite(out.effect.values).all() and out.attrs["batch_size"] == 2


def test_flux_patches_the_blocks_of_either_list_that_have_the_site():
    from dit_lens import FluxSpec, build_flux

    flux = load(build_flux(FluxSpec(num_layers=2, num_single_layers=2), seed=0))
    args = dict(clean=CLEAN, corrupt=CORRUPT, seeds=[0], metric=metric_for(flux), num_inference_steps=2,
                progress=False)
    out = patching(flux, site="ff", grid="layer", **args)
    assert out.layer.values.tolist() == [0, 1]  # the double-stream blocks: the single-stream ones have no ff
    both = patching(flux, site="attn2", grid=[((0.5, 1), None), (None, None)], **args)
    assert both.attrs["windows"][0]["layers"] == [2, 3] and both.attrs["windows"][1]["layers"] == [0, 1, 2, 3]
    assert np.ptp(both.metric_patched.values) > 0 and np.isfinite(both.effect.values).all()
    with pytest.raises(ValueError, match=r"block 2 of Flux is one of its single_transformer_blocks"):
        patching(flux, site="ff", layers=[2], **args)
