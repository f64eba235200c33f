import numpy as np
import pytest
import torch

from dit_lens.interventions.blend import blend_latents, check_blend
from reference import blend_reference


def test_blend_matches_the_numpy_reference_and_keeps_the_strong_edit():
    gen = torch.Generator().manual_seed(0)
    unsteered = torch.randn(3, 4, 8, 8, generator=gen)
    steered = unsteered + 0.05 * torch.randn(3, 4, 8, 8, generator=gen)
    steered[:, :, 1:4, 2:5] += 2.0  # the edit
    new, mask = blend_latents(unsteered, steered, 0.3)
    for i in range(3):
        np.testing.assert_allclose(new[i].numpy(), blend_reference(unsteered[i].numpy(), steered[i].numpy(), 0.3),
                                   atol=1e-6)
    assert mask.shape == (3, 8, 8) and 0 <= float(mask.min()) and float(mask.max()) == 1.0
    assert torch.equal(new[:, :, 2, 3], steered[:, :, 2, 3])  # the edit's core is kept bit-for-bit
    far = (slice(None), slice(None), 7, 7)
    assert (new[far] - unsteered[far]).abs().max() < (steered[far] - unsteered[far]).abs().max()


def test_identical_branches_are_returned_bit_for_bit():
    u = torch.randn(2, 4, 6, 6)
    new, mask = blend_latents(u, u.clone(), 0.2)
    assert torch.equal(new, u) and float(mask.max()) == 0.0


def test_a_larger_threshold_keeps_more_of_the_unsteered_latent():
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(1, 4, 8, 8, generator=gen)
    s = u + torch.rand(1, 4, 8, 8, generator=gen)
    gaps = [float((blend_latents(u, s, tau)[0] - u).abs().mean()) for tau in (0.1, 0.3, 0.6, 0.9)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < gaps[0]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, float("inf"), "0.3", None])
def test_check_blend_refuses_what_is_not_a_threshold(bad):
    with pytest.raises(ValueError, match=r"blend must be"):
        check_blend(bad)
    assert check_blend(0) == 0.0 and check_blend(0.25) == 0.25 and check_blend(np.float32(0.5)) == 0.5
