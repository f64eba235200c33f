"""Regions and mask-guided attention regulation: masks, each module against a hand-written reference,
the latent correction unseen by the traced run, identities, confinement, round trips and refusals."""

import copy
import json

import numpy as np
import pytest
import torch
import xarray as xr

from dit_lens.interventions.base import EditContext, Intervention, from_dict
from dit_lens.interventions.generate import generate
from dit_lens.interventions.region import Confine, Region
from dit_lens.interventions.regulate import (AttentionRegulation, EnergyGuidance, GateSelfAttention,
                                             RegionMix, RegionReweight)
from dit_lens.trace.runner import Hook, traced_generate
from dit_lens.model.tokens import word_tokens

T = 3
PROMPT = "a polyp in the colon"


def corner(size=16, share=0.5):
    """A bool mask covering the top-left `share` of each side of a size×size image."""
    mask = np.zeros((size, size), bool)
    mask[: int(size * share), : int(size * share)] = True
    return mask


def test_region_resamples_by_area_and_picks_masks_by_seed(tiny_lens):
    mask = np.zeros((16, 16), bool)
    mask[:4, :6] = True  # token (0, 0) fully inside, token (0, 1) half inside
    tokens = Region.of(mask).tokens((4, 4), seeds=[5, 6])
    assert tokens.shape == (2, 16) and tokens[0, 0] == 1.0 and tokens[0, 1] == 0.5 and tokens[0, 2] == 0.0
    per_seed = xr.DataArray(np.stack([corner(), ~corner()]), dims=("seed", "y", "x"), coords={"seed": [7, 3]})
    region = Region.of(per_seed)
    picked = region.tokens((4, 4), seeds=[3, 7, 3])
    assert picked[0].tolist() == picked[2].tolist() and picked[0, 0] == 0.0 and picked[1, 0] == 1.0
    with pytest.raises(ValueError, match=r"masks for seeds \[7, 3\] but the run uses seeds \[9\]"):
        region.tokens((4, 4), seeds=[9])
    with pytest.raises(ValueError, match="have no seeds"):
        region.tokens((4, 4), seeds=[])
    Region.of(np.ones((4, 4))).check(tiny_lens, "r")  # token-grid size is accepted as well as image size
    focus = Region.of(corner()).focus((4, 4), [0], blur=1.0)
    assert float(focus.max()) == 1.0 and 0 < float(focus[0, 15]) < float(focus[0, 0])


@pytest.mark.parametrize("bad, match", [
    (np.ones((2, 3, 4, 5)), "must be"),
    (np.full((16, 16), 2.0), r"values in \[0, 1\]"),
    (np.full((16, 16), np.nan), r"values in \[0, 1\]"),
    (np.zeros((16, 16)), "empty"),
    ("everywhere", "must be a mask"),
    (np.array([["a"]]), "bool or numbers"),
])
def test_bad_masks_are_refused_with_what_to_do(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Region.of(bad)


def test_a_mask_of_the_wrong_size_is_refused_before_running(tiny_lens):
    reg = AttentionRegulation(region=np.ones((10, 10), bool), pathology_words=["polyp"])
    with pytest.raises(ValueError, match="16×16 images on a 4×4 token grid"):
        generate(tiny_lens, PROMPT, seeds=[0], edits=[reg], num_inference_steps=T, progress=False)


def weights_ctx(lens, pairs=1, halves=("cond",), seeds=(0,)):
    return EditContext(0, 0, "attn2.weights", halves, pairs, original=None, seeds=tuple(seeds),
                       prompts=(PROMPT,) * pairs, num_inference_steps=T, lens=lens)


def test_region_reweight_and_self_attention_gate_follow_their_equations(tiny_lens):
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(2, 2, 16, 30, generator=gen)  # (rows = 2 halves × 1 pair, heads, queries, keys)
    w = w / w.sum(-1, keepdim=True)
    mask = corner()
    m = Region.of(mask).tokens((4, 4), [0])[0]  # (queries,)
    keys = list(word_tokens(tiny_lens, PROMPT, ["polyp"])["polyp"])
    edit = RegionReweight(["polyp"], mask, inside=3.0, outside=0.5)
    new, _ = edit.apply(w, weights_ctx(tiny_lens, halves=("uncond", "cond")))
    expect = w.clone()
    expect[..., keys] *= (0.5 + 2.5 * m)[:, None]
    expect = expect / expect.sum(-1, keepdim=True)
    assert torch.allclose(new, expect, atol=1e-6)

    s = torch.rand(1, 2, 16, 16, generator=gen)
    s = s / s.sum(-1, keepdim=True)
    gated, _ = GateSelfAttention(mask).apply(s, weights_ctx(tiny_lens))
    inside = m.bool()
    assert float(gated[0][:, inside][:, :, ~inside].abs().max()) == 0.0  # no attention across the border
    assert float(gated[0][:, ~inside][:, :, inside].abs().max()) == 0.0
    assert torch.allclose(gated.sum(-1), torch.ones(1, 2, 16))


def test_a_word_not_in_the_prompt_is_refused(tiny_lens):
    reg = AttentionRegulation(region=corner(), pathology_words=["ulcer"], energy_step=0)
    with pytest.raises(ValueError, match="word 'ulcer' is not in the prompt"):
        generate(tiny_lens, PROMPT, seeds=[0], edits=[reg], num_inference_steps=T, progress=False)


def test_regulation_with_every_module_off_is_bit_identical(tiny_lens):
    plain = generate(tiny_lens, PROMPT, seeds=[0, 1], num_inference_steps=T, progress=False)
    reg = AttentionRegulation(region=corner(), pathology_words=["polyp"], gate_self_attention=False,
                              enhance=0, energy_step=0, condition_outside=False, contrast=0)
    assert reg.is_identity and reg.parts() == []
    out = generate(tiny_lens, PROMPT, seeds=[0, 1], edits=[reg], num_inference_steps=T, progress=False)
    assert np.array_equal(out.image.sel(branch="edited").values, plain.image.sel(branch="original").values)
    on = generate(tiny_lens, PROMPT, seeds=[0, 1], edits=[AttentionRegulation.published(corner(), pathology_words=["polyp"])],
                  num_inference_steps=T, progress=False)
    assert np.array_equal(on.image.sel(branch="original").values, plain.image.sel(branch="original").values)
    assert not np.allclose(on.image.sel(branch="edited").values, plain.image.sel(branch="original").values)


def energy_reference(lens, prompt, seed, omega, step_size, T, words):
    """Step-0 latent correction written by hand: attention recomputed from attn2's inputs with raw
    pre-hooks (no dit-lens processor, no nnsight), the gradient of L at the seed's noise, one step, then
    the unhooked pipeline from the corrected noise."""
    pipe = lens.pipeline
    gen = lens.generator(seed)
    size = pipe.transformer.config.sample_size
    noise = torch.randn((1, pipe.transformer.config.in_channels, size, size), generator=gen)  # as the pipeline draws it
    embeds, mask, _, _ = pipe.encode_prompt([prompt], do_classifier_free_guidance=False, device="cpu",
                                            clean_caption=False)
    maps = []

    def hook(attn, args, kwargs):
        hidden, context = args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        heads, width = attn.heads, attn.to_q.out_features
        q = attn.to_q(hidden).reshape(1, -1, heads, width // heads).permute(0, 2, 1, 3)
        k = attn.to_k(context).reshape(1, -1, heads, width // heads).permute(0, 2, 1, 3)
        bias = kwargs["attention_mask"][:, None]
        maps.append(torch.softmax(q @ k.transpose(-1, -2) * attn.scale + bias, dim=-1))

    handles = [b.attn2.register_forward_pre_hook(hook, with_kwargs=True) for b in lens.blocks]
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(T)
    z = noise.clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            pipe.transformer(z, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                             timestep=scheduler.timesteps[:1].long(),
                             added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
            keys = list(word_tokens(lens, prompt, words)[words[0]])
            a = torch.stack(maps).mean(dim=(0, 2))[0][:, keys]  # (queries, word tokens)
            energy = 1 - ((a * omega[:, None]).sum(0) / a.sum(0)).mean()
            (grad,) = torch.autograd.grad(energy, z)
    finally:
        for h in handles:
            h.remove()
    corrected = noise - step_size * grad / grad.pow(2).mean().sqrt()
    image = pipe(prompt, latents=corrected.detach(), num_inference_steps=T, guidance_scale=4.5, output_type="np",
                 **lens.pipeline_kwargs).images[0]
    return image, float(energy.detach())


def test_latent_correction_matches_a_hand_written_reference(tiny_lens):
    region = corner()
    guide = EnergyGuidance(["polyp"], region, step=0.5, window=(0, 0.3), blur=1.0)  # step 0 of 3 only
    out = generate(tiny_lens, PROMPT, seeds=[4], edits=[guide], num_inference_steps=T, progress=False)
    omega = Region.of(region).focus((4, 4), [4], 1.0)[0]
    image, energy = energy_reference(tiny_lens, PROMPT, 4, omega, 0.5, T, ["polyp"])
    edited = out.image.sel(branch="edited").values[0, 0]
    assert np.abs(edited - image).max() < 1e-4
    assert not np.allclose(edited, out.image.sel(branch="original").values[0, 0], atol=1e-3)
    assert out.energy.dims == ("prompt", "seed", "guided_step") and list(out.guided_step.values) == [0]
    assert abs(float(out.energy.values[0, 0, 0]) - energy) < 1e-5


def test_the_correction_pass_is_invisible_to_the_traced_run(tiny_lens):
    """Hooks of the same run see every step once, with the whole batch, while corrections run between steps."""
    seen = []
    guide = EnergyGuidance(["polyp"], corner(), step=0.2, window=(0, 1))
    from dit_lens.interventions.plan import Plan

    plan = Plan(tiny_lens, [guide], T, False)
    read = Hook("attn2", (0, 2), lambda step, layer, out: seen.append((step, layer, out.shape[0])))
    original = traced_generate.__globals__["traced_generate"]
    calls = []

    def spy(*args, **kwargs):
        kwargs["hooks"] = list(kwargs.get("hooks", [])) + [read]
        calls.append(1)
        return original(*args, **kwargs)

    import dit_lens.interventions.plan as plan_module
    plan_module.traced_generate = spy
    try:
        _, records = plan.run([PROMPT, PROMPT], [0, 0], [1], 4.5)
    finally:
        plan_module.traced_generate = original
    assert calls == [1]
    assert seen == [(t, layer, 4) for t in range(T) for layer in (0, 2)]  # 2 rows × 2 guidance halves
    energy = records["energy"][0, 0]
    assert energy.shape == (T,) and np.isfinite(energy).all()


def test_the_correction_lowers_the_energy_it_descends(tiny_lens):
    guide = EnergyGuidance(["polyp"], corner(), step=0.05, window=(0, 1))
    from dit_lens.interventions.guide import GuidePass
    from dit_lens.trace.runner import initial_noise

    pass_ = GuidePass(tiny_lens, None, [PROMPT] * 2, T, [guide])
    ctx = EditContext(0, -1, "", ("cond",), 2, original=None, seeds=(0, 1), prompts=(PROMPT,) * 2,
                      num_inference_steps=T, lens=tiny_lens)
    with pass_.exposed():
        z = initial_noise(tiny_lens, [0, 1])
        new, before = guide.correct(0, z, pass_.forward(0), ctx)
        after = guide.energy(pass_.forward(0)(new), ctx)
    assert (after < before).all()
    assert all(p.grad is None for p in tiny_lens.denoiser.parameters())  # no gradient lands on the weights


def test_confine_keeps_the_original_outside_the_region(tiny_lens):
    mask = corner()
    ctx = EditContext(0, -1, "", ("cond",), 1, original=None, seeds=(0,), num_inference_steps=T, lens=tiny_lens)
    orig, edited = torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)  # (pairs, C, h, w)
    new, _ = Confine(mask).apply_latents(0, orig, edited, ctx)
    assert new[0, :, :4, :4].eq(1).all() and new[0, :, 4:].eq(0).all() and new[0, :, :, 4:].eq(0).all()
    late, _ = Confine(mask, steps=(0.5, 1.0)).apply_latents(0, orig, edited, ctx)
    assert late.eq(1).all()  # outside its window it leaves the latents alone
    from dit_lens.interventions.plan import Plan

    src, tgt = "a normal colon", "a polyp in the colon"  # a re-prompted pair: the target kept inside only
    final, _ = Plan(tiny_lens, [Confine(mask)], T, False).run([src, tgt], [0, 0], [1], 4.5, output_type="latent")
    original, edited = final  # (C, h, w) latents at the end of the run
    assert np.array_equal(edited[:, 4:], original[:, 4:]) and np.array_equal(edited[:, :, 4:], original[:, :, 4:])
    assert not np.allclose(edited[:, :4, :4], original[:, :4, :4])


def test_region_mix_conditions_outside_and_amplifies_inside(tiny_lens):
    h = torch.ones(2, 16, 8)  # (rows = 2 halves × 1 pair, tokens, C)
    twin = torch.zeros(2, 16, 8)
    ctx = EditContext(0, 0, "attn2", ("uncond", "cond"), 1, original=lambda: twin, seeds=(0,),
                      num_inference_steps=T, lens=tiny_lens)
    inside = Region.of(corner()).tokens((4, 4), [0])[0].bool()
    new, _ = RegionMix(corner(), outside=0.0, contrast=2.0, window=(0, 0.5)).apply(h, ctx)
    assert new[:, inside].eq(3).all() and new[:, ~inside].eq(0).all()
    late = EditContext(**{**ctx.__dict__, "step": 2})  # past the contrast window
    new, _ = RegionMix(corner(), outside=0.0, contrast=2.0, window=(0, 0.5)).apply(h, late)
    assert new[:, inside].eq(1).all() and new[:, ~inside].eq(0).all()
    assert RegionMix(corner(), outside=1.0, contrast=0.0).is_identity
    with pytest.raises(ValueError, match="output sites"):
        RegionMix(corner(), site="attn1.weights")


def test_per_seed_regions_match_running_each_seed_alone(tiny_lens):
    masks = xr.DataArray(np.stack([corner(), ~corner()]), dims=("seed", "y", "x"), coords={"seed": [0, 1]})
    reg = AttentionRegulation(region=masks, pathology_words=["polyp"], energy_step=0.1, gate_self_attention=True)
    both = generate(tiny_lens, PROMPT, seeds=[0, 1], edits=[reg], num_inference_steps=T, progress=False)
    alone = generate(tiny_lens, PROMPT, seeds=[1], edits=[AttentionRegulation(region=~corner(), pathology_words=[
        "polyp"], energy_step=0.1, gate_self_attention=True)], num_inference_steps=T, progress=False)
    assert np.allclose(both.image.sel(seed=1).values, alone.image.sel(seed=1).values, atol=1e-4)


def test_regulation_values_round_trip_and_switch_modules_off(tmp_path):
    per_seed = xr.DataArray(np.stack([corner(), ~corner()]), dims=("seed", "y", "x"), coords={"seed": [0, 1]})
    values = [
        AttentionRegulation(region=per_seed, anatomy_mask=~corner(), anatomy_words=["colon"],
                            pathology_words=["polyp"], enhance=2.0, enhance_steps=(0, 0.3), keep_outside=0.5,
                            gate_self_attention=True, energy_step=0.05),
        Confine(corner(), steps=(0, 0.5)), RegionMix(corner(), contrast=1.0), EnergyGuidance(["polyp"], corner()),
    ]
    for k, value in enumerate(values):
        back = from_dict(json.loads(json.dumps(value.to_dict())))
        assert type(back) is type(value) and back.settings() == value.settings()
        assert Intervention.load(value.save(tmp_path / f"{k}.json")).settings() == value.settings()
    reg = values[0]
    assert [type(p).__name__ for p in reg.parts()] == ["GateSelfAttention", "RegionReweight", "RegionReweight",
                                                       "EnergyGuidance", "RegionMix", "Confine"]
    assert [type(p).__name__ for p in reg.without("self", "energy", "outside", "contrast", "keep").parts()] == [
        "RegionReweight", "RegionReweight"]
    assert reg.without("anatomy").parts()[1].words == ("polyp",)
    with pytest.raises(ValueError, match="unknown modules"):
        reg.without("everything")


@pytest.mark.parametrize("kwargs, match", [
    ({"pathology_words": ["polyp"]}, "act by region"),
    ({"pathology_words": ["polyp"], "condition_outside": False, "contrast": 0}, "need a region and pathology_words"),
    ({"region": corner()}, "need a region and pathology_words"),
    ({"region": corner(), "pathology_words": ["polyp"], "enhance": -1}, "must be >= 0"),
    ({"region": corner(), "pathology_words": ["polyp"], "energy_steps": (0.5, 0.2)}, "0 <= start < end <= 1"),
    ({"region": corner(), "pathology_words": ["polyp"], "anatomy_words": ["colon"]}, "gated by the anatomy_mask"),
    ({"enhance": 0, "condition_outside": False, "contrast": 0, "gate_self_attention": True},
     "needs an anatomy_mask or a region"),
    ({"enhance": 0, "energy_step": 0}, "act by region"),
    ({"region": corner(), "pathology_words": ["polyp"], "keep_outside": 2}, "fraction of the run"),
    ({"region": corner(), "pathology_words": ["polyp"], "gate_self_attention": "yes"}, "True or False"),
])
def test_bad_regulation_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionRegulation(**kwargs)


def test_a_steer_with_a_region_leaves_tokens_outside_untouched(tiny_lens):
    from test_steer import unit_vector
    from dit_lens.interventions.steer import Steer

    vec = unit_vector(T, 3, 16, seed=1)
    h = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))  # (rows = 2 halves × 1 pair, tokens, C)
    ctx = EditContext(0, 1, "attn2", ("uncond", "cond"), 1, original=None, seeds=(0,), lens=tiny_lens)
    inside = Region.of(corner()).tokens((4, 4), [0])[0].bool()
    new, gate = Steer(vec, alpha=3.0, region=corner()).apply(h, ctx)
    everywhere, full_gate = Steer(vec, alpha=3.0).apply(h, ctx)
    assert torch.equal(new[:, ~inside], h[:, ~inside]) and torch.equal(new[:, inside], everywhere[:, inside])
    assert gate[:, ~inside].eq(0).all() and torch.equal(gate[:, inside], full_gate[:, inside])
    steer = Steer(vec, alpha=3.0, region=corner(), name="x")
    back = from_dict(json.loads(json.dumps(steer.to_dict())))
    assert back.settings() == steer.settings() and "region" not in Steer(vec).settings()
    out = generate(tiny_lens, PROMPT, seeds=[0], steer=steer, num_inference_steps=T, record_gates=True, progress=False)
    assert float(out.gate.values[..., 2:, :].max()) == 0.0 and float(out.gate.values[..., :2, :2].max()) > 0
