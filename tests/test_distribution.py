"""The Fréchet distance: the closed form for Gaussians, its behaviour on samples, its interval, and the
oracle's features it is measured on."""

import numpy as np
import pytest

from dit_lens.metrics.distribution import frechet_difference, frechet_distance, frechet_estimate, frechet_from_moments


def test_the_distance_of_diagonal_gaussians_is_the_closed_form():
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    by_hand = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)  # 5 + 4 + 1 + 0
    assert frechet_from_moments(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(by_hand) == 10.0


def test_samples_approach_the_closed_form_and_a_set_is_at_zero_from_itself():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (20000, 3))
    b = rng.normal(0.0, 2.0, (20000, 3)) + [3.0, 0.0, 0.0]
    assert frechet_distance(a, b) == pytest.approx(9.0 + 3 * 1.0, rel=0.03)  # shift² + Σ(σ_a − σ_b)²
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a[:500], b[:500]) == pytest.approx(frechet_distance(b[:500], a[:500]), rel=1e-6)


def test_the_interval_covers_the_value_and_shrinks_with_more_samples():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(400, 4))
    small, large = rng.normal(size=(50, 4)) + 0.5, rng.normal(size=(400, 4)) + 0.5
    e_small, e_large = frechet_estimate(small, ref, resamples=100), frechet_estimate(large, ref, resamples=100)
    assert e_small.low <= e_small.value <= e_small.high and e_small.n == 50
    assert e_large.high - e_large.low < e_small.high - e_small.low
    # two samples of one distribution: the resampling inflation is larger than the distance itself
    twin = frechet_estimate(rng.normal(size=(128, 32)), rng.normal(size=(512, 32)), resamples=100)
    assert twin.low <= twin.value <= twin.high


def test_the_difference_finds_the_closer_set_and_straddles_zero_for_twins():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(300, 4))
    near, far = rng.normal(size=(300, 4)) + 0.2, rng.normal(size=(300, 4)) + 0.8
    closer = frechet_difference(near, far, ref, resamples=100)
    assert closer.value < 0 and closer.high < 0  # beyond its interval
    twins = frechet_difference(rng.normal(size=(300, 4)) + 0.5, rng.normal(size=(300, 4)) + 0.5, ref, resamples=100)
    assert twins.low < 0 < twins.high


def test_bad_feature_sets_are_refused():
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN or inf"):
        frechet_distance(np.full((3, 2), np.nan), np.zeros((3, 2)))


def test_the_oracle_features_are_what_its_head_reads():
    import torch

    from dit_lens.world import load_oracle, render

    oracle = load_oracle()
    images = render(["polyps", "normal cecum"], [0, 1]).images
    features = oracle.features(images)
    assert features.shape == (2, oracle.net.head.in_features)
    logits = oracle.net.head(torch.from_numpy(features))
    np.testing.assert_allclose(torch.softmax(logits, 1).detach().numpy(), oracle(images), atol=1e-6)
