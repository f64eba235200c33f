"""x0_lens and the output head: the head is the denoiser's own, the last block's prediction is the model's,
the last step's prediction is the image the run returns, and the lens reads edited runs."""

import numpy as np
import pytest
import torch

from dit_lens import load
from dit_lens.interventions.blend import Blend
from dit_lens.interventions.generate import generate
from dit_lens.interventions.steer import Steer
from dit_lens.model.builders import PixArtSpec, build_pixart
from dit_lens.model.flux import FluxSpec, build_flux
from dit_lens.model.head import apply_head, head_of
from dit_lens.model.sana import SanaSpec, build_sana
from dit_lens.model.sd3 import SD3Spec, build_sd3
from dit_lens.readouts.x0_lens import x0_lens
from test_steer import unit_vector

BUILDERS = {
    "pixart": lambda: build_pixart(PixArtSpec(num_layers=2), seed=0),
    "pixart-v": lambda: build_pixart(PixArtSpec(num_layers=2, prediction_type="v_prediction"), seed=0),
    "sana": lambda: build_sana(SanaSpec(num_layers=2), seed=0),
    "sd3": lambda: build_sd3(SD3Spec(num_layers=2), seed=0),
    "flux": lambda: build_flux(FluxSpec(num_layers=1, num_single_layers=2), seed=0),
}


@pytest.fixture(scope="module")
def pixart():
    return load(BUILDERS["pixart"]())


@pytest.mark.parametrize("name", ["pixart", "sana", "sd3", "flux"])
def test_the_head_on_the_last_block_is_the_denoiser_output(name):
    """Raw torch hooks read the last block's image stream and the denoiser's output in a plain pipeline call;
    the head applied to the one must give the other, bit for bit."""
    lens = load(BUILDERS[name]())
    denoiser, last = lens.denoiser, lens.num_layers - 1
    seen = {}
    head = head_of(lens)
    hooks = [
        lens.blocks[last].register_forward_hook(lambda _m, _i, out: seen.__setitem__("block", out)),
        getattr(denoiser, head.embedding).register_forward_hook(
            lambda _m, _i, out: seen.__setitem__("embedding", out if head.index is None else out[head.index])),
        denoiser.register_forward_hook(lambda _m, _i, out: seen.__setitem__("output", out[0])),
    ]
    try:
        lens.plain("a polyp", seed=0, num_inference_steps=2)
    finally:
        for hook in hooks:
            hook.remove()
    hidden = lens.part(last).read("block", seen["block"])  # (rows, image tokens, C)
    with torch.no_grad():
        predicted = apply_head(lens, hidden, seen["embedding"])
    output = lens.family.unpack_latents(seen["output"], lens.token_grid)  # Flux's packed tokens as a grid
    assert predicted.shape == output.shape
    assert torch.equal(predicted, output)


@pytest.mark.parametrize("name", ["pixart", "pixart-v", "sana", "sd3", "flux"])
def test_last_block_is_the_models_x0_and_last_step_is_the_returned_image(name):
    lens = load(BUILDERS[name]())
    ds = x0_lens(lens, ["a polyp", "a red polyp"], seeds=[0, 3], num_inference_steps=3, progress=False)
    assert ds.image.dims == ("prompt", "seed", "step", "layer", "y", "x", "rgb")
    assert ds.image.dtype == np.float32 and float(ds.image.min()) >= 0 and float(ds.image.max()) <= 1
    assert ds.layer.values.tolist() == list(range(lens.num_layers)) and ds.step.values.tolist() == [0, 1, 2]
    # the last block through the head is the denoiser's output (as the sampler reads it) at every step
    np.testing.assert_allclose(ds.image.isel(layer=-1), ds.image_final, atol=1e-5, rtol=0)
    # earlier blocks predict something else, and steps differ: the lens is not the output copied
    assert float(abs(ds.image.isel(layer=0) - ds.image.isel(layer=-1)).max()) > 1e-2
    assert float(abs(ds.image_final.isel(step=0) - ds.image_final.isel(step=-1)).max()) > 1e-2
    # the sampler's last step lands on its x0 prediction: the image the run returns, the plain call's
    np.testing.assert_allclose(ds.image_final.isel(step=-1), ds.generated, atol=1e-5, rtol=0)
    plain = lens.plain("a red polyp", seed=3, num_inference_steps=3)
    np.testing.assert_allclose(ds.generated.sel(prompt="a red polyp", seed=3), plain, atol=1e-5, rtol=0)
    assert ds.attrs["prediction"] == {"pixart": "epsilon", "pixart-v": "v_prediction"}.get(name, "flow")
    assert ds.timestep.values.tolist() == [float(t) for t in lens.pipeline.scheduler.timesteps[:3]]


def test_chosen_layers_and_steps_are_the_same_cells_of_the_full_lens(pixart):
    full = x0_lens(pixart, ["a polyp"], seeds=[0], num_inference_steps=3, progress=False)
    some = x0_lens(pixart, ["a polyp"], seeds=[0], num_inference_steps=3, layers=[0], steps=[2, 1],
                   progress=False)
    assert some.layer.values.tolist() == [0] and some.step.values.tolist() == [1, 2]
    np.testing.assert_array_equal(some.image.values, full.image.sel(layer=[0], step=[1, 2]).values)
    np.testing.assert_array_equal(some.image_final.values, full.image_final.sel(step=[1, 2]).values)
    again = x0_lens(pixart, ["a polyp"], seeds=[0], num_inference_steps=3, progress=False)
    np.testing.assert_array_equal(again.image.values, full.image.values)  # same seed, same lens


def test_a_steer_of_zero_gives_the_same_lens_and_a_strong_one_another(pixart):
    plain = x0_lens(pixart, ["a polyp"], seeds=[0], num_inference_steps=3, progress=False)
    vector = unit_vector(3, 2, pixart.width, seed=0)
    zero = x0_lens(pixart, ["a polyp"], seeds=[0], num_inference_steps=3, progress=False,
                   intervention=Steer(vector, alpha=0.0))
    np.testing.assert_array_equal(zero.image.values, plain.image.values)
    np.testing.assert_array_equal(zero.image_final.values, plain.image_final.values)
    steer = Steer(vector, alpha=8.0, layers=[0])
    steered = x0_lens(pixart, ["a polyp"], seeds=[0], num_inference_steps=3, progress=False, intervention=steer)
    assert float(abs(steered.image - plain.image).max()) > 1e-2
    assert steered.attrs["edits"][0]["type"] == "Steer" and steered.attrs["edits"][0]["alpha"] == 8.0
    # the lens reads the edited run itself: its last step is the edited image generate makes
    pairs = generate(pixart, ["a polyp"], seeds=[0], steer=steer, num_inference_steps=3, progress=False)
    edited = pairs.image.sel(branch="edited").isel(prompt=0, seed=0)
    np.testing.assert_allclose(steered.generated.isel(prompt=0, seed=0), edited, atol=1e-5, rtol=0)
    np.testing.assert_allclose(steered.image.isel(layer=-1), steered.image_final, atol=1e-5, rtol=0)


def test_an_edit_that_reads_the_original_runs_beside_its_twin(pixart):
    edits = [Steer(unit_vector(3, 2, pixart.width, seed=0), alpha=8.0), Blend(0.5)]
    ds = x0_lens(pixart, ["a polyp"], seeds=[0, 1], num_inference_steps=3, progress=False, intervention=edits,
                 batch_size=1)
    pairs = generate(pixart, ["a polyp"], seeds=[0, 1], edits=edits, num_inference_steps=3, progress=False)
    np.testing.assert_allclose(ds.generated.isel(prompt=0), pairs.image.sel(branch="edited").isel(prompt=0),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(ds.image.isel(layer=-1), ds.image_final, atol=1e-5, rtol=0)


def test_a_patched_run_is_inject_from_a_source_prompts_twin(pixart):
    """PixArt's text reaches the image tokens only through attn2: the corrupt prompt with the clean prompt's attn2
    output injected at every block is the clean run, in the lens as in the image. One block patched matches the
    exact patching of that block."""
    from dit_lens import patching
    from dit_lens.interventions.inject import Inject

    clean = x0_lens(pixart, ["a red polyp"], seeds=[3], num_inference_steps=2, progress=False)
    whole = x0_lens(pixart, ["a pale mucosa"], seeds=[3], source="a red polyp", intervention=Inject("attn2"),
                    num_inference_steps=2, progress=False)
    np.testing.assert_allclose(whole.image.values, clean.image.values, atol=1e-5)
    np.testing.assert_allclose(whole.generated.values, clean.generated.values, atol=1e-5)
    assert whole.attrs["source"] == "a red polyp"
    one = x0_lens(pixart, ["a pale mucosa"], seeds=[3], source="a red polyp", intervention=Inject("attn2", layers=(1,)),
                  num_inference_steps=2, progress=False)
    mean = patching(pixart, clean="a red polyp", corrupt="a pale mucosa", seeds=[3], grid=[([1], None)],
                    metric=lambda images: images.astype(np.float64).mean(axis=(1, 2, 3)), num_inference_steps=2,
                    progress=False)
    assert float(one.generated.astype(np.float64).mean()) == pytest.approx(float(mean.metric_patched.item()), abs=1e-5)
    assert not np.allclose(one.generated.values, clean.generated.values, atol=1e-3)
    with pytest.raises(ValueError, match="none of the given edits reads it"):
        x0_lens(pixart, ["a pale mucosa"], seeds=[3], source="a red polyp", num_inference_steps=2, progress=False)


def test_latent_corrections_between_steps_leave_the_lens_on_the_traced_run(pixart):
    """A guidance edit calls the denoiser again between steps; those calls are not the run's prediction."""
    from dit_lens.interventions.guide import EnergyGuidance

    mask = np.zeros((16, 16), bool)
    mask[:8, :8] = True
    guide = EnergyGuidance(["polyp"], mask, step=0.5, window=(0, 1))
    ds = x0_lens(pixart, ["a polyp"], seeds=[0], num_inference_steps=3, progress=False, intervention=guide)
    pairs = generate(pixart, ["a polyp"], seeds=[0], edits=guide, num_inference_steps=3, progress=False)
    plain = pairs.image.sel(branch="original").isel(prompt=0, seed=0)
    edited = pairs.image.sel(branch="edited").isel(prompt=0, seed=0)
    assert float(abs(edited - plain).max()) > 1e-3  # the correction changes the run
    np.testing.assert_allclose(ds.generated.isel(prompt=0, seed=0), edited, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ds.image.isel(layer=-1), ds.image_final, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ds.image_final.isel(step=-1), ds.generated, atol=1e-5, rtol=0)


def test_bad_input_is_refused_naming_the_argument(pixart):
    run = dict(seeds=[0], num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"x0_lens.layers \[2\] do not exist.*2 blocks"):
        x0_lens(pixart, ["a polyp"], layers=[2], **run)
    with pytest.raises(ValueError, match=r"pass layers=\[1\]"):
        x0_lens(pixart, ["a polyp"], layers=1, **run)
    with pytest.raises(ValueError, match=r"steps \[2\] out of range.*steps 0\.\.1"):
        x0_lens(pixart, ["a polyp"], steps=[2], **run)
    with pytest.raises(ValueError, match="decode_batch"):
        x0_lens(pixart, ["a polyp"], decode_batch=0, **run)


def test_a_pipeline_without_vae_or_with_an_unknown_sampler_is_refused():
    from diffusers import EulerDiscreteScheduler

    lens = load(BUILDERS["pixart"]())
    vae, scheduler = lens.pipeline.vae, lens.pipeline.scheduler
    lens.pipeline.vae = None
    with pytest.raises(ValueError, match=r"VAE.*vae=None"):
        x0_lens(lens, ["a polyp"], seeds=[0], num_inference_steps=2, progress=False)
    lens.pipeline.vae = vae
    lens.pipeline.scheduler = EulerDiscreteScheduler.from_config(scheduler.config)  # scales the model input
    with pytest.raises(ValueError, match="EulerDiscreteScheduler scales the model input"):
        x0_lens(lens, ["a polyp"], seeds=[0], num_inference_steps=2, progress=False)
