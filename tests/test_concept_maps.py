"""concept_maps (dit_lens.readouts.concept_maps) against recomputations from raw torch hooks on the plain pipeline,
on a tiny model of each family."""

import numpy as np
import pytest
import torch

from dit_lens import load
from dit_lens.model.tokens import word_tokens
from dit_lens.readouts.attention_maps import attention_maps
from dit_lens.readouts.concept_maps import concept_maps
from dit_lens.sampling import Denoiser, encode
from dit_lens.testing import FluxSpec, PixArtSpec, SanaSpec, SD3Spec, build_flux, build_pixart, build_sana, build_sd3

T, PROMPT, CONCEPTS, SEEDS = 2, "a red polyp", ["polyp", "red"], [0, 3]
BUILDERS = {
    "pixart": lambda: build_pixart(PixArtSpec(num_layers=2, num_heads=2, head_dim=8, sample_size=8, patch_size=2)),
    "sana": lambda: build_sana(SanaSpec(num_layers=2)),
    "sd3": lambda: build_sd3(SD3Spec(num_layers=3)),
    "flux": lambda: build_flux(FluxSpec(num_layers=2, num_single_layers=1)),
}


def plain_batch(lens, hooks=()):
    """The plain pipeline over SEEDS in one call, with raw forward hooks ``(module, fn, kwargs?)`` installed;
    returns the images ``(seeds, H, W, 3)``."""
    handles = [m.register_forward_pre_hook(fn, with_kwargs=True) if pre else m.register_forward_hook(fn)
               for m, fn, pre in hooks]
    try:
        return lens.pipeline([PROMPT] * len(SEEDS), generator=[lens.generator(s) for s in SEEDS],
                             num_inference_steps=T, guidance_scale=4.5, output_type="np",
                             **lens.pipeline_kwargs).images
    finally:
        for h in handles:
            h.remove()


def concept_embeddings(lens):
    """Each concept encoded alone by the pipeline, as the blocks receive text: ``[(tokens, C)]``."""
    den = lens.denoiser
    out = []
    for concept in CONCEPTS:
        embeds = Denoiser(lens, [concept]).embeds[0]  # the pipeline's encode_prompt
        if hasattr(den, "caption_projection") and den.caption_projection is not None:
            embeds = den.caption_projection(embeds)
            if getattr(den, "caption_norm", None) is not None:
                embeds = den.caption_norm(embeds)
        else:
            embeds = den.context_embedder(embeds)
        out.append(embeds[list(word_tokens(lens, concept, [concept])[concept])].detach().double())
    return out


def cross_reference(lens, space="prototype"):
    """PixArt, SANA, written out from the attn2 module's own inputs and output (cond rows): ``"value"``: softmax over
    concepts of ⟨o_x, mean over the concept's tokens of to_out(to_v(e))⟩; ``"prototype"``: a_c = softmax over image
    tokens of the head-mean of q_x·k_c/√d (k_c the mean key of the concept's tokens), o_c = Σ_x a_c(x) o_x."""
    state, maps, queries = {"t": -1}, {}, {}
    concepts = concept_embeddings(lens)

    def before(layer):
        def fn(_m, args, _kwargs):
            queries[layer] = args[0][len(SEEDS):].double()
        return fn

    def hook(layer):
        attn = lens.blocks[layer].attn2

        def fn(_m, _a, out):
            out = out[len(SEEDS):].double()  # (seeds, N, C), cond rows
            if space == "value":
                vals = []
                for e in concepts:
                    v = e @ attn.to_v.weight.double().T + attn.to_v.bias.double()
                    vals.append((v @ attn.to_out[0].weight.double().T + attn.to_out[0].bias.double()).mean(0))
                prototypes = torch.stack(vals)[None].expand(len(SEEDS), -1, -1)  # (seeds, concepts, C)
            else:
                heads = attn.heads
                q = queries[layer] @ attn.to_q.weight.double().T + attn.to_q.bias.double()
                q = q.unflatten(-1, (heads, -1))  # (s, N, h, d)
                prototypes, logits = [], []
                for e in concepts:
                    k = (e @ attn.to_k.weight.double().T + attn.to_k.bias.double()).unflatten(-1, (heads, -1))
                    logit = (q * k.mean(0)).sum(-1).mean(-1) / q.shape[-1] ** 0.5  # (s, N)
                    logits.append(logit)
                    prototypes.append((logit.softmax(-1)[..., None] * out).sum(1))  # (s, C)
                prototypes = torch.stack(prototypes, 1)
                if space == "key":
                    maps[(state["t"], layer)] = torch.stack(logits, -1).softmax(-1)
                    return
            maps[(state["t"], layer)] = (out @ prototypes.transpose(1, 2)).softmax(-1)  # (s, N, concepts)
        return fn

    hooks = [(lens.denoiser, lambda m, a, k: state.__setitem__("t", state["t"] + 1), True)]
    hooks += [(lens.blocks[l].attn2, before(l), True) for l in range(lens.num_layers)]
    hooks += [(lens.blocks[l].attn2, hook(l), False) for l in range(lens.num_layers)]
    return plain_batch(lens, hooks), maps


def joint_reference(lens, layers, run=plain_batch, rows=len(SEEDS), guided=None):
    """SD3, Flux: the concept stream as the block itself moves text: at each block, the block is called on (the
    run's image input, the concept stream) and its attention's text output is the concepts' output. `run(lens,
    hooks)` makes the run (default: the plain pipeline over SEEDS) over `rows` conditional rows."""
    state, maps, inner = {"t": -1, "c": None, "busy": False}, {}, {}
    stream0 = torch.cat([e.float() for e in concept_embeddings(lens)])[None]  # (1, K, C)
    sizes = [len(word_tokens(lens, c, [c])[c]) for c in CONCEPTS]
    guided = lens.family.guidance == "cfg" if guided is None else guided
    cond = slice(rows, None) if guided else slice(None)

    def block_hook(layer):
        block = lens.blocks[layer]

        def fn(_m, args, kwargs):
            if state["busy"]:
                return
            if layer == 0:
                state["c"] = stream0.expand(rows, -1, -1)
            extra = {}
            if kwargs.get("image_rotary_emb") is not None:  # Flux: concept tokens at position 0
                cos, sin = kwargs["image_rotary_emb"]
                text = kwargs["encoder_hidden_states"].shape[1]
                k = state["c"].shape[1]
                extra["image_rotary_emb"] = (torch.cat([torch.ones(k, cos.shape[1]), cos[text:]]),
                                             torch.cat([torch.zeros(k, sin.shape[1]), sin[text:]]))
            state["busy"] = True
            try:
                c_next, _ = block(hidden_states=kwargs["hidden_states"][cond], encoder_hidden_states=state["c"],
                                  temb=kwargs["temb"][cond], **extra)
            finally:
                state["busy"] = False
            state["c"] = c_next
        return fn

    def attn_hook(layer):
        def fn(_m, _a, out):
            if state["busy"]:
                inner[layer] = out[1]  # the concepts' attention output (to_add_out applied)
                return
            if layer in layers:
                state.setdefault("pending", {})[layer] = out[0][cond]
        return fn

    def after_block(layer):
        def fn(_m, _a, _out):
            if state["busy"] or layer not in layers:
                return
            image, concept = state["pending"][layer].double(), inner[layer].double()  # (s, N, C), (s, K, C)
            pooled = torch.stack([chunk.mean(1) for chunk in concept.split(sizes, dim=1)], 1)  # (s, concepts, C)
            maps[(state["t"], layer)] = (image @ pooled.transpose(1, 2)).softmax(-1)
        return fn

    hooks = [(lens.denoiser, lambda m, a, k: state.__setitem__("t", state["t"] + 1), True)]
    for l in range(max(layers) + 1):
        hooks += [(lens.blocks[l], block_hook(l), True), (lens.blocks[l].attn, attn_hook(l), False),
                  (lens.blocks[l], after_block(l), False)]
    return run(lens, hooks), maps


@pytest.mark.parametrize("family, space", [("pixart", "prototype"), ("pixart", "value"), ("pixart", "key"),
                                           ("sana", "prototype"), ("sana", "value"), ("sd3", "prototype"),
                                           ("flux", "prototype")])
def test_output_maps_match_raw_hook_recomputation_and_leave_the_run_unchanged(family, space):
    lens = load(BUILDERS[family]())
    ds = concept_maps(lens, prompt=PROMPT, concepts=CONCEPTS, seeds=SEEDS, num_inference_steps=T, output_space=space,
                      progress=False)
    layers = [int(l) for l in ds.layer.values]
    if family in ("pixart", "sana"):
        images, reference = cross_reference(lens, space)
        assert layers == list(range(lens.num_layers))
    else:
        images, reference = joint_reference(lens, layers)
        assert layers == [0, 1]  # SD3's last block, Flux's single block: no text-stream output
    np.testing.assert_array_equal(ds["image"].values, images)  # the run is the plain one, bit for bit
    assert len(reference) == T * len(layers)
    for (step, layer), want in reference.items():
        got = ds["map"].sel(step=step, layer=layer).values.reshape(len(SEEDS), len(CONCEPTS), -1)
        np.testing.assert_allclose(got, want.transpose(1, 2).numpy(), atol=2e-5)
    np.testing.assert_allclose(ds["pooled"].values, ds["map"].mean(("step", "layer")).values)
    assert not np.allclose(ds["map"].sel(concept="polyp").values, 0.5, atol=1e-4)  # the concepts differ


def test_cross_attention_kind_is_the_word_maps():
    lens = load(BUILDERS["pixart"]())
    ds = concept_maps(lens, prompt=PROMPT, concepts=CONCEPTS, seeds=SEEDS, num_inference_steps=T,
                      kind="cross_attention", progress=False)
    words = attention_maps(lens, [PROMPT], seeds=SEEDS, words=CONCEPTS, num_inference_steps=T, progress=False)
    np.testing.assert_array_equal(ds["map"].values, words["attention"].isel(prompt=0).values)
    np.testing.assert_array_equal(ds["image"].values, plain_batch(lens))


def _noisy_by_hand(lens, images, level, seed=0):
    """Latents of the given images at `level` (DDPM: √ᾱ z + √(1−ᾱ) ε, one noise field for every image)."""
    vae, sched = lens.pipeline.vae, lens.pipeline.scheduler
    x = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
    z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    eps = torch.randn((1, *z.shape[1:]), generator=torch.Generator().manual_seed(seed))
    t = round(level * (sched.config.num_train_timesteps - 1))
    ab = float(sched.alphas_cumprod[t])
    return ab ** 0.5 * z + (1 - ab) ** 0.5 * eps, t


@pytest.mark.parametrize("kind", ["output", "cross_attention"])
def test_given_images_one_conditional_call_per_level(kind):
    lens = load(BUILDERS["pixart"]())
    images = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
    levels = [0.3, 0.7]
    calls = []
    count = lambda m, a, k: calls.append((a[0] if a else k["hidden_states"]).shape[0])  # rows per call
    handle = lens.denoiser.register_forward_pre_hook(count, with_kwargs=True)
    try:
        ds = concept_maps(lens, images, prompt=PROMPT, concepts=CONCEPTS, noise_levels=levels, kind=kind,
                          output_space="value", progress=False)
    finally:
        handle.remove()
    assert calls == [3, 3]  # one conditional call per level, every image in it
    assert ds["map"].dims == ("item", "step", "layer", "concept", "row", "col")
    np.testing.assert_allclose(ds.noise_level.values, levels)
    np.testing.assert_array_equal(ds["image"].values, images)
    concepts = concept_embeddings(lens)
    tokens = word_tokens(lens, PROMPT, CONCEPTS)
    for step, level in enumerate(levels):
        noisy, t = _noisy_by_hand(lens, images, level)
        seen = {}
        if kind == "output":
            hooks = [lens.blocks[l].attn2.register_forward_hook(
                lambda m, a, out, l=l: seen.__setitem__(l, out.double())) for l in range(lens.num_layers)]
            try:
                Denoiser(lens, [PROMPT]).raw(noisy, t, [0, 0, 0])
            finally:
                for h in hooks:
                    h.remove()
            for layer, out in seen.items():
                attn = lens.blocks[layer].attn2
                vals = torch.stack([attn.to_out[0](attn.to_v(e.float())).double().mean(0) for e in concepts])
                want = (out @ vals.T).softmax(-1).transpose(1, 2)  # (images, concepts, N)
                got = ds["map"].sel(step=step, layer=layer).values.reshape(3, 2, -1)
                np.testing.assert_allclose(got, want.numpy(), atol=2e-5)
        else:
            weights = raw_weights_of_call(lens, noisy, t)
            for layer, w in weights.items():
                mean = w.mean(1)  # (images, N, keys)
                for c, concept in enumerate(CONCEPTS):
                    want = mean[..., list(tokens[concept])].sum(-1)
                    got = ds["map"].sel(step=step, layer=layer, concept=concept).values.reshape(3, -1)
                    np.testing.assert_allclose(got, want.numpy(), atol=2e-6)


def raw_weights_of_call(lens, noisy, t):
    """softmax(q·kᵀ/√d + mask) of every attn2 in one conditional denoiser call, from its own inputs."""
    weights = {}

    def make(layer):
        def hook(attn, args, kwargs):
            hidden, context = args[0], kwargs["encoder_hidden_states"]
            heads = attn.heads
            q = attn.to_q(hidden).double().unflatten(-1, (heads, -1)).transpose(1, 2)
            k = attn.to_k(context).double().unflatten(-1, (heads, -1)).transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            mask = kwargs.get("attention_mask")
            if mask is not None:
                scores = scores + mask.double()[:, None]
            weights[layer] = scores.softmax(-1)
        return hook

    handles = [lens.blocks[l].attn2.register_forward_pre_hook(make(l), with_kwargs=True)
               for l in range(lens.num_layers)]
    try:
        Denoiser(lens, [PROMPT]).raw(noisy, t, [0] * len(noisy))
    finally:
        for h in handles:
            h.remove()
    return weights


def test_key_space_alternative_and_multi_token_pooling():
    lens = load(BUILDERS["pixart"]())
    ds = concept_maps(lens, prompt=PROMPT, concepts=["polyp", "red"], seeds=[0], num_inference_steps=T,
                      output_space="key", progress=False)
    default = concept_maps(lens, prompt=PROMPT, concepts=["polyp", "red"], seeds=[0], num_inference_steps=T,
                           progress=False)
    assert ds.attrs["output_space"] == "key" and default.attrs["output_space"] == "prototype"
    assert not np.allclose(ds["map"].values, default["map"].values)
    np.testing.assert_array_equal(ds["image"].values, default["image"].values)
    assert ds.attrs["concept_tokens"] == {"polyp": [0, 1, 2, 3, 4], "red": [0, 1, 2]}  # ByT5: a token per byte


def test_same_seed_same_maps():
    lens = load(BUILDERS["pixart"]())
    a = concept_maps(lens, prompt=PROMPT, concepts=CONCEPTS, seeds=[1], num_inference_steps=T, progress=False)
    b = concept_maps(lens, prompt=PROMPT, concepts=CONCEPTS, seeds=[1], num_inference_steps=T, progress=False)
    np.testing.assert_array_equal(a["map"].values, b["map"].values)
    assert a.attrs["seeds"] == [1] and a.attrs["kind"] == "output" and a.attrs["readout"] == "concept_maps"
    assert a.attrs["num_inference_steps"] == T and a.attrs["concepts"] == CONCEPTS
    assert a.attrs["maps_of"] == "generated runs" and a.attrs["model_source"] == "<object>"


@pytest.mark.parametrize("kwargs, message", [
    ({"concepts": []}, "non-empty list"),
    ({"concepts": ["polyp", " "]}, "non-empty strings"),
    ({"concepts": ["polyp", "polyp"]}, "duplicates"),
    ({"concepts": ["x" * 400]}, "more than the 120"),
    ({"concepts": ["ulcer"], "kind": "cross_attention"}, "ulcer"),
    ({"layers": [5]}, "out of range"),
    ({"layers": 1}, r"pass layers=\[1\]"),
    ({"steps": [T]}, "out of range"),
    ({"kind": "gradients"}, "kind must be one of"),
    ({"output_space": "query"}, "output_space"),
])
def test_bad_input_is_refused_clearly(kwargs, message):
    lens = load(BUILDERS["pixart"]())
    args = dict(prompt=PROMPT, concepts=CONCEPTS, seeds=[0], num_inference_steps=T, progress=False)
    with pytest.raises(ValueError, match=message):
        concept_maps(lens, **{**args, **kwargs})


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 8, 8, 3), np.float32), "the model makes 16×16"),
    (np.full((1, 16, 16, 3), 2.0, np.float32), r"\[0, 1\]"),
    (np.zeros((1, 16, 16), np.float32), "grayscale"),
])
def test_bad_images_are_refused(images, message):
    lens = load(BUILDERS["pixart"]())
    with pytest.raises(ValueError, match=message):
        concept_maps(lens, images, prompt=PROMPT, concepts=CONCEPTS, progress=False)


def test_joint_blocks_without_a_text_output_are_refused():
    lens = load(BUILDERS["sd3"]())
    with pytest.raises(ValueError, match="output_space applies to cross-attention families"):
        concept_maps(lens, prompt=PROMPT, concepts=CONCEPTS, output_space="value", progress=False)
    with pytest.raises(ValueError, match="no text-stream output"):
        concept_maps(lens, prompt=PROMPT, concepts=CONCEPTS, layers=[2], num_inference_steps=T, progress=False)
    with pytest.raises(ValueError, match="noise_levels"):
        concept_maps(lens, np.zeros((1, 16, 16, 3), np.float32), prompt=PROMPT, concepts=CONCEPTS,
                     noise_levels=[0.0], progress=False)


def test_figure_and_explorer_show_each_concepts_pooled_map(tmp_path):
    from dit_lens.views.concept_maps import concept_maps_figure, overlay, write_concept_explorer

    lens = load(BUILDERS["pixart"]())
    ds = concept_maps(lens, prompt=PROMPT, concepts=CONCEPTS, seeds=SEEDS, num_inference_steps=T, progress=False)
    fig = concept_maps_figure(ds)
    assert len(fig.axes) == len(SEEDS) * (1 + len(CONCEPTS))
    assert "output-space concept maps" in fig._suptitle.get_text()
    page = write_concept_explorer(ds, tmp_path / "maps" / "page.html").read_text()
    assert page.count("data:image/png;base64,") == len(SEEDS) * (1 + len(CONCEPTS))
    assert "<select id='concept'><option value='polyp'>polyp</option><option value='red'>red</option>" in page
    image, grid = ds["image"][0].values, ds["pooled"].sel(concept="red")[0].values
    drawn = overlay(image, grid)
    assert drawn.shape == image.shape and not np.array_equal(drawn, overlay(image, -grid))
    with pytest.raises(ValueError, match="dit_lens.concept_maps"):
        write_concept_explorer(ds.drop_vars("pooled"), tmp_path / "x.html")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_given_images_on_joint_families_match_the_block_driven_reference(family):
    lens = load(BUILDERS[family]())
    size = lens.pipeline_kwargs["height"]
    images = np.random.default_rng(1).random((2, size, size, 3)).astype(np.float32)
    ds = concept_maps(lens, images, prompt=PROMPT, concepts=CONCEPTS, noise_levels=[0.4], guidance_scale=3.0,
                      progress=False)
    latents = encode(lens, images)  # the VAE's posterior mean, shifted and scaled
    eps = torch.randn((1, *latents.shape[1:]), generator=torch.Generator().manual_seed(0))
    noisy = 0.6 * latents + 0.4 * eps  # flow: (1 − σ)·z + σ·ε at σ = 0.4
    timestep = 0.4 * lens.pipeline.scheduler.config.num_train_timesteps

    def call(lens, hooks):
        handles = [m.register_forward_pre_hook(fn, with_kwargs=True) if pre else m.register_forward_hook(fn)
                   for m, fn, pre in hooks]
        try:
            Denoiser(lens, [PROMPT], guidance=3.0).raw(noisy, timestep, [0, 0])
        finally:
            for h in handles:
                h.remove()

    _, reference = joint_reference(lens, [0, 1], run=call, rows=2, guided=False)
    assert sorted(reference) == [(0, 0), (0, 1)]
    for (_, layer), want in reference.items():
        got = ds["map"].sel(step=0, layer=layer).values.reshape(2, len(CONCEPTS), -1)
        np.testing.assert_allclose(got, want.transpose(1, 2).numpy(), atol=2e-5)
