"""Flux (FluxTransformer2DModel) on tiny random-weight pipelines, against raw torch hooks on the plain pipeline
call: two block lists numbered as one stack (double-stream blocks, then single-stream ones), the image tokens
of a single-stream sequence as the site, rotary joint attention weights, guidance distillation (no
unconditional batch) and packed 2×2 latents."""

import numpy as np
import pytest
import torch

from dit_lens import Steer, attention_maps, capture, concept_vector, generate, invert, load, write_explorer
from dit_lens.testing import FluxSpec, build_flux
from dit_lens.study import Study, run_study
from dit_lens.trace.runner import Hook, initial_noise, traced_generate

from test_study import ONE, BrightnessOracle, red_segmenter

STEPS = 3
TEXT = 512  # the T5 tokens the pipeline pads every prompt to (its max_sequence_length), before the image tokens


@pytest.fixture(scope="module")
def flux_pipeline():
    return build_flux(FluxSpec(num_layers=2, num_single_layers=2), seed=0)


@pytest.fixture(scope="module")
def flux(flux_pipeline):
    return load(flux_pipeline)


def raw_call(pipeline, prompt, seed, hooks=(), guidance_scale=4.5, output_type="np"):
    """The plain call with raw forward hooks ``[(module, fn(step, output) -> output | None)]``."""
    state = {"t": -1}
    handles = [pipeline.transformer.register_forward_pre_hook(lambda m, a: state.__setitem__("t", state["t"] + 1))]
    for module, fn in hooks:
        handles.append(module.register_forward_hook(lambda m, a, out, fn=fn: fn(state["t"], out)))
    try:
        return pipeline(prompt, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=STEPS,
                        guidance_scale=guidance_scale, output_type=output_type, height=16, width=16).images[0]
    finally:
        for handle in handles:
            handle.remove()


def blocks_of(pipeline):
    """dit-lens' layers: the double-stream blocks, then the single-stream ones."""
    return list(pipeline.transformer.transformer_blocks) + list(pipeline.transformer.single_transformer_blocks)


def test_flux_loads_with_its_two_block_lists_as_one_stack(flux, flux_pipeline, tmp_path):
    assert flux.family.name == "FluxTransformer2DModel" and flux.family.sampling == "flow"
    assert (flux.num_layers, flux.split, flux.token_grid) == (4, 2, (4, 4))  # 16 px, 8×8 latents packed 2×2
    assert flux.provenance()["num_layers"] == 4 and flux.pipeline_kwargs["height"] == 16
    assert flux.layers_with("ff") == [0, 1] and flux.layers_with("attn2") == [0, 1, 2, 3]
    image = flux.plain("a polyp", seed=3, num_inference_steps=STEPS)
    np.testing.assert_array_equal(image, raw_call(flux_pipeline, "a polyp", 3))
    flux_pipeline.save_pretrained(tmp_path / "flux")
    again = load(tmp_path / "flux")
    assert again.fingerprint == flux.fingerprint and again.pipeline_kwargs == flux.pipeline_kwargs
    np.testing.assert_array_equal(again.plain("a polyp", seed=3, num_inference_steps=STEPS), image)


@pytest.mark.parametrize("site", ["attn2", "block", "ff"])
def test_flux_capture_reads_the_image_tokens_of_both_block_lists(flux, flux_pipeline, site, tmp_path):
    double = len(flux_pipeline.transformer.transformer_blocks)

    def image_tokens(layer, out):
        if site == "block":
            return out[1]  # (text, image) from both kinds of block
        if site == "attn2":
            return out[0] if layer < double else out[:, TEXT:]  # (image, text), or the sequence [text; image]
        return out

    layers = [0, 1] if site == "ff" else [0, 1, 2, 3]
    raw = np.zeros((STEPS, len(layers), flux.width))

    def keep(j, layer):
        def fn(t, out):
            raw[t, j] = image_tokens(layer, out)[-1].mean(0).numpy()
        return fn

    module = {"attn2": lambda b: b.attn, "block": lambda b: b, "ff": lambda b: b.ff}[site]
    blocks = blocks_of(flux_pipeline)
    raw_call(flux_pipeline, "a polyp", 2, [(module(blocks[layer]), keep(j, layer)) for j, layer in enumerate(layers)])
    ds = capture(flux, ["a polyp"], seeds=[2], num_inference_steps=STEPS, site=site, store=tmp_path / "c.zarr")
    assert ds["layer"].values.tolist() == layers  # every block that has the site
    np.testing.assert_allclose(ds[site].sel(prompt="a polyp", seed=2).values, raw, rtol=1e-4, atol=1e-6)


def test_a_site_of_the_other_block_list_is_refused_naming_where_it_is(flux):
    with pytest.raises(ValueError, match=r"block 3 of Flux is one of its single_transformer_blocks, whose sites are "
                                         r"\['attn2', 'attn2.weights', 'block'\]; 'ff' exists in its "
                                         r"transformer_blocks \(blocks 0..1\)"):
        capture(flux, ["a polyp"], seeds=[0], num_inference_steps=STEPS, site="ff", layers=[1, 3])
    with pytest.raises(ValueError, match="branch='both' needs classifier-free guidance, but Flux is guidance-distilled"):
        capture(flux, ["a polyp"], seeds=[0], num_inference_steps=STEPS, branch="both")


def test_flux_steering_matches_raw_hooks_in_both_block_lists(flux, flux_pipeline):
    vector = concept_vector(flux, positive=["a polyp"], negative=["a cecum"], seeds=[0, 1], num_inference_steps=STEPS)
    assert vector.shape == (STEPS, 4, flux.width)
    zero = generate(flux, "a polyp", seeds=[5], steer=Steer(vector, alpha=0.0), num_inference_steps=STEPS,
                    progress=False)
    plain = raw_call(flux_pipeline, "a polyp", 5)
    np.testing.assert_array_equal(zero.image.sel(branch="edited").values, zero.image.sel(branch="original").values)
    np.testing.assert_allclose(zero.image.sel(branch="original").values[0, 0], plain, atol=1e-6)  # batched: rounding
    steered = generate(flux, "a polyp", seeds=[5], steer=Steer(vector, alpha=3.0, layers=(1, 2)),
                       num_inference_steps=STEPS, record_gates=True, progress=False)
    v = vector.values

    def steer(t, layer, image):
        direction = torch.from_numpy(v[t, layer])
        return image - 3.0 * torch.einsum("bnc,c->bn", image, direction).clamp(min=0)[..., None] * direction

    def double(t, out):  # (image, text): the text stream as it was
        return steer(t, 1, out[0]), out[1]

    def single(t, out):  # [text; image]: the text tokens as they were
        return torch.cat([out[:, :TEXT], steer(t, 2, out[:, TEXT:])], dim=1)

    blocks = blocks_of(flux_pipeline)
    want = raw_call(flux_pipeline, "a polyp", 5, [(blocks[1].attn, double), (blocks[2].attn, single)])
    got = steered.image.sel(branch="edited").values[0, 0]
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(got - plain).max() > 1e-3  # the steer changed the image
    assert steered.gate.sizes["layer"] == 2 and (steered.gate.sizes["row"], steered.gate.sizes["col"]) == (4, 4)


def rotate(x, emb):
    """Rotary embedding by hand: each channel pair (a, b) of ``x (rows, tokens, heads, d)`` turned by its angle."""
    cos, sin = (e[None, :, None, :] for e in emb)  # (tokens, d), each angle repeated over its pair
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack([-b, a], dim=-1).flatten(-2)
    return x * cos + turned * sin


def test_flux_attention_maps_are_the_image_to_text_block_of_its_rotary_softmax(flux, flux_pipeline):
    prompt = "an image of polyps"
    maps = attention_maps(flux, [prompt], seeds=[3], words=["polyps"], num_inference_steps=STEPS, progress=False)
    np.testing.assert_array_equal(maps.image.values[0, 0], raw_call(flux_pipeline, prompt, 3))  # reading changes nothing
    keys = list(maps.attrs["word_tokens"][prompt]["polyps"])
    assert keys == list(range(12, 18))  # T5's byte tokens: the only text the image attends to
    recorded = []

    def record(module, args, kwargs, out):
        def heads(x):
            return x.unflatten(-1, (module.heads, -1))  # (rows, tokens, heads, d)
        hidden, context = kwargs["hidden_states"], kwargs.get("encoder_hidden_states")
        q, k = module.norm_q(heads(module.to_q(hidden))), module.norm_k(heads(module.to_k(hidden)))
        if context is not None:  # double-stream: the text stream's own projections come first
            q = torch.cat([module.norm_added_q(heads(module.add_q_proj(context))), q], dim=1)
            k = torch.cat([module.norm_added_k(heads(module.add_k_proj(context))), k], dim=1)
        q, k = rotate(q, kwargs["image_rotary_emb"]), rotate(k, kwargs["image_rotary_emb"])
        q, k = q.transpose(1, 2)[:, :, TEXT:], k.transpose(1, 2)  # image queries, every key
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)[-1]  # (heads, N, M + N)
        recorded.append(weights[:, :, keys].sum(-1).mean(0).reshape(4, 4).numpy())

    handles = [block.attn.register_forward_hook(record, with_kwargs=True) for block in blocks_of(flux_pipeline)]
    try:
        raw_call(flux_pipeline, prompt, 3)
    finally:
        for handle in handles:
            handle.remove()
    want = np.stack(recorded).reshape(STEPS, 4, 4, 4)
    np.testing.assert_allclose(maps.attention.values[0, 0, :, :, 0], want, atol=1e-5)
    assert 0 < want.max() < 1


def test_flux_reweighting_text_keys_changes_only_the_edited_branch(flux):
    from dit_lens import Reweight

    same = generate(flux, "a polyp", seeds=[0], edits=[Reweight(tokens=[2], scale=1.0)], num_inference_steps=STEPS,
                    progress=False)
    np.testing.assert_array_equal(same.image.sel(branch="edited").values, same.image.sel(branch="original").values)
    cut = generate(flux, "a polyp", seeds=[0], edits=[Reweight(tokens=range(0, 7), scale=0.0)],
                   num_inference_steps=STEPS, progress=False)
    assert np.abs(cut.image.sel(branch="edited").values - cut.image.sel(branch="original").values).max() > 1e-4
    np.testing.assert_allclose(cut.image.sel(branch="original").values[0, 0],
                               flux.plain("a polyp", seed=0, num_inference_steps=STEPS), atol=1e-6)


def test_guidance_distillation_runs_one_row_per_image_and_embeds_the_scale(flux, flux_pipeline):
    rows = []
    traced_generate(flux, ["a polyp", "a cecum"], [0, 1], num_inference_steps=STEPS, guidance_scale=4.5,
                    hooks=[Hook("attn2", (0,), lambda step, layer, out: rows.append(out.shape[0]))])
    assert rows == [2] * STEPS  # no unconditional batch
    low = flux.plain("a polyp", seed=0, num_inference_steps=STEPS, guidance_scale=1.0)
    high = flux.plain("a polyp", seed=0, num_inference_steps=STEPS, guidance_scale=4.5)
    assert np.abs(low - high).max() > 1e-4  # the scale reaches the transformer
    np.testing.assert_array_equal(low, raw_call(flux_pipeline, "a polyp", 0, guidance_scale=1.0))
    with pytest.raises(ValueError, match="halves='uncond' needs classifier-free guidance .* Flux has none"):
        generate(flux, "a polyp", seeds=[0], steer=Steer(concept_vector(
            flux, positive=["a polyp"], negative=["a cecum"], seeds=[0], num_inference_steps=STEPS), alpha=1.0,
            halves="uncond"), num_inference_steps=STEPS, progress=False)


def test_latents_in_and_out_are_unpacked_as_for_every_family(flux, flux_pipeline):
    noise = initial_noise(flux, [4])
    assert noise.shape == (1, 4, 8, 8)  # (rows, C, h, w): the VAE's latent grid, not the packed tokens
    given = traced_generate(flux, ["a polyp"], [999], num_inference_steps=STEPS, guidance_scale=4.5, hooks=[],
                            latents=noise, output_type="np").images[0]
    np.testing.assert_array_equal(given, raw_call(flux_pipeline, "a polyp", 4))
    seen = []
    final = traced_generate(flux, ["a polyp"], [4], num_inference_steps=STEPS, guidance_scale=4.5, hooks=[],
                            step_end=lambda step, latents: seen.append(tuple(latents.shape)), output_type="latent")
    assert seen == [(1, 4, 8, 8)] * STEPS and tuple(final.images.shape) == (1, 4, 8, 8)
    packed = raw_call(flux_pipeline, "a polyp", 4, output_type="latent")
    np.testing.assert_array_equal(flux.family.pack_latents(final.images)[0], packed)

    def darken(step, latents):
        latents[:, 0] -= 1.0  # an edit in place on the unpacked latents reaches the loop
    edited = traced_generate(flux, ["a polyp"], [4], num_inference_steps=STEPS, guidance_scale=4.5, hooks=[],
                             step_end=darken, output_type="latent").images
    assert float((final.images[:, 0] - edited[:, 0]).mean()) > 0.5


def test_flux_inversion_recovers_the_noise_and_regenerates_the_image(flux):
    from dit_lens.inversion.trajectory import regenerate, trajectory_latents

    T = 8
    run = traced_generate(flux, ["a polyp"], [0], num_inference_steps=T, guidance_scale=3.5, hooks=[],
                          output_type="latent").images  # a run's own clean latents (rows, C, h, w)
    noise = initial_noise(flux, [0])
    errors = {}
    for refine in (0, 3):
        trajectory = invert(flux, None, "a polyp", latents=run, num_inference_steps=T, guidance_scale=3.5,
                            refine=refine, progress=False)
        errors[refine] = float((trajectory_latents(trajectory) - noise).abs().max())
    assert errors[3] < 2e-3 < errors[0]  # the dynamic shift's schedule, inverted step for step
    plain = flux.plain("a polyp", seed=0, num_inference_steps=T, guidance_scale=3.5)
    np.testing.assert_allclose(regenerate(flux, trajectory, progress=False)[0], plain, atol=2e-3)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_flux_noise_optimisation_runs_the_run_generate_makes(flux, guidance_scale):
    from dit_lens import optimize_noise
    from dit_lens.optimize import class_probability
    from dit_lens.world.judges import Oracle, OracleNet

    torch.manual_seed(0)
    oracle = Oracle(OracleNet(width=8, num_classes=3), ("polyps", "normal cecum", "esophagitis"))
    z = optimize_noise(flux, "a polyp", seeds=[0, 1], objective=class_probability(oracle, "esophagitis"),
                       iterations=0, num_inference_steps=STEPS, guidance_scale=guidance_scale, progress=False)
    out = generate(flux, "a polyp", seeds=[0, 1], edits=[z], num_inference_steps=STEPS, guidance_scale=guidance_scale,
                   progress=False)
    images = out.image.sel(prompt="a polyp", branch="original").values
    np.testing.assert_allclose(z.before, np.log(oracle(images)[:, 2]), atol=1e-4, rtol=0)


def test_attention_regulation_and_editors_run_on_flux(flux):
    from dit_lens import AttentionRegulation, edit, reprompt

    box = np.zeros((16, 16), bool)
    box[2:8, 4:12] = True
    regulation = AttentionRegulation(region=box, pathology_words=["polyps"], energy_step=0.05)
    out = reprompt(flux, "an image of cecum", "an image of polyps", seeds=[0], num_inference_steps=STEPS,
                   edits=[regulation], progress=False)
    assert np.isfinite(out.image.values).all() and float(out.energy.max()) > 0
    image = flux.plain("a polyp", seed=1, num_inference_steps=STEPS)
    pnp = edit(flux, image, source="a polyp", target="a cecum", method="pnp", attention_fraction=0.0,
               num_inference_steps=STEPS, progress=False)
    assert pnp.attrs["sampler"] == "flow-matching Euler" and np.isfinite(pnp.image.values).all()
    with pytest.raises(ValueError, match="h-Edit .* needs a noise-schedule .* Flux samples by flow"):
        edit(flux, image, source="a polyp", target="a cecum", method="hedit", num_inference_steps=STEPS,
             progress=False)


def test_a_study_and_the_explorer_run_on_flux(flux, tmp_path):
    s = Study("flux", pairs=(ONE,), methods={"medsteer": {"alpha": (0.0, 3.0), "vector_seeds": (2,)}}, eval_seeds=2,
              num_inference_steps=STEPS)
    result = run_study(s, flux, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path / "study",
                       progress=False)
    assert result.attrs["denoiser_class"] == "FluxTransformer2DModel"
    flips = result["flip_rate"].sel(method="medsteer").values.ravel()
    assert np.isfinite(flips).all() and flips[0] == 0.0  # α = 0 changes nothing, so nothing flips
    vector = concept_vector(flux, positive=["a polyp"], negative=["a cecum"], seeds=[0], num_inference_steps=STEPS)
    out = generate(flux, "a polyp", seeds=[0, 1], steer=Steer(vector, alpha=3.0), record_gates=True,
                   num_inference_steps=STEPS, progress=False)
    maps = attention_maps(flux, ["a polyp"], seeds=[0, 1], words=["polyp"], num_inference_steps=STEPS, progress=False)
    page = write_explorer(out, tmp_path / "explorer.html", attention=maps).read_text()
    assert "Plotly.restyle" in page and 'id="layer"' in page and "polyp" in page


def test_bad_flux_specs_are_refused_with_what_to_change():
    with pytest.raises(ValueError, match="FluxSpec.patch_size is Flux's 2×2 latent packing and must be 2, got 1"):
        FluxSpec(patch_size=1)
    with pytest.raises(ValueError, match=r"FluxSpec.sample_size \(7\) must be a multiple of patch_size \(2\)"):
        FluxSpec(sample_size=7)
    with pytest.raises(ValueError, match="FluxSpec.head_dim must be even and at least 6"):
        FluxSpec(head_dim=5)
    with pytest.raises(ValueError, match="FluxSpec.num_single_layers must be >= 0, got -1"):
        FluxSpec(num_single_layers=-1)
