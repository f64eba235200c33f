"""Attention weights as a site (dit_lens.trace.attention) against raw torch hooks on the plain pipeline."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from dit_lens.interventions.reweight import Reweight
from dit_lens.interventions.generate import generate
from dit_lens.trace.attention import WeightsProcessor
from dit_lens.trace.runner import Hook, traced_generate

T = 3


def raw_weights(lens, prompts, seeds, T, guidance=4.5, site="attn2"):
    """softmax(q·kᵀ·scale + mask) per head, recomputed from each attention module's own inputs with a
    forward pre-hook on the unhooked pipeline: {(step, layer): (rows, heads, queries, keys)} float64.

    Written out by hand: the mask is the additive bias the denoiser passes to ``attn2`` (one row per
    batch row, broadcast over heads and queries), and the heads are split from the projections."""
    pipe = lens.pipeline
    state = {"t": -1}
    weights = {}
    handles = [pipe.transformer.register_forward_pre_hook(lambda m, a: state.__setitem__("t", state["t"] + 1))]

    def make(layer):
        def hook(attn, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            context = hidden if context is None else context
            assert attn.norm_q is None and attn.norm_k is None and not attn.norm_cross
            heads = attn.heads
            q = attn.to_q(hidden).double()  # (rows, queries, C)
            k = attn.to_k(context).double()  # (rows, keys, C)
            rows, queries, width = q.shape
            q = q.reshape(rows, queries, heads, width // heads).permute(0, 2, 1, 3)
            k = k.reshape(rows, k.shape[1], heads, width // heads).permute(0, 2, 1, 3)
            scores = q @ k.transpose(-1, -2) / (width // heads) ** 0.5  # (rows, heads, queries, keys)
            mask = kwargs.get("attention_mask")
            if mask is not None:  # (rows, 1, keys) bias: 0 for tokens, -10000 for padding
                scores = scores + mask.double()[:, None]
            weights[(state["t"], layer)] = torch.softmax(scores, dim=-1)

        return hook

    for layer, block in enumerate(lens.blocks):
        handles.append(getattr(block, site).register_forward_pre_hook(make(layer), with_kwargs=True))
    try:
        pipe(list(prompts), generator=[lens.generator(s) for s in seeds], num_inference_steps=T,
             guidance_scale=guidance, output_type="latent", **lens.pipeline_kwargs)
    finally:
        for h in handles:
            h.remove()
    return weights


@pytest.mark.parametrize("site", ["attn2", "attn1"])
def test_weights_site_equals_an_independent_computation(tiny_lens, site):
    prompts, seeds = ["a polyp", "an endoscopic image of normal cecum"], [0, 3]
    seen = {}

    def read(step, layer, weights):
        seen[(step, layer)] = weights.detach().clone()

    traced_generate(tiny_lens, prompts, seeds, num_inference_steps=T, guidance_scale=4.5,
                    hooks=[Hook(f"{site}.weights", (0, 1, 2), read)])
    reference = raw_weights(tiny_lens, prompts, seeds, T, site=site)
    assert sorted(seen) == sorted(reference) == [(t, l) for t in range(T) for l in range(3)]
    error = max(float((seen[key].double() - reference[key]).abs().max()) for key in reference)
    print(f"{site}.weights: max abs error against the raw-hook recomputation {error:.2e}")
    assert error < 1e-5
    keys = 120 if site == "attn2" else 16
    assert seen[(0, 0)].shape == (4, 2, 16, keys)  # (2 runs × 2 halves, heads, image tokens, keys)
    np.testing.assert_allclose(seen[(1, 2)].sum(-1).numpy(), 1.0, atol=1e-5)
    if site == "attn2":  # padding is masked: "a polyp" is 7 bytes + EOS, so keys 8.. get no weight
        cond = seen[(1, 1)][2]  # conditional row of run 0
        assert float(cond[..., 8:].max()) < 1e-30 and float(cond[..., :8].min()) > 0


def test_replacing_weights_with_themselves_is_bit_identical(tiny_lens):
    plain = tiny_lens.pipeline(["a polyp", "normal"], generator=[tiny_lens.generator(s) for s in (1, 2)],
                               num_inference_steps=T, guidance_scale=4.5, output_type="np",
                               **tiny_lens.pipeline_kwargs).images
    visits = []

    def same(step, layer, weights):
        visits.append((step, layer))
        return weights.clone()

    hooks = [Hook("attn2.weights", (0, 1, 2), same), Hook("attn1.weights", (0, 2), same)]
    out = traced_generate(tiny_lens, ["a polyp", "normal"], [1, 2], num_inference_steps=T, guidance_scale=4.5,
                          hooks=hooks, output_type="np")
    assert len(visits) == T * 5
    np.testing.assert_array_equal(out.images, plain)


def reweighted_plain_call(lens, prompts, seeds, T, tokens, scale, layers, rows):
    """The plain batched call with raw forward hooks that recompute attn2's output at `layers`, on batch
    rows `rows` only, from the reweighted softmax weights (scale the `tokens` keys, renormalize)."""
    def make():
        def hook(attn, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            context, mask = kwargs["encoder_hidden_states"], kwargs["attention_mask"]
            heads = attn.heads
            q, k, v = attn.to_q(hidden), attn.to_k(context), attn.to_v(context)
            n, width = q.shape[0], q.shape[-1]
            split = lambda x: x.reshape(n, x.shape[1], heads, width // heads).permute(0, 2, 1, 3)  # noqa: E731
            q, k, v = split(q), split(k), split(v)
            w = torch.softmax(q @ k.transpose(-1, -2) * attn.scale + mask[:, None], dim=-1)  # (rows, heads, q, k)
            w[..., list(tokens)] *= scale
            w = w / w.sum(-1, keepdim=True)
            mixed = (w @ v).permute(0, 2, 1, 3).reshape(n, -1, width)
            new = attn.to_out[0](mixed)
            out = output.clone()
            out[rows] = new[rows]
            return out

        return hook

    handles = [lens.blocks[layer].attn2.register_forward_hook(make(), with_kwargs=True) for layer in layers]
    try:
        return lens.pipeline(list(prompts), generator=[lens.generator(s) for s in seeds], num_inference_steps=T,
                             guidance_scale=4.5, output_type="np", **lens.pipeline_kwargs).images
    finally:
        for h in handles:
            h.remove()


def test_reweight_matches_a_raw_hook_reference(tiny_lens):
    polyp = list(range(2, 7))  # "polyp" in "a polyp": bytes 2..6
    edit = Reweight(tokens=polyp, scale=2.0, layers=(1, 2))
    out = generate(tiny_lens, ["a polyp"], seeds=[0, 4], edits=[edit], num_inference_steps=T, progress=False)
    for seed in (0, 4):
        # generate batches a pair as rows [original, edited]; guidance doubles them: uncond 0, 1; cond 2, 3
        plain = tiny_lens.pipeline(["a polyp"] * 2, generator=[tiny_lens.generator(seed)] * 2, num_inference_steps=T,
                                   guidance_scale=4.5, output_type="np", **tiny_lens.pipeline_kwargs).images
        reference = reweighted_plain_call(tiny_lens, ["a polyp"] * 2, [seed] * 2, T, polyp, 2.0, (1, 2), rows=[1, 3])
        got = out["image"].sel(prompt="a polyp", seed=seed)
        np.testing.assert_array_equal(got.sel(branch="original").values, plain[0])  # untouched twin
        np.testing.assert_allclose(got.sel(branch="edited").values, reference[1], atol=1e-5)
        np.testing.assert_array_equal(reference[0], plain[0])
        assert np.abs(reference[1] - plain[0]).max() > 1e-3  # the edit changed the image


def test_processor_is_installed_only_where_needed_and_removed_on_error(tiny_lens):
    def kinds():
        return [(type(b.attn1.processor).__name__, type(b.attn2.processor).__name__) for b in tiny_lens.blocks]

    assert kinds() == [("AttnProcessor2_0", "AttnProcessor2_0")] * 3
    before = tiny_lens.plain("a polyp", seed=0, num_inference_steps=T)
    during = []

    def fail(step, layer, weights):
        during.append(kinds())
        if step == 1:
            raise RuntimeError("visit failed")

    with pytest.raises(RuntimeError, match="visit failed"):
        traced_generate(tiny_lens, ["a polyp"], [0], num_inference_steps=T, guidance_scale=4.5,
                        hooks=[Hook("attn2.weights", (1,), fail)])
    assert during[0] == [("AttnProcessor2_0", "AttnProcessor2_0"), ("AttnProcessor2_0", "WeightsProcessor"),
                         ("AttnProcessor2_0", "AttnProcessor2_0")]
    assert kinds() == [("AttnProcessor2_0", "AttnProcessor2_0")] * 3
    assert all(isinstance(b.attn2.processor, AttnProcessor2_0) for b in tiny_lens.blocks)
    assert not any(isinstance(m, WeightsProcessor) for m in tiny_lens.denoiser.modules())
    np.testing.assert_array_equal(tiny_lens.plain("a polyp", seed=0, num_inference_steps=T), before)
