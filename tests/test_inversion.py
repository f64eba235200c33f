"""DDIM inversion and the inversion-based editors: exactness, the sampler chain, what each editor
provably reduces to, injection, trajectory reuse, refusals of bad input, provenance and the methods."""

import json

import numpy as np
import pytest
import torch

import dit_lens
from dit_lens.interventions.plan import Plan
from dit_lens.interventions.inject import Inject
from dit_lens.inversion import HEdit, PnP, check_images, ddim_scheduler, edit, invert, regenerate
from dit_lens.sampling import GuidedDenoiser, decode, encode
from dit_lens.methods import ConceptPair, MethodContext, get
from dit_lens.model.builders import build_pixart
from dit_lens.world.judges import EMBEDDED_JUDGES

T = 4
SOURCE, TARGET = "a polyp", "a normal cecum"
shipped = pytest.mark.skipif(not (EMBEDDED_JUDGES / "world.json").is_file(), reason="embedded world not built")


def psnr(a, b):
    """Per-image PSNR in dB of images in [0, 1], shape (n, H, W, 3)."""
    mse = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-30))


@pytest.fixture
def images():
    return np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)


@pytest.fixture
def trajectory(tiny_lens, images):
    return invert(tiny_lens, images, SOURCE, num_inference_steps=T, progress=False)


def edited(ds):
    return ds["image"].isel(prompt=0).sel(branch="edited").values  # (item, y, x, rgb)


def clean_latent(trajectory):
    return torch.from_numpy(trajectory["latent"].isel(step=-1).values.copy())


# 1. An independent fact: a generated run inverts back to the noise it started from.

@pytest.fixture(scope="module")
def embedded():
    return dit_lens.load("embedded")


@shipped
@pytest.mark.slow  # ~30 s on 2 idle CPU cores: 50 steps × 11 model calls per image; the rest of the file is fast
def test_inverting_a_ddim_run_recovers_its_noise_and_regenerates_it(embedded):
    from diffusers.utils.torch_utils import randn_tensor

    from dit_lens.trace.runner import traced_generate

    lens, steps, seeds, prompt = embedded, 50, [0, 1], "An endoscopic image of polyps"
    run = traced_generate(lens, [prompt] * len(seeds), seeds, num_inference_steps=steps, guidance_scale=1.0,
                          output_type="latent", scheduler=ddim_scheduler(lens, steps))
    latents = run.images.float()  # (n, C, h, w): the run's own clean latents
    noise = torch.cat([randn_tensor((1, *latents.shape[1:]), generator=lens.generator(s)) for s in seeds])
    images = decode(lens, latents)

    def noise_cosine(trajectory):
        z_T = torch.from_numpy(trajectory["latent"].isel(step=0).values.copy())
        return torch.nn.functional.cosine_similarity(z_T.flatten(1), noise.flatten(1)).numpy()

    exact = invert(lens, None, prompt, latents=latents, num_inference_steps=steps, refine=10, progress=False)
    plain = invert(lens, None, prompt, latents=latents, num_inference_steps=steps, progress=False)
    assert (noise_cosine(exact) >= 0.99).all(), noise_cosine(exact)
    assert (noise_cosine(plain) < noise_cosine(exact)).all()  # refine does what it says (plain: ~0.9 here)
    assert (psnr(regenerate(lens, exact, progress=False), images) >= 30).all()

    # through the VAE (encode is not decode's exact inverse): the noise differs, the images come back
    via_images = invert(lens, images, prompt, num_inference_steps=steps, progress=False)
    assert (psnr(regenerate(lens, via_images, progress=False), images) >= 30).all()


# 2. The sampler chain and the trajectory's coordinates.

@pytest.mark.parametrize("steps", [1, 3, 7, 50])
def test_each_ddim_step_lands_on_the_next_steps_level(tiny_lens, steps):
    ddim = ddim_scheduler(tiny_lens, steps)
    timesteps = ddim.timesteps.tolist()
    assert len(timesteps) == steps and timesteps[-1] == 0
    stride = ddim.config.num_train_timesteps // steps
    assert [t - stride for t in timesteps[:-1]] == timesteps[1:]  # DDIM's previous timestep is the next step's

    trajectory = invert(tiny_lens, np.full((1, 16, 16, 3), 0.5, np.float32), SOURCE, num_inference_steps=steps,
                        progress=False)
    assert trajectory["timestep"].values.tolist() == timesteps + [-1]
    levels = trajectory["alpha_bar"].values
    assert levels[-1] == 1.0 and (np.diff(levels) > 0).all()
    np.testing.assert_allclose(levels[:-1], ddim.alphas_cumprod.double()[ddim.timesteps].numpy(), rtol=1e-12)

    # the sampler's own step from step i's level lands on level i + 1 (the last on the clean level, ᾱ = 1)
    gen = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64).unbind(0)
    for i, t in enumerate(ddim.timesteps):
        a, a_next = float(levels[i]), float(levels[i + 1])
        expected = a_next ** 0.5 * (z - (1 - a) ** 0.5 * eps) / a ** 0.5 + (1 - a_next) ** 0.5 * eps
        got = ddim.step(eps[None], t, z[None]).prev_sample[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_trajectory_runs_from_noise_to_the_encoded_images(tiny_lens, images, trajectory):
    assert dict(trajectory["latent"].sizes) == {"item": 2, "step": T + 1, "channel": 4, "latent_y": 8, "latent_x": 8}
    np.testing.assert_array_equal(trajectory["latent"].isel(step=T).values, encode(tiny_lens, images).numpy())
    np.testing.assert_array_equal(trajectory["input"].values, images)
    assert np.isfinite(trajectory["latent"].values).all()
    assert np.abs(trajectory["latent"].isel(step=0).values - trajectory["latent"].isel(step=T).values).max() > 0.1
    # one image is a batch of one, with the same trajectory
    one = invert(tiny_lens, images[1], SOURCE, num_inference_steps=T, progress=False)
    np.testing.assert_allclose(one["latent"].values[0], trajectory["latent"].values[1], atol=1e-5)


def test_the_pipelines_own_sampler_is_left_in_place(tiny_lens, images):
    sampler = tiny_lens.pipeline.scheduler
    trajectory = invert(tiny_lens, images, SOURCE, num_inference_steps=T, progress=False)
    regenerate(tiny_lens, trajectory, progress=False)
    edit(tiny_lens, images, source=SOURCE, target=TARGET, num_inference_steps=T, trajectory=trajectory, progress=False)
    assert tiny_lens.pipeline.scheduler is sampler
    assert type(sampler).__name__ == "DPMSolverMultistepScheduler"


# 3. h-Edit with nothing to edit is the reconstruction.

@pytest.mark.parametrize("iterations, skip", [(1, 0.0), (2, 0.3)])
def test_hedit_toward_its_own_source_returns_the_reconstruction(tiny_lens, images, trajectory, iterations, skip):
    out = edit(tiny_lens, images, source=SOURCE, target=SOURCE, method="hedit", num_inference_steps=T,
               guidance_scale=4.5, source_guidance=4.5, iterations=iterations, skip=skip, trajectory=trajectory,
               progress=False)
    reconstruction = decode(tiny_lens, clean_latent(trajectory))
    np.testing.assert_allclose(edited(out), reconstruction, rtol=0, atol=1e-6)  # held exactly when written
    np.testing.assert_array_equal(out["image"].isel(prompt=0).sel(branch="original").values, images)

    # the editing term is live: another source guidance or another target moves the result
    for settings in ({"target": SOURCE, "source_guidance": 3.0}, {"target": TARGET, "source_guidance": 4.5}):
        moved = edit(tiny_lens, images, source=SOURCE, method="hedit", num_inference_steps=T, guidance_scale=4.5,
                     iterations=iterations, skip=skip, trajectory=trajectory, progress=False, **settings)
        assert np.abs(edited(moved) - reconstruction).max() > 1e-3, settings


# 4. PnP without injection is re-prompting from the inverted noise.

def test_pnp_without_injection_is_reprompting_the_inverted_noise(tiny_lens, images, trajectory):
    run = dict(source=SOURCE, target=TARGET, num_inference_steps=T, trajectory=trajectory, progress=False)
    bare = edit(tiny_lens, images, method="pnp", feature_fraction=0, attention_fraction=0, **run)
    again = edit(tiny_lens, images, method="reprompt", **run)
    np.testing.assert_array_equal(bare["image"].values, again["image"].values)
    for out in (bare, again):
        assert np.abs(edited(out) - images).max() > 0.05
    default = edit(tiny_lens, images, method="pnp", **run)
    assert np.abs(edited(default) - edited(again)).max() > 1e-3


# 5. Injection copies the original branch.

@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_injecting_the_last_block_makes_the_edited_branch_the_original(tiny_lens, guidance):
    """The last block's output decides the prediction (the output head sees only it and the timestep), so
    injecting it at every step gives the edited row the original's prediction from the same start: the same
    latents throughout, whatever its prompt. Earlier blocks, or a guidance half, do not suffice."""
    last = tiny_lens.num_layers - 1

    def gap(edits):
        images, _ = Plan(tiny_lens, edits, T, False).run([SOURCE, TARGET] * 2, [3, 3, 4, 4], [1, 3], guidance)
        return max(np.abs(images[1] - images[0]).max(), np.abs(images[3] - images[2]).max())

    assert gap([]) > 1e-3
    assert gap([Inject("block", layers=(last,))]) < 1e-6
    assert gap([Inject("block")]) < 1e-6  # all layers
    # the unconditional halves of both rows already agree (same latents, empty prompt): cond is enough
    assert gap([Inject("block", layers=(last,), halves="cond")]) < 1e-6
    assert gap([Inject("block", layers=(0,))]) > 1e-4  # later blocks still read the target prompt
    if guidance > 1:
        assert gap([Inject("block", layers=(last,), halves="uncond")]) > 1e-4


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_pnp_injection_makes_the_edited_branch_follow_the_replayed_source(tiny_lens, images, trajectory, guidance):
    """With the last block injected at every step, the edited branch's prediction is the source branch's at
    the replayed level: z_{i+1} = DDIM step(prediction(trajectory level i, source prompt), z_i), from z_T."""
    out = edit(tiny_lens, images, source=SOURCE, target=TARGET, method="pnp", num_inference_steps=T,
               guidance_scale=guidance, feature_fraction=1.0, attention_fraction=0.0,
               feature_layers=(tiny_lens.num_layers - 1,), trajectory=trajectory, progress=False)
    ddim, denoiser = ddim_scheduler(tiny_lens, T), GuidedDenoiser(tiny_lens, [SOURCE])
    levels = torch.from_numpy(trajectory["latent"].values.copy())  # (n, T + 1, C, h, w)
    n = len(images)
    z = levels[:, 0].clone()
    for i, t in enumerate(ddim.timesteps):
        source = levels[:, i]
        raw = denoiser.raw(torch.cat([source, source]), int(t), [None] * n + [0] * n)
        prediction = raw[n:] if guidance == 1 else raw[:n] + guidance * (raw[n:] - raw[:n])
        z = ddim.step(prediction, t, z).prev_sample
    np.testing.assert_allclose(edited(out), decode(tiny_lens, z), atol=1e-4)
    assert np.abs(edited(out) - regenerate(tiny_lens, trajectory, progress=False)).max() > 1e-3  # not a no-op


# 6. Reusing a trajectory.

@pytest.mark.parametrize("method", ["pnp", "hedit"])
def test_a_given_trajectory_gives_the_result_of_inverting_inside_edit(tiny_lens, images, method):
    run = dict(source=SOURCE, target=TARGET, method=method, num_inference_steps=T, progress=False)
    inside = edit(tiny_lens, images, refine=2, **run)
    given = edit(tiny_lens, images, trajectory=invert(tiny_lens, images, SOURCE, num_inference_steps=T, refine=2,
                                                      progress=False), **run)
    np.testing.assert_array_equal(inside["image"].values, given["image"].values)
    assert inside.attrs == given.attrs


def test_a_trajectory_from_another_model_is_refused(tiny_lens, tiny_spec, images, trajectory):
    other = dit_lens.load(build_pixart(tiny_spec, seed=1))
    with pytest.raises(ValueError, match="inverted with another model"):
        edit(other, images, source=SOURCE, target=TARGET, num_inference_steps=T, trajectory=trajectory, progress=False)
    with pytest.raises(ValueError, match="inverted with another model"):
        regenerate(other, trajectory, progress=False)
    with pytest.raises(TypeError, match="expected a trajectory from dit_lens.invert"):
        regenerate(tiny_lens, images, progress=False)


def test_a_trajectory_of_other_steps_or_images_is_refused(tiny_lens, images, trajectory):
    with pytest.raises(ValueError, match="the trajectory holds 2 images over 4 steps; this edit asks 2 over 5"):
        edit(tiny_lens, images, source=SOURCE, target=TARGET, num_inference_steps=T + 1, trajectory=trajectory,
             progress=False)
    with pytest.raises(ValueError, match="the trajectory holds 2 images over 4 steps; this edit asks 1 over 4"):
        edit(tiny_lens, images[:1], source=SOURCE, target=TARGET, num_inference_steps=T, trajectory=trajectory,
             progress=False)
    with pytest.raises(ValueError, match="inverted under .* not the source prompt"):
        edit(tiny_lens, images, source="a dog", target=TARGET, num_inference_steps=T, trajectory=trajectory,
             progress=False)
    with pytest.raises(ValueError, match="inverted from other images"):
        edit(tiny_lens, images[::-1].copy(), source=SOURCE, target=TARGET, num_inference_steps=T,
             trajectory=trajectory, progress=False)


# 7. Bad input, refused with the reason.

@pytest.mark.parametrize("bad, message", [
    (np.zeros((1, 32, 32, 3), np.float32), "images are 32×32 but the model makes 16×16"),
    (np.zeros((16, 16), np.float32), r"shape \(16, 16\) look grayscale"),
    (np.zeros((2, 16, 16, 1), np.float32), r"shape \(2, 16, 16, 1\) look grayscale"),
    (np.zeros((1, 3, 16, 16), np.float32), "channels last"),
    (np.zeros((3, 16, 16), np.float32), "look channels-first"),
    (np.zeros((16, 16, 4), np.float32), "4 channels"),
    (np.full((1, 16, 16, 3), 1.5, np.float32), r"must lie in \[0, 1\], got values in \[1.5, 1.5\]"),
    (np.full((1, 16, 16, 3), 200.0, np.float32), "look like 0-255 values: divide by 255"),
    (np.full((1, 16, 16, 3), -0.5, np.float32), r"look like \[-1, 1\] values"),
    (np.zeros((1, 16, 16, 3), np.int64), "dtype int64"),
    (np.zeros((0, 16, 16, 3), np.float32), "empty batch"),
    (np.where(np.arange(768).reshape(1, 16, 16, 3) == 5, np.nan, 0.5).astype(np.float32), "NaN"),
])
def test_bad_images_are_refused_with_the_problem_named(tiny_lens, bad, message):
    with pytest.raises(ValueError, match=message):
        edit(tiny_lens, bad, source=SOURCE, target=TARGET, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=message):
        invert(tiny_lens, bad, SOURCE, num_inference_steps=2, progress=False)


def test_uint8_images_are_float_images_over_255(tiny_lens):
    u = (np.random.default_rng(1).random((2, 16, 16, 3)) * 256).astype(np.uint8)
    f = u.astype(np.float32) / 255
    np.testing.assert_array_equal(check_images(u, tiny_lens), f)
    a = invert(tiny_lens, u, SOURCE, num_inference_steps=2, progress=False)
    b = invert(tiny_lens, f, SOURCE, num_inference_steps=2, progress=False)
    np.testing.assert_array_equal(a["latent"].values, b["latent"].values)
    out = edit(tiny_lens, u, source=SOURCE, target=TARGET, num_inference_steps=2, progress=False)
    np.testing.assert_array_equal(out["image"].isel(prompt=0).sel(branch="original").values, f)
    # a torch tensor and one (H, W, 3) image are accepted too
    np.testing.assert_array_equal(check_images(torch.from_numpy(f[0]), tiny_lens), f[:1])
    with pytest.raises(TypeError, match="numpy array, torch tensor or xarray DataArray"):
        check_images([[0.5]], tiny_lens)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"method": "nope"}, ValueError, r"unknown editor 'nope'; choose one of \['pnp', 'hedit', 'reprompt', 'medsteer'\]"),
    ({"target": SOURCE}, ValueError, "target is the source prompt"),
    ({"target": None}, ValueError, "method 'pnp' needs a target prompt"),
    ({"method": "reprompt", "feature_fraction": 0.5}, ValueError, r"method 'reprompt' has no settings \['feature_fraction'\]"),
    ({"feature_fraction": 1.5}, ValueError, r"PnP.feature_fraction must be a fraction of the steps in \[0, 1\], got 1.5"),
    ({"attention_fraction": -0.1}, ValueError, r"PnP.attention_fraction must be a fraction .* got -0.1"),
    ({"feature_layers": (-1,)}, ValueError, "PnP.feature_layers must be block indices >= 0"),
    ({"method": "hedit", "iterations": 0}, ValueError, "HEdit.iterations must be an integer >= 1, got 0"),
    ({"method": "hedit", "skip": 2}, ValueError, r"HEdit.skip must be a fraction of the steps in \[0, 1\]"),
    ({"method": "medsteer"}, ValueError, "method 'medsteer' needs steer="),
    ({"bogus": 1}, TypeError, "bogus"),
])
def test_bad_edit_settings_are_refused(tiny_lens, kwargs, error, message):
    run = {"source": SOURCE, "target": TARGET, "num_inference_steps": 2, "progress": False, **kwargs}
    with pytest.raises(error, match=message):
        edit(tiny_lens, np.full((1, 16, 16, 3), 0.5, np.float32), **run)


def test_settings_values_refuse_out_of_range_fields():
    with pytest.raises(ValueError, match=r"PnP.feature_fraction must be a fraction of the steps in \[0, 1\]"):
        PnP(feature_fraction=2)
    with pytest.raises(ValueError, match=r"PnP.attention_fraction must be a fraction"):
        PnP(attention_fraction=True)
    with pytest.raises(ValueError, match="HEdit.iterations must be an integer >= 1, got 0"):
        HEdit(iterations=0)
    with pytest.raises(ValueError, match="HEdit.weight_reconstruction must be a finite number >= 0"):
        HEdit(weight_reconstruction=-1)
    assert PnP(feature_layers=[2, 0, 2]).feature_layers == (0, 2)


def test_samplers_that_cannot_be_inverted_are_refused(tiny_lens):
    from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    for stochastic in (DDPMScheduler(), EulerAncestralDiscreteScheduler()):
        name = type(stochastic).__name__
        with pytest.raises(ValueError, match=f"{name} draws fresh noise at every step"):
            ddim_scheduler(tiny_lens, T, scheduler=stochastic)
        with pytest.raises(ValueError, match=f"{name} draws fresh noise"):
            invert(tiny_lens, np.full((1, 16, 16, 3), 0.5, np.float32), SOURCE, num_inference_steps=2,
                   scheduler=stochastic, progress=False)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        ddim_scheduler(tiny_lens, T, scheduler=DDIMScheduler(rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="prediction type 'bogus'"):
        ddim_scheduler(tiny_lens, T, scheduler=DDIMScheduler(prediction_type="bogus"))
    with pytest.raises(ValueError, match="exceeds the schedule's 1000 training timesteps"):
        ddim_scheduler(tiny_lens, 1001)

    tiny_lens.pipeline.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler is a flow-matching sampler"):
        ddim_scheduler(tiny_lens, T)
    with pytest.raises(ValueError, match="flow-matching sampler"):
        edit(tiny_lens, np.full((1, 16, 16, 3), 0.5, np.float32), source=SOURCE, target=TARGET,
             num_inference_steps=2, progress=False)


def test_bad_latents_are_refused(tiny_lens):
    ok = np.full((1, 16, 16, 3), 0.5, np.float32)
    with pytest.raises(ValueError, match="give images or latents, not both"):
        invert(tiny_lens, ok, SOURCE, latents=torch.zeros(1, 4, 8, 8), num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"latents must be \(n, 4, 8, 8\) with n >= 1, got \(1, 4, 4, 4\)"):
        invert(tiny_lens, None, SOURCE, latents=torch.zeros(1, 4, 4, 4), num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="latents hold NaN"):
        invert(tiny_lens, None, SOURCE, latents=torch.full((1, 4, 8, 8), float("nan")), num_inference_steps=2,
               progress=False)
    with pytest.raises(ValueError, match="refine must be an integer >= 0"):
        invert(tiny_lens, ok, SOURCE, num_inference_steps=2, refine=-1, progress=False)


# 8. Provenance.

def test_edit_results_name_method_prompts_settings_and_model(tiny_lens, images):
    out = edit(tiny_lens, images, source=SOURCE, target=TARGET, method="pnp", num_inference_steps=3,
               guidance_scale=3.5, inversion_guidance=1.5, refine=1, feature_fraction=0.4, feature_layers=[2],
               progress=False)
    attrs = out.attrs
    assert attrs["method"] == "pnp" and attrs["source_prompt"] == SOURCE and attrs["target_prompt"] == TARGET
    assert attrs["num_inference_steps"] == 3 and attrs["guidance_scale"] == 3.5
    assert attrs["inversion_guidance"] == 1.5 and attrs["refine"] == 1
    assert attrs["sampler"] == "DDIM (eta 0, leading)"
    assert attrs["settings"] == {"feature_fraction": 0.4, "attention_fraction": 0.5,
                                             "feature_layers": [2], "attention_layers": None}
    assert attrs["model_fingerprint"] == tiny_lens.provenance()["model_fingerprint"]
    json.dumps(dict(attrs))  # plain values: the result saves as it is
    assert list(out["branch"].values) == ["original", "edited"]
    assert dict(out["image"].sizes) == {"prompt": 1, "seed": 2, "branch": 2, "y": 16, "x": 16, "rgb": 3}

    h = edit(tiny_lens, images, source=SOURCE, target=TARGET, method="hedit", num_inference_steps=3,
             iterations=2, progress=False)
    assert h.attrs["method"] == "hedit"
    assert h.attrs["settings"] == {"source_guidance": 4.5, "base_guidance": 1.0, "iterations": 2,
                                               "skip": 0.3, "weight_reconstruction": 0.1}
    trajectory = invert(tiny_lens, images, SOURCE, num_inference_steps=3, guidance_scale=2.0, refine=1, progress=False)
    assert {k: trajectory.attrs[k] for k in ("prompt", "num_inference_steps", "guidance_scale", "refine")} == \
        {"prompt": SOURCE, "num_inference_steps": 3, "guidance_scale": 2.0, "refine": 1}
    assert trajectory.attrs["model_fingerprint"] == attrs["model_fingerprint"]


# 9. The registered methods.

PAIR = ConceptPair("polyps", "normal cecum", contexts=("An image of {}", "A photo of {}"))


@pytest.mark.parametrize("name", ["pnp", "hedit"])
def test_registered_inversion_methods_edit_the_generated_originals(tiny_lens, name):
    context = MethodContext(num_inference_steps=3, guidance_scale=4.5, batch_size=2)
    seeds = [5, 6, 7]
    out = get(name).run(tiny_lens, PAIR, seeds, {"inversion_steps": T}, context=context)
    assert dict(out["image"].sizes) == {"prompt": 1, "seed": 3, "branch": 2, "y": 16, "x": 16, "rgb": 3}
    assert list(out["branch"].values) == ["original", "edited"]
    assert list(out["prompt"].values) == [PAIR.source_prompt] and list(out["seed"].values) == seeds
    plain = dit_lens.generate(tiny_lens, PAIR.source_prompt, seeds=seeds, num_inference_steps=3, guidance_scale=4.5,
                              batch_size=2, progress=False)
    np.testing.assert_array_equal(out["image"].isel(prompt=0).sel(branch="original").values,
                                  plain["image"].isel(prompt=0).sel(branch="original").values)
    assert np.abs(out["image"].isel(prompt=0).sel(branch="edited").values - out["image"].isel(prompt=0).sel(branch="original").values).max() > 0.05
    assert out.attrs["method"] == name and out.attrs["target_prompt"] == PAIR.target_prompt
    assert out.attrs["num_inference_steps"] == T and out.attrs["originals_steps"] == 3


def test_every_reader_takes_an_edit_as_it_takes_generated_pairs(tiny_lens, images, trajectory):
    """One pairs layout: the metrics and figures read `edit`'s output as they read `generate`'s."""
    from dit_lens import metrics as M
    from dit_lens.views.figures import pairs_figure

    out = edit(tiny_lens, images, source=SOURCE, target=TARGET, method="reprompt", num_inference_steps=T,
               trajectory=trajectory, progress=False, seeds=[40, 41])
    assert out["image"].dims == ("prompt", "seed", "branch", "y", "x", "rgb") and out.seed.values.tolist() == [40, 41]

    def oracle(x):
        return np.stack([x.mean((1, 2, 3)), 1 - x.mean((1, 2, 3))], 1)

    oracle.labels = ["bright", "dark"]
    probs = M.classify(out, oracle)
    assert dict(probs.sizes) == {"prompt": 1, "seed": 2, "branch": 2, "class": 2}
    assert pairs_figure(out).axes
    with pytest.raises(ValueError, match="2 images need 2 seeds"):
        edit(tiny_lens, images, source=SOURCE, target=TARGET, method="reprompt", num_inference_steps=T,
             trajectory=trajectory, progress=False, seeds=[1])
