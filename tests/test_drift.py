"""LatentDrift: latent drifting at inference, checked against a plain diffusers call that drifts by hand."""

import math

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from dit_lens import LatentDrift, generate, intervention_from_dict
from dit_lens.interventions.base import Intervention

T, GUIDANCE = 3, 4.5


def images(lens, delta, seeds=(0,), **settings):
    out = generate(lens, "a polyp", seeds=list(seeds), edits=[LatentDrift(delta, **settings)], num_inference_steps=T,
                   guidance_scale=GUIDANCE, progress=False)
    return out["image"].sel(prompt="a polyp")  # (seed, branch, y, x, rgb)


def drifted_plain_call(lens, seed, delta, steps=range(T), initial=True):
    """The unhooked pipeline from the seed's own noise (+ δ), with δ added in place after the chosen steps."""
    pipe = lens.pipeline
    shape = (1, pipe.transformer.config.in_channels, lens.pipeline_kwargs["height"] // pipe.vae_scale_factor,
             lens.pipeline_kwargs["width"] // pipe.vae_scale_factor)
    noise = randn_tensor(shape, generator=lens.generator(seed), device=lens.device, dtype=pipe.text_encoder.dtype)
    shift = torch.as_tensor(delta, dtype=noise.dtype).reshape(1, -1, 1, 1)  # (1, C or 1, 1, 1)
    latents = noise + shift if initial else noise  # (1, C, h, w)

    def callback(step, _t, lat):
        if step in steps:
            lat.add_(shift)

    return pipe(["a polyp"], generator=lens.generator(seed), num_inference_steps=T, guidance_scale=GUIDANCE,
                latents=latents, output_type="np", callback=callback, **lens.pipeline_kwargs).images[0]


@pytest.mark.parametrize("delta", [0.0, np.float32(0.0), (0.0, 0.0, 0.0, 0.0)])
def test_zero_drift_is_bit_identical(tiny_lens, delta):
    assert LatentDrift(delta).is_identity
    out = images(tiny_lens, delta, seeds=(0, 3))
    assert np.array_equal(out.sel(branch="edited").values, out.sel(branch="original").values)


@pytest.mark.parametrize("delta", [0.3, -0.2, (0.3, 0.0, -0.1, 0.2)])
def test_drift_matches_a_hand_drifted_plain_call(tiny_lens, delta):
    out = images(tiny_lens, delta, seeds=(1,), steps=(0.0, 1.0))  # after every step: the seed's reverse process
    reference = drifted_plain_call(tiny_lens, 1, delta)
    edited = out.sel(seed=1, branch="edited").values
    assert not np.allclose(edited, out.sel(seed=1, branch="original").values, atol=1e-3)  # it does drift
    np.testing.assert_allclose(edited, reference, atol=1e-5, rtol=0)


def test_window_and_initial_choose_where_it_drifts(tiny_lens):
    late = images(tiny_lens, 0.3, seeds=(2,), steps=(0.5, 1.0), initial=False)  # steps 2/3 only
    reference = drifted_plain_call(tiny_lens, 2, 0.3, steps=[2], initial=False)
    np.testing.assert_allclose(late.sel(seed=2, branch="edited").values, reference, atol=1e-5, rtol=0)
    start_only = images(tiny_lens, 0.3, seeds=(2,), steps=None)  # z_T only: a drift-trained model's sampling
    reference = drifted_plain_call(tiny_lens, 2, 0.3, steps=[])
    np.testing.assert_allclose(start_only.sel(seed=2, branch="edited").values, reference, atol=1e-5, rtol=0)
    assert LatentDrift.from_dict(LatentDrift(0.3, steps=None).to_dict()) == LatentDrift(0.3, steps=None)


def test_the_default_drifts_z_t_only_as_a_drift_trained_model_samples(tiny_lens):
    assert LatentDrift(0.3) == LatentDrift(0.3, steps=None)
    out = images(tiny_lens, 0.3, seeds=(2,))
    reference = drifted_plain_call(tiny_lens, 2, 0.3, steps=[])
    np.testing.assert_allclose(out.sel(seed=2, branch="edited").values, reference, atol=1e-5, rtol=0)


def test_the_original_branch_is_unchanged_by_any_drift(tiny_lens):
    plain = images(tiny_lens, 0.0, seeds=(0, 3)).sel(branch="original").values
    for delta in (0.5, -1.0, (0.1, 0.2, 0.3, 0.4)):
        assert np.array_equal(images(tiny_lens, delta, seeds=(0, 3)).sel(branch="original").values, plain)


def test_round_trip_repr_and_settings(tmp_path):
    drift = LatentDrift(np.float64(0.25), steps=[0, 0.5], initial=False)
    assert repr(drift) == "LatentDrift(delta=0.25, steps=(0.0, 0.5), initial=False)"
    assert type(drift.delta) is float
    data = drift.to_dict()
    assert data == {"type": "LatentDrift", "delta": 0.25, "steps": [0.0, 0.5], "initial": False}
    assert intervention_from_dict(data) == drift
    per_channel = LatentDrift(np.array([0.1, 0.0, 0.0, -0.1]))
    assert per_channel.delta == (0.1, 0.0, 0.0, -0.1)
    assert intervention_from_dict(per_channel.to_dict()) == per_channel
    assert Intervention.load(per_channel.save(tmp_path / "drift.json")) == per_channel
    assert LatentDrift(0.1, initial=False).changes_initial is False and LatentDrift(0.0).changes_initial is False


@pytest.mark.parametrize("delta, words", [
    (math.nan, "finite"), (math.inf, "finite"), (np.float32("-inf"), "finite"), ("0.1", "number"),
    (True, "number"), (None, "number"), ((), "non-empty"), ((0.1, math.nan), "finite"), ((0.1, "a"), "finite"),
])
def test_bad_delta_is_refused_with_a_fix(delta, words):
    with pytest.raises(ValueError, match=words) as err:
        LatentDrift(delta)
    assert "delta=0.1" in str(err.value)


def test_bad_settings_are_refused(tiny_lens):
    with pytest.raises(ValueError, match="LatentDrift.steps"):
        LatentDrift(0.1, steps=(0.6, 0.2))
    with pytest.raises(ValueError, match="LatentDrift.initial"):
        LatentDrift(0.1, initial="yes")
    with pytest.raises(ValueError, match="3 values, but the latents have 4 channels"):
        generate(tiny_lens, "a polyp", seeds=[0], edits=[LatentDrift((0.1, 0.2, 0.3))], num_inference_steps=T,
                 progress=False)
    with pytest.raises(ValueError, match="3 values, but the latents have 4 channels"):
        LatentDrift((0.1, 0.2, 0.3), steps=(0.0, 1.0)).apply_latents(0, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2))
