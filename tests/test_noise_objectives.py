"""attention_concentration: its score against attention_maps of the plain run, the early stop of the
differentiable run, the optimisation, the processors put back, and refusals."""

import math

import numpy as np
import pytest
import torch

from dit_lens import attention_maps, generate
from dit_lens.optimize import attention_concentration, optimize_noise

T, PROMPT = 8, "a red polyp"


def optimise(lens, objective, seeds=(0, 1), **settings):
    settings = {"iterations": 3, "lr": 0.2, "max_angle": 0.6, "num_inference_steps": T, "progress": False, **settings}
    return optimize_noise(lens, PROMPT, seeds=list(seeds), objective=objective, **settings)


def reference(lens, words, steps, region=None, seeds=(0, 1), guidance_scale=4.5):
    """The objective by hand, from the maps of the plain runs: per word, the maps averaged over the read
    steps and every layer, normalised over the image, then 1 − H / log Q (or the mass inside the region)."""
    maps = attention_maps(lens, [PROMPT], seeds=list(seeds), words=list(words), num_inference_steps=T,
                          guidance_scale=guidance_scale, steps=steps, progress=False)
    a = maps.attention.isel(prompt=0).mean(["step", "layer"]).stack(q=["row", "col"]).transpose("seed", "word", "q")
    a = a.values.astype(np.float64)
    p = a / a.sum(-1, keepdims=True)  # (seeds, words, Q)
    if region is None:
        per_word = 1 - (-(p * np.log(p)).sum(-1)) / math.log(p.shape[-1])
    else:
        per_word = (p * region.reshape(1, 1, -1)).sum(-1)  # a token-grid region with no blur: Ω is the mask
    return per_word.mean(-1)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_the_score_is_the_concentration_of_the_plain_runs_maps(tiny_lens, guidance_scale):
    objective = attention_concentration(["polyp", "red"], window=(0.0, 0.3))  # steps 0, 1, 2 of 8
    z = optimise(tiny_lens, objective, iterations=0, guidance_scale=guidance_scale)
    want = reference(tiny_lens, ["polyp", "red"], [0, 1, 2], guidance_scale=guidance_scale)
    np.testing.assert_allclose(z.before, want, rtol=1e-3, atol=1e-8)  # the maps are float32
    assert all(0 < v < 1 for v in z.before)


def test_with_a_region_the_score_is_the_share_of_attention_inside(tiny_lens):
    rows, cols = tiny_lens.token_grid
    region = np.zeros((rows, cols), np.float32)
    region[: rows // 2] = 1  # the top half of the token grid
    objective = attention_concentration("polyp", region=region, window=(0.25, 0.5), blur=0.0)  # steps 2, 3
    z = optimise(tiny_lens, objective, iterations=0)
    np.testing.assert_allclose(z.before, reference(tiny_lens, ["polyp"], [2, 3], region), rtol=1e-4, atol=1e-7)


def count_calls(lens):
    calls = []
    handle = lens.denoiser.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_the_differentiable_run_stops_after_the_last_read_step(tiny_lens, monkeypatch):
    calls, handle = count_calls(tiny_lens)
    decodes = []
    vae = tiny_lens.pipeline.vae
    original_decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda *a, **k: decodes.append(1) or original_decode(*a, **k))
    try:
        optimise(tiny_lens, attention_concentration("polyp", window=(0.0, 0.25)), seeds=(0,), iterations=0)
        assert len(calls) == 2 and not decodes  # steps 0 and 1 of 8, no decode
        calls.clear()
        optimise(tiny_lens, attention_concentration("polyp", window=(0.5, 0.75)), seeds=(0,), iterations=0)
        assert len(calls) == 6 and not decodes  # steps 0 … 5: the run up to step 5
    finally:
        handle.remove()


def test_optimising_concentration_raises_it_on_the_sphere(tiny_lens):
    objective = attention_concentration("polyp", window=(0.0, 0.25))
    z = optimise(tiny_lens, objective)
    assert all(after > before for before, after in zip(z.before, z.after)), (z.before, z.after)
    np.testing.assert_allclose(z.norm_ratio, 1.0, atol=1e-6)
    assert all(c < 1 for c in z.cosine)  # it moved
    assert optimise(tiny_lens, objective).noise.tobytes() == z.noise.tobytes()  # deterministic
    out = generate(tiny_lens, PROMPT, seeds=[0, 1], edits=[z], num_inference_steps=T, progress=False)
    image = out["image"].sel(prompt=PROMPT)
    assert not np.array_equal(image.sel(branch="edited").values, image.sel(branch="original").values)


def test_the_attention_processors_are_put_back(tiny_lens):
    before = {k: type(v).__name__ for k, v in tiny_lens.denoiser.attn_processors.items()}
    optimise(tiny_lens, attention_concentration("polyp"), iterations=1)
    with pytest.raises(ValueError, match="not a word of the prompt|not in"):
        optimise(tiny_lens, attention_concentration("ulcer"), iterations=1)
    assert {k: type(v).__name__ for k, v in tiny_lens.denoiser.attn_processors.items()} == before


def test_weights_are_left_as_they_were(tiny_lens):
    flags = [p.requires_grad for p in tiny_lens.denoiser.parameters()]
    state = {k: v.clone() for k, v in tiny_lens.denoiser.state_dict().items()}
    optimise(tiny_lens, attention_concentration("polyp"), iterations=2)
    assert [p.requires_grad for p in tiny_lens.denoiser.parameters()] == flags
    assert all(torch.equal(v, tiny_lens.denoiser.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in tiny_lens.denoiser.parameters())


@pytest.mark.parametrize("make, match", [
    (lambda: attention_concentration([]), "needs words"),
    (lambda: attention_concentration(["polyp", ""]), "list of words"),
    (lambda: attention_concentration("polyp", window=(0.5, 0.2)), "0 <= start < end <= 1"),
    (lambda: attention_concentration("polyp", layers=[-1]), "layers"),
    (lambda: attention_concentration("polyp", blur=-1), "blur"),
    (lambda: attention_concentration("polyp", region=np.zeros((4, 4))), "empty"),
])
def test_bad_objectives_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_objectives_that_do_not_fit_the_model_are_refused(tiny_lens):
    with pytest.raises(ValueError, match=r"layers \[5\] are not blocks of this model"):
        optimise(tiny_lens, attention_concentration("polyp", layers=[5]))
    with pytest.raises(ValueError, match="holds no step of a 8-step run"):
        optimise(tiny_lens, attention_concentration("polyp", window=(0.9, 0.95)))
    with pytest.raises(ValueError, match="region is 3×3"):
        optimise(tiny_lens, attention_concentration("polyp", region=np.ones((3, 3))))
