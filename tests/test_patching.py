"""Exact activation patching (`dit_lens.patching`) against a hand-written patching loop: the plain pipeline call
with raw torch forward hooks that save one run's site outputs and put them into the other run."""

from functools import partial

import numpy as np
import pytest

from dit_lens import load, patching
from dit_lens.methods.axes import window_layers
from dit_lens.model.sana import SanaSpec, build_sana
from dit_lens.model.sd3 import SD3Spec, build_sd3
from dit_lens.trace.runner import Hook, traced_generate
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


def hand_patched(pipeline, site, source, target, seed, patches, call=raw_call):
    """Per patch (a set of (step, layer) cells), the `target` prompt's image with `site`'s output at those cells
    replaced by the `source` prompt's run there (every row of the guidance batch): the plain pipeline and raw
    hooks only (`call`: `raw_call`, with ``output_type="latent"`` for final latents). Returns the source image, the target
    image and one image per patch."""
    blocks = pipeline.transformer.transformer_blocks
    modules = [blocks[layer] if site == "block" else getattr(blocks[layer], site) for layer in range(len(blocks))]
    saved = {}

    def save(layer):
        return lambda t, out: saved.__setitem__((t, layer), out.clone())

    source_image = call(pipeline, source, seed, [(m, save(layer)) for layer, m in enumerate(modules)])
    target_image = call(pipeline, target, seed)

    def put(layer, cells):
        return lambda t, out: saved[(t, layer)] if (t, layer) in cells else None

    images = [call(pipeline, target, seed, [(m, put(layer, cells)) for layer, m in enumerate(modules)])
              for cells in patches]
    return source_image, target_image, images


def hand_patched_heads(pipeline, attention, source, target, seed, patches):
    """Per patch ``(cells, head)``, the `target` prompt's image with one head of an attention's output (module
    `attention` of every block), as it enters the output projection ``to_out[0]``, replaced at those cells by the
    `source` prompt's run: raw pre-hooks on the plain pipeline. Returns the source, the target and the images."""
    blocks = pipeline.transformer.transformer_blocks
    heads = getattr(blocks[0], attention).heads
    state = {"t": -1, "patch": None}
    saved = {}

    def count(module, args):
        state["t"] += 1

    def make(layer):
        def pre(module, args):  # args[0]: (rows, tokens, heads · head_dim), head-major channels
            key, x = (state["t"], layer), args[0]
            if state["patch"] is None:
                saved[key] = x.clone()
                return None
            cells, head = state["patch"]
            if key not in cells:
                return None
            width = x.shape[-1] // heads
            x = x.clone()
            x[..., head * width : (head + 1) * width] = saved[key][..., head * width : (head + 1) * width]
            return (x,)

        return pre

    handles = [pipeline.transformer.register_forward_pre_hook(count)]
    handles += [getattr(block, attention).to_out[0].register_forward_pre_hook(make(layer))
                for layer, block in enumerate(blocks)]
    try:
        source_image = raw_call(pipeline, source, seed)
        state["t"] = -1
        state["patch"] = (frozenset(), 0)
        target_image = raw_call(pipeline, target, seed)
        images = []
        for patch in patches:
            state["t"], state["patch"] = -1, patch
            images.append(raw_call(pipeline, target, seed))
    finally:
        for handle in handles:
            handle.remove()
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
    (dict(heads=True, site="ff"), r"heads patches one head of a softmax attention's output, and PixArt-alpha / "
                                  r"PixArt-Sigma's site 'ff' has none; its sites with heads are \['attn1', 'attn2'\]"),
    (dict(heads=True, site="block"), r"site 'block' has none; its sites with heads are \['attn1', 'attn2'\]"),
    (dict(heads=[2]), r"heads \[2\] are not head indices of 'attn2', which has 2 heads \(0\.\.1\)"),
    (dict(heads=[-1, 0]), r"heads \[-1\] are not head indices of 'attn2'"),
    (dict(heads=[0, 0]), r"heads has duplicates: \[0, 0\]"),
    (dict(heads=1), r"heads must be True, False or a list of head indices in 0\.\.1, got 1; e\.g\. heads=\[0\]"),
    (dict(metric_on="pixels"), r"metric_on must be 'images' \(decoded images\) or 'latents'"),
    (dict(metric_on="latents", metric=wrong_shape), r"the metric wrong_shape returned shape \(5, 2\) for 5"),
    (dict(metric_on="latents", metric=not_a_number), r"the metric not_a_number returned NaN or inf for 5 of 5"),
    (dict(method="attribution", heads=True), r"use heads=False and metric_on='images' with method='attribution'"),
    (dict(method="attribution", metric_on="latents"), r"use heads=False and metric_on='images'"),
    (dict(method="attribution"), r"the metric constant .*use .*method='exact'"),
    (dict(method="gradient"), r"method must be 'exact' \(every patched run is run\) or 'attribution'"),
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
    from dit_lens.testing import FluxSpec, build_flux

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
    # heads: the double-stream blocks (a single-stream block's heads enter its projection with the MLP's output)
    per_head = patching(flux, site="attn2", heads=[1], grid="layer", **args)
    assert per_head.effect.dims == ("seed", "layer", "head") and per_head.layer.values.tolist() == [0, 1]
    assert np.ptp(per_head.metric_patched.values) > 0
    with pytest.raises(ValueError, match=r"block 2 of Flux is one of its single_transformer_blocks, whose sites are "
                                         r"\['attn2', 'attn2.weights', 'block'\]; 'attn2.heads' exists in its "
                                         r"transformer_blocks \(blocks 0..1\)"):
        patching(flux, site="attn2", heads=True, layers=[2], **args)

    def copy(rows):
        def visit(step, layer, h):  # no guidance batch: one row per run
            out = h.clone()
            out[rows] = h[0]
            return out
        return visit

    hooks = [Hook("attn2.heads", (1,), copy(1), frozenset({1})), Hook("attn2", (1,), copy(2), frozenset({1}))]
    images = traced_generate(flux, [CLEAN, CORRUPT, CORRUPT, CORRUPT], [1, 0, 0, 0], num_inference_steps=2,
                             guidance_scale=3.5, hooks=hooks, output_type="np").images
    np.testing.assert_array_equal(images[1], images[2])  # every head at once is the whole site, bit for bit
    assert np.abs(images[1] - images[3]).max() > 1e-5


# -- one attention head at a time, metrics on latents ----------------------------------------------------------


def test_heads_agree_with_a_hand_written_per_head_patching_loop(tiny_lens):
    metric = metric_for(tiny_lens)
    out = patching(tiny_lens, clean=CLEAN, corrupt=CORRUPT, seeds=[3], metric=metric, grid="cell", heads=True,
                   layers=[1, 2], steps=[0, 2], num_inference_steps=STEPS, batch_size=5, progress=False)
    assert out.effect.dims == ("seed", "step", "layer", "head") and out.effect.shape == (1, 2, 2, 2)
    assert out["head"].values.tolist() == [0, 1] and out.attrs["heads"] is True
    patches = [({(t, l)}, head) for t in (0, 2) for l in (1, 2) for head in (0, 1)]
    clean, corrupt, images = hand_patched_heads(tiny_lens.pipeline, "attn2", CLEAN, CORRUPT, 3, patches)
    want = np.array([metric(image[None])[0] for image in images]).reshape(2, 2, 2)
    np.testing.assert_allclose(out.metric_patched.values[0], want, atol=1e-5)
    np.testing.assert_allclose(out.metric_clean.item(), metric(clean[None])[0], atol=1e-5)
    np.testing.assert_allclose(out.metric_corrupt.item(), metric(corrupt[None])[0], atol=1e-5)
    assert np.ptp(out.effect.values[0, 0, 0]) > 1e-3  # the two heads of a cell differ: not one number twice
    # a list of heads: those heads only, the same values
    one = patching(tiny_lens, clean=CLEAN, corrupt=CORRUPT, seeds=[3], metric=metric, grid="cell", heads=[1],
                   layers=[2], steps=[2], num_inference_steps=STEPS, progress=False)
    assert one["head"].values.tolist() == [1]
    np.testing.assert_allclose(one.metric_patched.values[0, 0, 0, 0], want[1, 1, 1], atol=1e-5)


def test_every_head_of_a_cell_patched_at_once_is_the_whole_site_patched_there(tiny_lens):
    # rows: the source, one run patched through every head, one patched whole, one left alone; two guidance halves
    def every_head(step, layer, h):  # (8, tokens, heads · head_dim)
        out = h.clone()
        out[[1, 5]] = h[[0, 4]]
        return out

    def whole(step, layer, h):  # (8, tokens, C)
        out = h.clone()
        out[[2, 6]] = h[[0, 4]]
        return out

    for site in ("attn1", "attn2"):  # the cells (steps 1, 2; blocks 1, 2)
        hooks = [Hook(f"{site}.heads", (1, 2), every_head, frozenset({1, 2})),
                 Hook(site, (1, 2), whole, frozenset({1, 2}))]
        # the source from another seed, so that attn1 (which hardly tells the prompts apart) differs too
        images = traced_generate(tiny_lens, [CLEAN, CORRUPT, CORRUPT, CORRUPT], [1, 0, 0, 0],
                                 num_inference_steps=STEPS, guidance_scale=4.5, hooks=hooks, output_type="np").images
        np.testing.assert_array_equal(images[1], images[2])  # within one batch: bit for bit
        assert np.abs(images[1] - images[3]).max() > 1e-5  # and the patch changed the image


def test_heads_on_sd3_joint_attention_agree_with_a_hand_written_loop():
    sd3 = load(build_sd3(SD3Spec(num_layers=2), seed=0))
    metric = metric_for(sd3)
    out = patching(sd3, clean=CLEAN, corrupt=CORRUPT, seeds=[1], metric=metric, grid="layer", heads=True,
                   num_inference_steps=STEPS, progress=False)
    assert out.effect.dims == ("seed", "layer", "head") and out.effect.shape == (1, 2, 2)
    patches = [({(t, l) for t in range(STEPS)}, head) for l in (0, 1) for head in (0, 1)]
    clean, corrupt, images = hand_patched_heads(sd3.pipeline, "attn", CLEAN, CORRUPT, 1, patches)
    want = np.array([metric(image[None])[0] for image in images]).reshape(2, 2)
    np.testing.assert_allclose(out.metric_patched.values[0], want, atol=1e-5)
    np.testing.assert_allclose([out.metric_clean.item(), out.metric_corrupt.item()],
                               [metric(clean[None])[0], metric(corrupt[None])[0]], atol=1e-5)
    assert np.ptp(out.metric_patched.values) > 1e-4


def test_heads_are_refused_where_attention_has_no_per_head_softmax_output():
    sana = load(build_sana(SanaSpec(num_layers=2), seed=0))
    args = dict(clean=CLEAN, corrupt=CORRUPT, seeds=[0], metric=constant, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"heads patches one head of a softmax attention's output, and SANA's site "
                                         r"'attn1' has none; its sites with heads are \['attn2'\]"):
        patching(sana, site="attn1", heads=True, **args)


def test_metric_on_latents_scores_the_final_latents_and_decodes_only_the_clean_and_corrupt_runs(tiny_lens):
    weights = np.random.default_rng(1).standard_normal(4 * 8 * 8)
    seen, decoded = [], []

    def latent_score(latents):
        seen.append((latents.shape, latents.dtype))
        return np.array([float(z.astype(np.float64).ravel() @ weights) for z in latents])

    decoder = tiny_lens.pipeline.vae.decoder.register_forward_hook(lambda m, a, out: decoded.append(len(out)))
    try:
        out = patching(tiny_lens, clean=CLEAN, corrupt=CORRUPT, seeds=[2, 3], metric=latent_score, grid="layer",
                       metric_on="latents", num_inference_steps=STEPS, progress=False)
    finally:
        decoder.remove()
    assert {shape[1:] for shape, _ in seen} == {(4, 8, 8)} and {dtype for _, dtype in seen} == {np.dtype(np.float32)}
    assert sum(decoded) == 4  # each seed's clean and corrupt run, once; no patched run is decoded
    assert out.effect.dims == ("seed", "layer") and out.attrs["metric_on"] == "latents"
    assert out.latent_clean.dims == ("seed", "channel", "h", "w") and out.latent_clean.shape == (2, 4, 8, 8)
    clean, corrupt, latents = hand_patched(tiny_lens.pipeline, "attn2", CLEAN, CORRUPT, 3,
                                           [{(t, l) for t in range(STEPS)} for l in range(3)], call=partial(raw_call, output_type="latent"))
    rounding = 1e-5 * np.abs(clean).max()  # float rounding of latents far from unit scale
    np.testing.assert_allclose(out.latent_clean.sel(seed=3).values, clean, atol=rounding, rtol=0)
    np.testing.assert_allclose(out.latent_corrupt.sel(seed=3).values, corrupt, atol=rounding, rtol=0)
    rounding *= np.abs(weights).sum()
    np.testing.assert_allclose(out.metric_patched.sel(seed=3).values, latent_score(np.stack(latents)), atol=rounding,
                               rtol=0)
    np.testing.assert_allclose([out.metric_clean.sel(seed=3).item(), out.metric_corrupt.sel(seed=3).item()],
                               latent_score(np.stack([clean, corrupt])), atol=rounding, rtol=0)
    assert np.ptp(out.metric_patched.values) > 100 * rounding  # the patched runs differ beyond rounding
    assert np.ptp(out.effect.values) > 1e-3
    # the clean and corrupt images are still there, as the images metric makes them
    _, corrupt_image, _ = hand_patched(tiny_lens.pipeline, "attn2", CLEAN, CORRUPT, 3, [])
    np.testing.assert_allclose(out.image_corrupt.sel(seed=3).values, corrupt_image, atol=1e-5)


def test_method_attribution_is_attribution_patching(tiny_lens):
    """patching(method="attribution") is attribution_patching with the same settings, bit for bit."""
    import torch

    from dit_lens import attribution_patching

    def mean_red(images):  # differentiable on torch images (n, H, W, 3)
        return images[..., 0].mean(dim=(1, 2)) if isinstance(images, torch.Tensor) else images[..., 0].mean(axis=(1, 2))

    args = dict(clean=CLEAN, corrupt=CORRUPT, seeds=[0, 1], metric=mean_red, grid="layer", num_inference_steps=2,
                progress=False)
    via = patching(tiny_lens, method="attribution", **args)
    direct = attribution_patching(tiny_lens, **args)
    assert via.attrs["method"] == "attribution"
    np.testing.assert_array_equal(via.effect.values, direct.effect.values)
    assert not np.allclose(via.effect.values, 0)
