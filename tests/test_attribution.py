"""Attribution patching (`dit_lens.readouts.attribution`) against derivatives of the plain pipeline call: a
central finite difference of the run whose site output is moved a little towards the other prompt's, made
with raw torch forward hooks; and against exact patching (`dit_lens.patching`) on the same tiny model."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from dit_lens import load, load_oracle, patching
from dit_lens.model.builders import PixArtSpec, build_pixart
from dit_lens.readouts.attribution import attribution_patching, class_logprob

STEPS = 3
CLEAN, CORRUPT = "a red polyp", "a pale mucosa"
SPEC = PixArtSpec(num_layers=3, num_heads=2, head_dim=8, sample_size=8, patch_size=2)


class Curved:
    """A smooth, nonlinear metric on numpy or torch images (n, H, W, 3) -> (n,): tanh of a fixed random projection
    of every pixel (first order is not exact for it)."""

    name = "curved"

    def __init__(self, side: int) -> None:
        size = side * side * 3
        self.weights = np.random.default_rng(0).standard_normal(size) / np.sqrt(size)

    def __call__(self, images):
        if isinstance(images, torch.Tensor):
            flat = images.reshape(len(images), -1).double()
            return torch.tanh(3 * flat @ torch.as_tensor(self.weights, device=flat.device))
        return np.tanh(3 * np.asarray(images, np.float64).reshape(len(images), -1) @ self.weights)


#: The finite difference's step: the sampler rounds its latents to float32 at every step (DPM-Solver upcasts
#: them), which blurs differences far smaller than this.
EPS = 1e-2


@pytest.fixture
def precise():
    """The tiny pipeline in float64, so finite differences resolve the smallest cells."""
    return load(build_pixart(SPEC, seed=0), dtype=torch.float64)


def pipeline_image(lens, prompt, seed, edits=(), site="attn2"):
    """The plain pipeline call, image ``(1, H, W, 3)`` as torch in the model's dtype, with raw forward hooks on
    `site` (``"block"``: the block): ``edits`` is ``[(layer, fn(step, output) -> output | None)]``."""
    pipe, state = lens.pipeline, {"t": -1}
    handles = [pipe.transformer.register_forward_pre_hook(lambda m, a: state.__setitem__("t", state["t"] + 1))]
    for layer, fn in edits:
        block = pipe.transformer.transformer_blocks[layer]
        module = block if site == "block" else getattr(block, site)
        handles.append(module.register_forward_hook(lambda m, a, out, fn=fn: fn(state["t"], out)))
    try:
        images = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=STEPS,
                      guidance_scale=4.5, output_type="pt", use_resolution_binning=False, clean_caption=False,
                      height=lens.pipeline_kwargs["height"], width=lens.pipeline_kwargs["width"]).images
    finally:
        for handle in handles:
            handle.remove()
    return images.permute(0, 2, 3, 1)


def towards(lens, source, own, seed, metric, cells, eps, site="attn2"):
    """Central difference of the metric of `own`'s run whose `site` output at `cells` is moved by ±eps towards
    `source`'s run there: (m(+eps) − m(−eps)) / (2·eps)."""
    saved = {}

    def save(layer):
        return lambda t, out: saved.__setitem__((t, layer), out.clone())

    pipeline_image(lens, source, seed, [(layer, save(layer)) for layer in range(lens.num_layers)], site)

    def moved(sign):
        def put(layer):
            return lambda t, out: out + sign * eps * (saved[(t, layer)] - out) if (t, layer) in cells else None

        image = pipeline_image(lens, own, seed, [(layer, put(layer)) for layer in range(lens.num_layers)], site)
        return float(metric(image)[0])

    return (moved(1) - moved(-1)) / (2 * eps)


# attn2 of the empty prompt attends to one text token: the same output in both runs, so the unconditional half
# adds nothing there; the block's output differs in both halves
@pytest.mark.parametrize("site, direction", [("attn2", "denoise"), ("attn2", "noise"), ("block", "denoise")])
def test_each_cell_is_the_derivative_of_the_pipeline_run_moved_towards_the_other_prompt(precise, site, direction):
    metric = Curved(precise.pipeline_kwargs["height"])
    own, source = (CORRUPT, CLEAN) if direction == "denoise" else (CLEAN, CORRUPT)
    out = attribution_patching(precise, clean=CLEAN, corrupt=CORRUPT, seeds=[3], metric=metric, site=site,
                               direction=direction, num_inference_steps=STEPS, progress=False)
    own_score = out.metric_corrupt if direction == "denoise" else out.metric_clean
    first = (out.metric_patched - own_score).sel(seed=3).values  # (step, layer): Σ (a_source − a_own) · ∂m/∂a_own
    reference = np.array([[towards(precise, source, own, 3, metric, {(t, l)}, EPS, site) for l in range(3)]
                          for t in range(STEPS)])
    assert np.abs(reference).min() > 1e-7  # every cell moves the metric
    np.testing.assert_allclose(first, reference, rtol=2e-3)
    # the own run is the plain pipeline's run, and the effect is patching's ratio of the estimate
    np.testing.assert_allclose(own_score.item(), float(metric(pipeline_image(precise, own, 3))[0]), rtol=1e-12)
    spread = (out.metric_clean - out.metric_corrupt).item()
    np.testing.assert_allclose(out.effect.values, (out.metric_patched - out.metric_corrupt).values / spread)


def test_the_sum_over_every_cell_is_the_derivative_of_the_whole_run_moved_at_once(precise):
    metric = Curved(precise.pipeline_kwargs["height"])
    out = attribution_patching(precise, clean=CLEAN, corrupt=CORRUPT, seeds=[4], metric=metric, grid=[(None, None)],
                               num_inference_steps=STEPS, progress=False)
    cells = {(t, l) for t in range(STEPS) for l in range(3)}
    reference = towards(precise, CLEAN, CORRUPT, 4, metric, cells, EPS)
    np.testing.assert_allclose((out.metric_patched - out.metric_corrupt).item(), reference, rtol=2e-3)


def test_attribution_ranks_the_cells_as_exact_patching_does(tiny_lens):
    metric = Curved(tiny_lens.pipeline_kwargs["height"])
    kwargs = dict(clean=CLEAN, corrupt=CORRUPT, seeds=[3, 4], metric=metric, num_inference_steps=STEPS, progress=False)
    exact = patching(tiny_lens, **kwargs)
    first = attribution_patching(tiny_lens, **kwargs)
    for seed in (3, 4):
        rho = spearmanr(exact.effect.sel(seed=seed).values.ravel(), first.effect.sel(seed=seed).values.ravel())[0]
        assert rho > 0.9, f"seed {seed}: rank correlation {rho:.3f} with exact patching"
    # the same layout, coordinates and attrs as exact patching; the same clean and corrupt runs
    assert set(first.data_vars) == set(exact.data_vars) and first.effect.dims == exact.effect.dims
    assert {k: v.values.tolist() for k, v in first.coords.items()} == \
        {k: v.values.tolist() for k, v in exact.coords.items()}
    assert first.attrs.keys() == exact.attrs.keys() and first.attrs["method"] == "attribution"
    same = {k for k in exact.attrs if k not in ("method", "batch_size")}
    assert {k: first.attrs[k] for k in same} == {k: exact.attrs[k] for k in same}
    for name in ("image_clean", "image_corrupt", "metric_clean", "metric_corrupt"):
        np.testing.assert_allclose(first[name].values, exact[name].values, atol=1e-5)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_layer_step_and_window_grids_are_sums_of_the_cell_grid(tiny_lens, direction):
    metric = Curved(tiny_lens.pipeline_kwargs["height"])

    def run(**kwargs):
        out = attribution_patching(tiny_lens, clean=CLEAN, corrupt=CORRUPT, seeds=[5], metric=metric,
                                   direction=direction, num_inference_steps=STEPS, progress=False, **kwargs)
        own = out.metric_corrupt if direction == "denoise" else out.metric_clean
        return out, out.metric_patched - own

    cell, first = run()
    assert np.abs(first).min() > 0
    layer = run(grid="layer", layers=[0, 2])[1]
    np.testing.assert_allclose(layer.values, first.sel(layer=[0, 2]).sum("step").values, rtol=0, atol=1e-15)
    step = run(grid="step", steps=[1, 2])[1]
    np.testing.assert_allclose(step.values, first.sel(step=[1, 2]).sum("layer").values, rtol=0, atol=1e-15)
    windows, summed = run(grid=[(None, None), ([1], (0, 0.5)), ((0.5, 1), [2])])
    expected = [first.sum(), first.sel(layer=1, step=[0, 1]).sum(), first.sel(layer=[2], step=2).sum()]
    np.testing.assert_allclose(summed.values[0], [float(e) for e in expected], rtol=0, atol=1e-15)
    assert windows.attrs["patches"][1] == [[0, 1], [1, 1]]
    # effect is patching's ratio: for "noise" 1 + Σ / spread, so the windows' effects are not sums of effects
    spread = (cell.metric_clean - cell.metric_corrupt).item()
    np.testing.assert_allclose(windows.effect.values, (windows.metric_patched - windows.metric_corrupt).values / spread)


def test_checkpointing_batching_and_a_second_call_change_nothing(tiny_lens):
    metric = Curved(tiny_lens.pipeline_kwargs["height"])
    kwargs = dict(clean=CLEAN, corrupt=CORRUPT, seeds=[6, 7, 8], metric=metric, num_inference_steps=STEPS,
                  progress=False)
    once = attribution_patching(tiny_lens, **kwargs)
    again = attribution_patching(tiny_lens, **kwargs)
    stored = attribution_patching(tiny_lens, checkpoint=False, **kwargs)  # every step's activations kept
    for out in (again, stored):
        np.testing.assert_array_equal(out.effect.values, once.effect.values)
        np.testing.assert_array_equal(out.image_clean.values, once.image_clean.values)
    single = attribution_patching(tiny_lens, batch_size=1, **kwargs)  # one seed per run: float rounding only
    np.testing.assert_allclose(single.metric_patched.values, once.metric_patched.values, rtol=1e-5, atol=1e-7)
    assert single.attrs["batch_size"] == 1 and once.attrs["batch_size"] == 4
    alone = attribution_patching(tiny_lens, **{**kwargs, "seeds": [7]})
    np.testing.assert_allclose(alone.effect.values[0], once.effect.sel(seed=7).values, rtol=1e-4, atol=1e-7)


def numpy_brightness(images):
    return np.asarray(images).mean(axis=(1, 2, 3))


def detached_brightness(images):
    return images.detach().mean(dim=(1, 2, 3))


def listed_brightness(images):
    return [image.mean().item() for image in images]


@pytest.mark.parametrize("metric", [numpy_brightness, detached_brightness, listed_brightness])
def test_a_metric_without_a_gradient_is_refused_naming_exact_patching(tiny_lens, metric):
    with pytest.raises(ValueError, match=rf"metric {metric.__name__}.*method='exact'"):
        attribution_patching(tiny_lens, clean=CLEAN, corrupt=CORRUPT, seeds=[0], metric=metric,
                             num_inference_steps=2, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(corrupt=CLEAN), "same prompt"),
    (dict(direction="sideways"), "direction must be 'denoise'"),
    (dict(metric="brightness"), "metric must be a callable"),
    (dict(grid="block"), "grid must be 'cell'"),
    (dict(site="attn2.weights"), "patching copies a site's output"),
    (dict(layers=[7]), r"layers must be block indices in 0\.\.2"),
    (dict(batch_size=0), "batch_size"),
    (dict(checkpoint="yes"), "checkpoint must be True or False"),
    (dict(metric=lambda images: images.mean(dim=(1, 2))), r"returned shape \(1, 3\) for 1 images"),
])
def test_bad_input_is_refused_naming_what_to_change(tiny_lens, kwargs, message):
    call = {**dict(clean=CLEAN, corrupt=CORRUPT, seeds=[0], metric=lambda images: images.mean(dim=(1, 2, 3)),
                   num_inference_steps=2, progress=False), **kwargs}
    with pytest.raises(ValueError, match=message):
        attribution_patching(tiny_lens, **call)


def test_class_logprob_reads_numpy_and_torch_images_and_has_a_gradient():
    oracle = load_oracle()
    metric = class_logprob(oracle, "polyps")
    images = np.random.default_rng(0).uniform(0, 1, (3, 64, 64, 3)).astype(np.float32)
    scores = metric(images)  # numpy in, numpy out: what exact patching and studies pass
    assert isinstance(scores, np.ndarray) and scores.shape == (3,)
    np.testing.assert_allclose(scores, np.log(oracle(images)[:, oracle.labels.index("polyps")]), rtol=1e-5)
    x = torch.from_numpy(images).requires_grad_(True)
    tensor = metric(x)  # torch in, torch out with a gradient: what attribution patching passes
    assert isinstance(tensor, torch.Tensor) and tensor.requires_grad
    np.testing.assert_allclose(tensor.detach().double().numpy(), scores, rtol=1e-6)
    (grad,) = torch.autograd.grad(tensor.sum(), x)
    assert grad.shape == x.shape and float(grad.abs().sum()) > 0
    assert metric.name.startswith("class_logprob('polyps', oracle=")
    other = class_logprob(oracle, "normal cecum")
    assert other.name != metric.name and not np.allclose(other(images), scores)


def test_class_logprob_refuses_an_unknown_label_and_images_of_another_shape():
    oracle = load_oracle()
    with pytest.raises(ValueError, match=r"'normal-cecum' is not a class of the oracle; choose one of"):
        class_logprob(oracle, "normal-cecum")
    with pytest.raises(ValueError, match=r"takes images of shape \(n, H, W, 3\)"):
        class_logprob(oracle, "polyps")(np.zeros((2, 3, 64, 64), np.float32))


def test_class_logprob_serves_exact_and_attribution_patching(tiny_lens):
    metric = class_logprob(load_oracle(), "polyps")
    kwargs = dict(clean=CLEAN, corrupt=CORRUPT, seeds=[3], metric=metric, grid="layer", num_inference_steps=STEPS,
                  progress=False)
    exact, first = patching(tiny_lens, **kwargs), attribution_patching(tiny_lens, **kwargs)
    assert exact.attrs["metric"] == first.attrs["metric"] == metric.name
    np.testing.assert_allclose(first.metric_clean.values, exact.metric_clean.values, rtol=1e-5)
    assert np.isfinite(first.effect.values).all() and np.abs(first.effect.values).max() > 0
