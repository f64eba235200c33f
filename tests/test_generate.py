
import numpy as np
import pytest

from dit_lens.interventions.generate import generate, reprompt
from dit_lens.interventions.steer import Steer
from reference import blended_plain_call, steered_plain_call
from test_steer import unit_vector

T = 4


@pytest.fixture
def steer():
    # layer 1 gates are non-zero on this tiny model for vector seed 0
    return Steer(unit_vector(steps=T, layers=3, channels=16, seed=0), alpha=3.0, layers=[1, 2])


def test_unsteered_branch_is_the_plain_call(tiny_lens, steer):
    out = generate(tiny_lens, ["a polyp", "normal cecum"], seeds=[0, 7], steer=steer,
                   num_inference_steps=T, progress=False)
    assert list(out["branch"].values) == ["original", "edited"]
    for prompt in ("a polyp", "normal cecum"):
        for seed in (0, 7):
            plain = tiny_lens.plain(prompt, seed=seed, num_inference_steps=T)
            got = out["image"].sel(prompt=prompt, seed=seed, branch="original").values
            np.testing.assert_allclose(got, plain, atol=1e-5)


def test_steered_branch_and_gates_match_a_raw_hook_reference(tiny_lens, steer):
    out = generate(tiny_lens, ["a polyp"], seeds=[3, 4, 5], steer=steer, num_inference_steps=T,
                   record_gates=True, batch_size=2, progress=False)
    for seed in (3, 4, 5):
        image, gates = steered_plain_call(
            tiny_lens, "a polyp", seed, T, 4.5, [(steer.vector.values, 3.0, [1, 2], False)]
        )
        got = out["image"].sel(prompt="a polyp", seed=seed, branch="edited").values
        np.testing.assert_allclose(got, image, atol=1e-4)
        assert np.abs(got - out["image"].sel(prompt="a polyp", seed=seed, branch="original").values).max() > 1e-3
        for (_, t, layer), g in gates.items():
            np.testing.assert_allclose(
                out["gate"].sel(prompt="a polyp", seed=seed, step=t, layer=layer).values.reshape(-1),
                g.numpy(), rtol=1e-4, atol=1e-6,
            )
    assert out["gate"].dims == ("prompt", "seed", "step", "layer", "row", "col")
    assert out["gate"].shape == (1, 3, T, 2, 4, 4)
    assert float(out["gate"].sel(layer=1).max()) > 0


def test_alpha_zero_is_bit_identical(tiny_lens, steer):
    zero = Steer(steer.vector, alpha=0.0, renormalize=True)
    out = generate(tiny_lens, ["a polyp", "x"], seeds=[0, 1, 2], steer=zero, num_inference_steps=T, progress=False)
    np.testing.assert_array_equal(out["image"].sel(branch="edited").values, out["image"].sel(branch="original").values)


def test_renormalized_and_composed_steers_match_reference(tiny_lens):
    a = Steer(unit_vector(T, 3, 16, seed=0), alpha=2.0, layers=[1], renormalize=True, name="a")
    b = Steer(unit_vector(T, 3, 16, seed=5), alpha=1.5, layers=[1, 2], name="b")
    out = generate(tiny_lens, "a polyp", seeds=[9], steer=[a, b], num_inference_steps=T,
                   record_gates=True, progress=False)
    image, gates = steered_plain_call(
        tiny_lens, "a polyp", 9, T, 4.5,
        [(a.vector.values, 2.0, [1], True), (b.vector.values, 1.5, [1, 2], False)],
    )
    np.testing.assert_allclose(out["image"].sel(branch="edited").values[0, 0], image, atol=1e-4)
    assert list(out["steer"].values) == ["a", "b"]
    np.testing.assert_allclose(
        out["gate"].sel(steer="b", step=2, layer=2).values.reshape(-1), gates[(1, 2, 2)].numpy(), rtol=1e-4, atol=1e-6
    )
    # steer "a" does not touch layer 2: its gate there is recorded as zero
    assert float(np.abs(out["gate"].sel(steer="a", layer=2)).max()) == 0.0


def test_reusing_the_last_step_of_a_short_vector(tiny_lens):
    short = Steer(unit_vector(2, 3, 16, seed=0), alpha=3.0, layers=[1], reuse_last_step=True)
    out = generate(tiny_lens, "a polyp", seeds=[1], steer=short, num_inference_steps=T, progress=False)
    image, _ = steered_plain_call(tiny_lens, "a polyp", 1, T, 4.5, [(short.vector.values, 3.0, [1], False)])
    np.testing.assert_allclose(out["image"].sel(branch="edited").values[0, 0], image, atol=1e-4)


def test_results_carry_provenance(tiny_lens, steer):
    out = generate(tiny_lens, "a polyp", seeds=[0], steer=steer, num_inference_steps=T, progress=False)
    assert out.attrs["model_fingerprint"] == tiny_lens.fingerprint
    assert out.attrs["num_inference_steps"] == T
    assert out.attrs["steers"][0]["alpha"] == 3.0
    assert out.attrs["seeds"] == [0]


def test_bad_arguments_are_clear_errors(tiny_lens, steer):
    with pytest.raises(ValueError, match="prompts"):
        generate(tiny_lens, [], seeds=[0], progress=False)
    with pytest.raises(ValueError, match="seeds"):
        generate(tiny_lens, "x", seeds=[], progress=False)
    with pytest.raises(ValueError, match="num_inference_steps"):
        generate(tiny_lens, "x", seeds=[0], num_inference_steps=0, progress=False)
    with pytest.raises(ValueError, match="record_gates"):
        generate(tiny_lens, "x", seeds=[0], record_gates=True, progress=False)
    with pytest.raises(ValueError, match="reuse_last_step"):
        generate(tiny_lens, "x", seeds=[0], steer=steer, num_inference_steps=T + 1, progress=False)
    with pytest.raises(TypeError, match="Steer values"):
        generate(tiny_lens, "x", seeds=[0], steer="polyp", progress=False)


def test_blend_matches_a_two_call_reference(tiny_lens, steer):
    # on this tiny random model steering changes every position much alike: a high τ blends
    out = generate(tiny_lens, ["a polyp"], seeds=[3, 4], steer=steer, num_inference_steps=T, blend=0.9,
                   batch_size=2, progress=False)
    unblended = generate(tiny_lens, ["a polyp"], seeds=[3, 4], steer=steer, num_inference_steps=T, progress=False)
    for seed in (3, 4):
        image = blended_plain_call(tiny_lens, "a polyp", seed, T, 4.5, (steer.vector.values, 3.0, [1, 2], False), 0.9)
        got = out["image"].sel(prompt="a polyp", seed=seed, branch="edited").values
        np.testing.assert_allclose(got, image, atol=1e-4)
    # blending pulls the steered image toward the unsteered one, which it leaves alone
    diff = lambda o: np.abs(o["image"].sel(branch="edited").values - o["image"].sel(branch="original").values).mean()  # noqa: E731
    assert 0 < diff(out) < diff(unblended)
    np.testing.assert_array_equal(out["image"].sel(branch="original").values,
                                  unblended["image"].sel(branch="original").values)
    mask = out["blend_mask"]
    assert mask.dims == ("prompt", "seed", "blend_step", "latent_y", "latent_x") and mask.sizes["blend_step"] == T
    assert 0 <= float(mask.min()) < 0.9 and float(mask.max()) == 1.0
    assert out.attrs["blend"] == 0.9


def test_blend_with_alpha_zero_is_bit_identical(tiny_lens, steer):
    zero = Steer(steer.vector, alpha=0.0)
    out = generate(tiny_lens, ["a polyp"], seeds=[0, 1], steer=zero, num_inference_steps=T, blend=0.3, progress=False)
    np.testing.assert_array_equal(out["image"].sel(branch="edited").values, out["image"].sel(branch="original").values)
    assert float(out["blend_mask"].max()) == 0.0


def test_bad_blend_is_a_clear_error(tiny_lens, steer):
    for bad in (-0.1, 1.0, float("nan"), True):
        with pytest.raises(ValueError, match=r"blend must be"):
            generate(tiny_lens, "x", seeds=[0], steer=steer, num_inference_steps=T, blend=bad, progress=False)
    with pytest.raises(ValueError, match="blend needs a steer"):
        generate(tiny_lens, "x", seeds=[0], num_inference_steps=T, blend=0.3, progress=False)


def test_reprompt_pairs_are_the_two_plain_calls_and_blend_like_a_steered_branch(tiny_lens):
    out = reprompt(tiny_lens, "a polyp", "normal cecum", seeds=[0, 7, 8], num_inference_steps=T, batch_size=2,
                   progress=False)
    assert list(out["branch"].values) == ["original", "edited"] and list(out["prompt"].values) == ["a polyp"]
    for seed in (0, 7, 8):
        for branch, prompt in (("original", "a polyp"), ("edited", "normal cecum")):
            np.testing.assert_allclose(out["image"].sel(seed=seed, branch=branch).values[0],
                                       tiny_lens.plain(prompt, seed=seed, num_inference_steps=T), atol=1e-5)
    blended = reprompt(tiny_lens, "a polyp", "normal cecum", seeds=[0, 7, 8], num_inference_steps=T, blend=0.9,
                       progress=False)
    gap = lambda o: np.abs(o["image"].sel(branch="edited").values - o["image"].sel(branch="original").values).mean()  # noqa: E731
    assert 0 < gap(blended) < gap(out)
    assert blended.attrs["target_prompt"] == "normal cecum" and blended.attrs["blend"] == 0.9
    with pytest.raises(ValueError, match="duplicates"):
        reprompt(tiny_lens, "a polyp", "a polyp", seeds=[0], num_inference_steps=T, progress=False)


def test_timesteps_are_labelled_alike_by_generate_capture_and_attention_maps(tiny_lens, steer, tmp_path):
    from dit_lens import attention_maps, capture

    pairs = generate(tiny_lens, ["a polyp"], seeds=[0], steer=steer, num_inference_steps=4, record_gates=True,
                     progress=False)
    captured = capture(tiny_lens, ["a polyp"], seeds=[0], num_inference_steps=4, store=tmp_path / "c.zarr")
    maps = attention_maps(tiny_lens, ["a polyp"], seeds=[0], words=["polyp"], num_inference_steps=4)
    for ds in (captured, maps):
        assert ds.timestep.dtype == pairs.timestep.dtype == np.float64
        np.testing.assert_array_equal(ds.timestep.values[: pairs.sizes["step"]], pairs.timestep.values)
