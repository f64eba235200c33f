"""DiT families beyond PixArt-alpha (SANA, SD3; PixArt-Sigma shares PixArt's denoiser class): load,
capture, vectors, steering, attention maps, the explorer and studies on tiny random-weight pipelines,
against raw torch hooks on the plain pipeline call."""

import numpy as np
import pytest
import torch

from dit_lens.trace.runner import Hook, traced_generate
from dit_lens import Steer, attention_maps, capture, concept_vector, generate, invert, load, write_explorer
from dit_lens.testing import PixArtSpec, build_pixart
from dit_lens.model.sana import SanaSpec, build_sana
from dit_lens.model.sd3 import SD3Spec, build_sd3
from dit_lens.study import Study, run_study

from test_study import ONE, BrightnessOracle, red_segmenter

STEPS = 3


@pytest.fixture
def sana_pipeline():
    return build_sana(SanaSpec(num_layers=3), seed=0)


@pytest.fixture
def sana(sana_pipeline):
    return load(sana_pipeline)


#: What the plain call of each pipeline class needs besides size (written out, not dit-lens' settings).
PLAIN = {"PixArtAlphaPipeline": dict(use_resolution_binning=False, clean_caption=False),
         "SanaPipeline": dict(use_resolution_binning=False, clean_caption=False, complex_human_instruction=None),
         "StableDiffusion3Pipeline": {}}


def raw_call(pipeline, prompt, seed, hooks=(), output_type="np"):
    """The plain call with raw forward hooks ``[(module, fn(step, output) -> output | None)]``; returns the
    image (H, W, 3), or with ``output_type="latent"`` the final latents (C, h, w) as float32 numpy."""
    state = {"t": -1}
    handles = [pipeline.transformer.register_forward_pre_hook(lambda m, a: state.__setitem__("t", state["t"] + 1))]
    for module, fn in hooks:
        handles.append(module.register_forward_hook(lambda m, a, out, fn=fn: fn(state["t"], out)))
    side = pipeline.transformer.config.sample_size * pipeline.vae_scale_factor
    try:
        image = pipeline(prompt, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=STEPS,
                         guidance_scale=4.5, output_type=output_type, height=side, width=side,
                         **PLAIN[type(pipeline).__name__]).images[0]
        return image.float().numpy() if output_type == "latent" else image
    finally:
        for handle in handles:
            handle.remove()


def test_sana_loads_as_its_family_and_from_its_folder(sana, sana_pipeline, tmp_path):
    assert sana.family.name == "SanaTransformer2DModel" and sana.family.sampling == "flow"
    assert sana.provenance()["denoiser_class"] == "SanaTransformer2DModel" and sana.token_grid == (8, 8)
    image = sana.plain("a polyp", seed=3, num_inference_steps=STEPS)
    np.testing.assert_array_equal(image, raw_call(sana_pipeline, "a polyp", 3))  # the plain call, unchanged
    np.testing.assert_array_equal(image, sana.plain("a polyp", seed=3, num_inference_steps=STEPS))
    sana_pipeline.save_pretrained(tmp_path / "sana")
    again = load(tmp_path / "sana")
    assert again.fingerprint == sana.fingerprint and again.family.name == sana.family.name
    np.testing.assert_array_equal(again.plain("a polyp", seed=3, num_inference_steps=STEPS), image)


def test_a_pipeline_of_another_family_is_refused_naming_the_supported_ones():
    class Elsewhere:
        components = {}
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match=r"is a Linear, which is not a supported DiT; supported: "
                                        r"PixArtTransformer2DModel \(PixArt-alpha / PixArt-Sigma\), "
                                        r"SanaTransformer2DModel \(SANA\)"):
        load(Elsewhere())


@pytest.mark.parametrize("site", ["attn1", "attn2", "ff", "block"])
def test_sana_capture_matches_raw_hooks(sana, sana_pipeline, site, tmp_path):
    blocks = sana_pipeline.transformer.transformer_blocks
    modules = {"attn1": lambda b: b.attn1, "attn2": lambda b: b.attn2, "ff": lambda b: b.ff, "block": lambda b: b}
    raw = np.zeros((STEPS, len(blocks), sana.width))

    def mean_token(out):  # (rows, tokens, C), or the feed-forward's (rows, C, h, w)
        last = out[-1]
        return (last.mean((1, 2)) if last.ndim == 3 and site == "ff" else last.mean(0)).numpy()

    hooks = [(modules[site](block), lambda t, out, layer=layer: raw.__setitem__((t, layer), mean_token(out)))
             for layer, block in enumerate(blocks)]
    raw_call(sana_pipeline, "a polyp", 5, hooks)
    ds = capture(sana, ["a polyp"], seeds=[5], num_inference_steps=STEPS, site=site, store=tmp_path / "c.zarr")
    np.testing.assert_allclose(ds[site].sel(prompt="a polyp", seed=5).values, raw, rtol=1e-4, atol=1e-6)


def test_sana_steering_matches_raw_hooks_and_strength_zero_is_the_plain_image(sana, sana_pipeline):
    vector = concept_vector(sana, positive=["a polyp"], negative=["a cecum"], seeds=[0, 1], num_inference_steps=STEPS)
    assert vector.shape == (STEPS, 3, sana.width)
    zero = generate(sana, "a polyp", seeds=[7], steer=Steer(vector, alpha=0.0), num_inference_steps=STEPS,
                    progress=False)
    plain = raw_call(sana_pipeline, "a polyp", 7)
    np.testing.assert_array_equal(zero.image.sel(branch="edited").values, zero.image.sel(branch="original").values)
    np.testing.assert_allclose(zero.image.sel(branch="original").values[0, 0], plain, atol=1e-6)  # batched: rounding
    steered = generate(sana, "a polyp", seeds=[7], steer=Steer(vector, alpha=4.0, layers=(1, 2)),
                       num_inference_steps=STEPS, record_gates=True, progress=False)
    v = vector.values

    def edit(layer):
        def fn(t, out):
            direction = torch.from_numpy(v[t, layer])
            return out - 4.0 * torch.einsum("bnc,c->bn", out, direction).clamp(min=0)[..., None] * direction
        return fn

    blocks = sana_pipeline.transformer.transformer_blocks
    want = raw_call(sana_pipeline, "a polyp", 7, [(blocks[layer].attn2, edit(layer)) for layer in (1, 2)])
    got = steered.image.sel(branch="edited").values[0, 0]
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(got - plain).max() > 1e-3  # the steer changed the image
    assert steered.gate.sizes["layer"] == 2


def test_sana_attention_maps_read_the_cross_attention_without_changing_the_image(sana, sana_pipeline):
    maps = attention_maps(sana, ["an image of polyps"], seeds=[2], words=["polyps"], num_inference_steps=STEPS,
                          progress=False)
    np.testing.assert_array_equal(maps.image.values[0, 0], raw_call(sana_pipeline, "an image of polyps", 2))
    attention = maps.attention.values  # (prompt, seed, step, layer, word, row, col)
    assert attention.shape[-2:] == (8, 8) and np.isfinite(attention).all()
    assert 0 < attention.max() <= 1 and attention.sum(axis=(-1, -2)).min() > 0
    tokens = maps.attrs["word_tokens"]["an image of polyps"]["polyps"]
    rows = []  # the same weights, from the softmax of raw q·k on the conditional rows
    blocks = sana_pipeline.transformer.transformer_blocks

    def record(layer):
        def fn(module, args, kwargs, out):
            hidden, context = args[0], kwargs["encoder_hidden_states"]
            q = module.to_q(hidden).unflatten(-1, (module.heads, -1)).transpose(1, 2)
            k = module.to_k(context).unflatten(-1, (module.heads, -1)).transpose(1, 2)
            scores = q @ k.transpose(-1, -2) * module.scale
            mask = kwargs["attention_mask"]  # (rows, 1, keys) additive
            weights = (scores + mask[:, None]).softmax(-1)[-1]  # (heads, queries, keys), conditional row
            rows.append((layer, weights[:, :, list(tokens)].sum(-1).mean(0).reshape(8, 8).numpy()))
        return fn

    handles = [blocks[layer].attn2.register_forward_hook(record(layer), with_kwargs=True) for layer in range(3)]
    try:
        raw_call(sana_pipeline, "an image of polyps", 2)
    finally:
        for handle in handles:
            handle.remove()
    want = np.stack([m for _, m in rows]).reshape(STEPS, 3, 8, 8)
    np.testing.assert_allclose(attention[0, 0, :, :, 0], want, atol=1e-5)


def test_sana_weights_exist_only_where_attention_is_softmax(sana):
    with pytest.raises(ValueError, match=r"unknown site 'attn1.weights' for SanaTransformer2DModel"):
        traced_generate(sana, ["a polyp"], [0], num_inference_steps=2, guidance_scale=4.5,
                        hooks=[Hook("attn1.weights", (0,), lambda *a: None)])


@pytest.mark.parametrize("family", ["sana", "sd3"])
def test_flow_matching_inversion_recovers_the_noise_and_regenerates_the_image(family, request):
    from dit_lens.inversion.trajectory import regenerate, trajectory_latents
    from dit_lens.trace.runner import initial_noise

    lens, T = request.getfixturevalue(family), 8
    run = lens.pipeline("a polyp", generator=lens.generator(0), num_inference_steps=T, guidance_scale=1.0,
                        output_type="latent", **lens.pipeline_kwargs).images  # a run's own clean latents
    noise = initial_noise(lens, [0])
    errors = {}
    for refine in (0, 3):
        trajectory = invert(lens, None, "a polyp", latents=run, num_inference_steps=T, refine=refine, progress=False)
        assert trajectory.attrs["sampler"] == "flow-matching Euler" and trajectory["sigma"].values[-1] == 0.0
        errors[refine] = float((trajectory_latents(trajectory) - noise).abs().max())
    assert errors[3] < 2e-3 < errors[0]  # the one approximation, solved by the fixed-point iterations
    plain = lens.plain("a polyp", seed=0, num_inference_steps=T, guidance_scale=1.0)
    np.testing.assert_allclose(regenerate(lens, trajectory, progress=False)[0], plain, atol=2e-3)


def test_flow_matching_editors_run_and_the_ddpm_only_ones_say_why_not(sana, sd3):
    from diffusers import DPMSolverMultistepScheduler

    from dit_lens import edit

    image = sana.plain("a polyp", seed=1, num_inference_steps=STEPS)
    out = edit(sana, image, source="a polyp", target="a cecum", method="pnp", attention_fraction=0.0,
               num_inference_steps=STEPS, progress=False)
    assert out.attrs["sampler"] == "flow-matching Euler" and np.isfinite(out.image.values).all()
    np.testing.assert_array_equal(out.image.sel(branch="original").values[0, 0], image)
    with pytest.raises(ValueError, match=r"PnP injects the self-attention weights .* SANA does not expose .* "
                                         r"attention_fraction=0"):
        edit(sana, image, source="a polyp", target="a cecum", method="pnp", num_inference_steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="h-Edit .* needs a noise-schedule .* Stable Diffusion 3 samples by flow"):
        edit(sd3, np.zeros((16, 16, 3), np.float32), source="a polyp", target="a cecum", method="hedit",
             num_inference_steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="runs the Euler step of FlowMatchEulerDiscreteScheduler backwards; the "
                                         "sampler is a DPMSolverMultistepScheduler"):
        invert(sana, image, "a polyp", num_inference_steps=STEPS, scheduler=DPMSolverMultistepScheduler(),
               progress=False)


def test_a_study_and_the_explorer_run_on_sana(sana, tmp_path):
    s = Study("sana", pairs=(ONE,), methods={"medsteer": {"alpha": (0.0, 3.0), "vector_seeds": (2,)}}, eval_seeds=2,
              num_inference_steps=STEPS)
    result = run_study(s, sana, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path / "study",
                       progress=False)
    assert result.attrs["denoiser_class"] == "SanaTransformer2DModel"
    flips = result["flip_rate"].sel(method="medsteer").values.ravel()
    assert np.isfinite(flips).all() and flips[0] == 0.0  # α = 0 changes nothing, so nothing flips
    vector = concept_vector(sana, positive=["a polyp"], negative=["a cecum"], seeds=[0], num_inference_steps=STEPS)
    out = generate(sana, "a polyp", seeds=[0, 1], steer=Steer(vector, alpha=3.0), record_gates=True,
                   num_inference_steps=STEPS, progress=False)
    assert (out.gate.sizes["row"], out.gate.sizes["col"]) == sana.token_grid and float(out.gate.max()) > 0
    page = write_explorer(out, tmp_path / "explorer.html").read_text()
    assert "Plotly.restyle" in page and 'id="step"' in page and 'id="layer"' in page


def test_pixart_sigma_steers_like_its_plain_call(tmp_path):
    lens = load(build_pixart(PixArtSpec(num_layers=2, sigma=True), seed=2))
    assert type(lens.pipeline).__name__ == "PixArtSigmaPipeline"
    vector = concept_vector(lens, positive=["a polyp"], negative=["a cecum"], seeds=[0], num_inference_steps=STEPS)
    zero = generate(lens, "a polyp", seeds=[4], steer=Steer(vector, alpha=0.0), num_inference_steps=STEPS,
                    progress=False)
    plain = lens.plain("a polyp", seed=4, num_inference_steps=STEPS)
    np.testing.assert_array_equal(zero.image.sel(branch="edited").values, zero.image.sel(branch="original").values)
    np.testing.assert_allclose(zero.image.sel(branch="original").values[0, 0], plain, atol=1e-6)
    maps = attention_maps(lens, ["a polyp"], seeds=[4], words=["polyp"], num_inference_steps=STEPS, progress=False)
    np.testing.assert_array_equal(maps.image.values[0, 0], plain)


def test_sana_refuses_fine_tuning_saying_why(sana, tmp_path):
    from dit_lens import finetune
    from dit_lens.training import TrainingImages

    images = TrainingImages.from_arrays(np.zeros((2, 32, 32, 3), np.float32), ["a polyp", "a cecum"])
    with pytest.raises(ValueError, match="fine-tuning .* SANA samples by flow matching"):
        finetune(sana, images, tmp_path / "ft", steps=1)
    assert not (tmp_path / "ft").exists()  # refused before anything was written


@pytest.mark.parametrize("family", ["sana", "sd3"])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_noise_optimisation_runs_the_run_generate_makes(family, guidance_scale, request):
    from dit_lens import optimize_noise
    from dit_lens.optimize import class_probability
    from dit_lens.world.judges import Oracle, OracleNet

    lens = request.getfixturevalue(family)  # its differentiable loop replays the family's own pipeline loop
    torch.manual_seed(0)
    oracle = Oracle(OracleNet(width=8, num_classes=3), ("polyps", "normal cecum", "esophagitis"))
    z = optimize_noise(lens, "a polyp", seeds=[0, 1], objective=class_probability(oracle, "esophagitis"),
                       iterations=0, num_inference_steps=STEPS, guidance_scale=guidance_scale, progress=False)
    out = generate(lens, "a polyp", seeds=[0, 1], edits=[z], num_inference_steps=STEPS, guidance_scale=guidance_scale,
                   progress=False)
    images = out.image.sel(prompt="a polyp", branch="original").values
    np.testing.assert_allclose(z.before, np.log(oracle(images)[:, 2]), atol=1e-4, rtol=0)


# -- SD3: joint attention, tuple outputs -----------------------------------------------------------


@pytest.fixture
def sd3_pipeline():
    return build_sd3(SD3Spec(num_layers=2), seed=0)


@pytest.fixture
def sd3(sd3_pipeline):
    return load(sd3_pipeline)



def test_sd3_loads_and_its_text_conditioning_site_is_the_joint_attentions_image_stream(sd3, sd3_pipeline, tmp_path):
    from dit_lens.model.fingerprint import fingerprint

    assert sd3.family.name == "SD3Transformer2DModel" and sd3.family.sites["attn2"] == "attn"  # the joint attention
    before = sd3.fingerprint
    image = sd3.plain("a polyp", seed=1, num_inference_steps=STEPS)
    assert fingerprint(sd3_pipeline) == before  # a call sets its fast tokenizers' padding: not the model
    np.testing.assert_array_equal(image, raw_call(sd3_pipeline, "a polyp", 1))
    sd3_pipeline.save_pretrained(tmp_path / "sd3")
    again = load(tmp_path / "sd3")
    assert again.fingerprint == sd3.fingerprint
    np.testing.assert_array_equal(again.plain("a polyp", seed=1, num_inference_steps=STEPS), image)


@pytest.mark.parametrize("site, stream", [("attn2", 0), ("block", 1), ("ff", None)])
def test_sd3_capture_reads_the_image_stream_of_tuple_outputs(sd3, sd3_pipeline, site, stream, tmp_path):
    blocks = sd3_pipeline.transformer.transformer_blocks
    module = {"attn2": lambda b: b.attn, "block": lambda b: b, "ff": lambda b: b.ff}[site]
    raw = np.zeros((STEPS, len(blocks), sd3.width))

    def keep(layer):
        def fn(t, out):
            image = out if stream is None else out[stream]  # (rows, image tokens, C)
            raw[t, layer] = image[-1].mean(0).numpy()
        return fn

    raw_call(sd3_pipeline, "a polyp", 2, [(module(b), keep(layer)) for layer, b in enumerate(blocks)])
    ds = capture(sd3, ["a polyp"], seeds=[2], num_inference_steps=STEPS, **({} if site == "attn2" else {"site": site}),
                 store=tmp_path / "c.zarr")
    assert list(ds.data_vars) == [site]  # no site given: attn2, here the joint attention's image stream
    np.testing.assert_allclose(ds[site].sel(prompt="a polyp", seed=2).values, raw, rtol=1e-4, atol=1e-6)


def test_sd3_steering_edits_the_image_stream_and_keeps_the_text_stream(sd3, sd3_pipeline):
    vector = concept_vector(sd3, positive=["a polyp"], negative=["a cecum"], seeds=[0, 1], num_inference_steps=STEPS)
    assert vector.attrs["site"] == "attn2" and vector.shape == (STEPS, 2, sd3.width)
    zero = generate(sd3, "a polyp", seeds=[5], steer=Steer(vector, alpha=0.0), num_inference_steps=STEPS,
                    progress=False)
    np.testing.assert_array_equal(zero.image.sel(branch="edited").values, zero.image.sel(branch="original").values)
    steered = generate(sd3, "a polyp", seeds=[5], steer=Steer(vector, alpha=3.0, layers=(0,)),
                       num_inference_steps=STEPS, progress=False)
    v = vector.values

    def edit(t, out):
        image, text = out
        direction = torch.from_numpy(v[t, 0])
        image = image - 3.0 * torch.einsum("bnc,c->bn", image, direction).clamp(min=0)[..., None] * direction
        return image, text  # the text stream as it was

    want = raw_call(sd3_pipeline, "a polyp", 5, [(sd3_pipeline.transformer.transformer_blocks[0].attn, edit)])
    got = steered.image.sel(branch="edited").values[0, 0]
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(got - steered.image.sel(branch="original").values[0, 0]).max() > 1e-3


def test_a_study_and_the_explorer_with_attention_maps_run_on_sd3(sd3, tmp_path):
    s = Study("sd3", pairs=(ONE,), methods={"medsteer": {"alpha": (0.0, 3.0), "vector_seeds": (2,)}}, eval_seeds=2,
              num_inference_steps=STEPS)
    result = run_study(s, sd3, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path / "study",
                       progress=False)
    assert result.attrs["denoiser_class"] == "SD3Transformer2DModel"
    assert result["flip_rate"].sel(method="medsteer").values.ravel()[0] == 0.0
    vector = concept_vector(sd3, positive=["a polyp"], negative=["a cecum"], seeds=[0], num_inference_steps=STEPS)
    out = generate(sd3, "a polyp", seeds=[0, 1], steer=Steer(vector, alpha=3.0, layers=(0,)), record_gates=True,
                   num_inference_steps=STEPS, progress=False)
    maps = attention_maps(sd3, ["a polyp"], seeds=[0, 1], words=["polyp"], num_inference_steps=STEPS, progress=False)
    page = write_explorer(out, tmp_path / "explorer.html", attention=maps).read_text()
    assert "Plotly.restyle" in page and 'id="word"' in page and "polyp" in page


def test_sd3_attention_maps_are_the_image_to_text_block_of_the_joint_softmax(sd3, sd3_pipeline):
    maps = attention_maps(sd3, ["an image of polyps"], seeds=[3], words=["polyps"], num_inference_steps=STEPS,
                          progress=False)
    np.testing.assert_array_equal(maps.image.values[0, 0], sd3.plain("an image of polyps", seed=3,
                                                                        num_inference_steps=STEPS))
    keys = maps.attrs["word_tokens"]["an image of polyps"]["polyps"]
    clip = [k for k in keys if k < 77]  # the word in CLIP's tokens (one per byte here) and in T5's after them
    assert len(clip) == len("polyps") and len(keys) == 2 * len("polyps") and min(k for k in keys if k >= 77) > 77
    recorded = []

    def record(module, args, kwargs, out):
        hidden, context = kwargs["hidden_states"], kwargs["encoder_hidden_states"]

        def heads(x):
            return x.unflatten(-1, (module.heads, -1)).transpose(1, 2)  # (rows, heads, tokens, d)
        q = heads(module.to_q(hidden))
        k = torch.cat([heads(module.to_k(hidden)), heads(module.add_k_proj(context))], dim=2)
        weights = (q @ k.transpose(-1, -2) * module.scale).softmax(-1)[-1]  # conditional row: (heads, N, N+M)
        n = hidden.shape[1]
        recorded.append(weights[:, :, [n + key for key in keys]].sum(-1).mean(0).reshape(4, 4).numpy())

    blocks = sd3_pipeline.transformer.transformer_blocks
    handles = [block.attn.register_forward_hook(record, with_kwargs=True) for block in blocks]
    try:
        raw_call(sd3_pipeline, "an image of polyps", 3)
    finally:
        for handle in handles:
            handle.remove()
    want = np.stack(recorded).reshape(STEPS, 2, 4, 4)
    np.testing.assert_allclose(maps.attention.values[0, 0, :, :, 0], want, atol=1e-5)
    assert 0 < want.max() < 1  # the rest of each row is on image keys and the other words


def test_sd3_reweighting_text_keys_changes_only_the_edited_branch(sd3):
    from dit_lens import Reweight

    same = generate(sd3, "a polyp", seeds=[0], edits=[Reweight(tokens=[2], scale=1.0)],
                    num_inference_steps=STEPS, progress=False)
    np.testing.assert_array_equal(same.image.sel(branch="edited").values, same.image.sel(branch="original").values)
    cut = generate(sd3, "a polyp", seeds=[0], edits=[Reweight(tokens=range(1, 9), scale=0.0)],
                   num_inference_steps=STEPS, progress=False)
    assert np.abs(cut.image.sel(branch="edited").values - cut.image.sel(branch="original").values).max() > 1e-4
    np.testing.assert_allclose(cut.image.sel(branch="original").values[0, 0],
                               sd3.plain("a polyp", seed=0, num_inference_steps=STEPS), atol=1e-6)


def test_attention_regulation_runs_where_its_sites_exist_and_names_the_missing_one(sana, sd3):
    from dit_lens import AttentionRegulation, reprompt

    for lens in (sana, sd3):
        side = lens.pipeline_kwargs["height"]
        box = np.zeros((side, side), bool)
        box[side // 8 : side // 2, side // 4 : 3 * side // 4] = True
        regulation = AttentionRegulation(region=box, pathology_words=["polyps"], energy_step=0.05)
        out = reprompt(lens, "an image of cecum", "an image of polyps", seeds=[0], num_inference_steps=STEPS,
                       edits=[regulation], progress=False)
        assert np.isfinite(out.image.values).all() and np.isfinite(out.energy.values).all()
        published = AttentionRegulation.published(region=box, pathology_words=["polyps"])  # gates self-attention
        with pytest.raises(ValueError, match=rf"unknown site 'attn1.weights' for {lens.family.name}"):
            reprompt(lens, "an image of cecum", "an image of polyps", seeds=[0], num_inference_steps=STEPS,
                     edits=[published], progress=False)


def test_bad_family_specs_are_refused_with_what_to_change():
    with pytest.raises(ValueError, match="SanaSpec makes 16-pixel images, but SanaPipeline needs a multiple of 32"):
        SanaSpec(sample_size=8)
    with pytest.raises(ValueError, match=r"SD3Spec.t5_dim \(16\) must be at least the two CLIP widths together \(32\)"):
        SD3Spec(t5_dim=16)
    with pytest.raises(ValueError, match=r"SanaSpec.sample_size \(15\) must be a multiple of patch_size \(2\)"):
        SanaSpec(sample_size=15)
    with pytest.raises(ValueError, match="SD3Spec.num_heads must be >= 1, got 0"):
        SD3Spec(num_heads=0)


def test_sana_steering_the_convolutional_feed_forward_edits_its_grid_output(sana, sana_pipeline):
    vector = concept_vector(sana, positive=["a polyp"], negative=["a cecum"], seeds=[0, 1], num_inference_steps=STEPS,
                            site="ff")
    steered = generate(sana, "a polyp", seeds=[7], steer=Steer(vector, alpha=4.0, layers=(1,)),
                       num_inference_steps=STEPS, record_gates=True, progress=False)
    v = vector.values

    def edit(t, out):  # (rows, C, h, w): the same update per grid position
        direction = torch.from_numpy(v[t, 1])
        dots = torch.einsum("bchw,c->bhw", out, direction).clamp(min=0)
        return out - 4.0 * dots[:, None] * direction[None, :, None, None]

    want = raw_call(sana_pipeline, "a polyp", 7, [(sana_pipeline.transformer.transformer_blocks[1].ff, edit)])
    got = steered.image.sel(branch="edited").values[0, 0]
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(got - steered.image.sel(branch="original").values[0, 0]).max() > 1e-4
