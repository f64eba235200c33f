"""Distances between two sets of images, through features of a network (the Fréchet distance).

The Fréchet distance between Gaussians fitted to two feature sets,

    d² = ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}),

is what FID computes on Inception features. dit-lens computes it on whatever features it is given
(the embedded world's oracle's penultimate features, `dit_lens.world.judges.Oracle.features`), so it
must be named by its features, never called FID. Its value depends on the set sizes (it is biased
upwards for small sets): compare distances measured with the same sizes only.

Examples:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(500, 4)), rng.normal(size=(500, 4)) + [2.0, 0, 0, 0]
    >>> round(frechet_distance(a, a), 6), 3.5 < frechet_distance(a, b) < 4.5
    (0.0, True)
"""

from __future__ import annotations

import numpy as np

from .estimates import Estimate

__all__ = ["frechet_difference", "frechet_distance", "frechet_from_moments", "frechet_estimate"]


def frechet_from_moments(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """d² between N(mu_a, cov_a) and N(mu_b, cov_b).

    tr((Σ_a Σ_b)^{1/2}) is the sum of the square roots of the eigenvalues of the symmetric
    Σ_a^{1/2} Σ_b Σ_a^{1/2}, computed with symmetric eigendecompositions (round-off below 0 clipped).
    """
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # Σ_a^{1/2}
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = float(np.sum(np.sqrt(np.clip(inner, 0, None))))
    value = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)
    return max(value, 0.0)


def _check(features: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name} must be features (N, D) with N >= 2, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf")
    return x


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance d² between feature sets `a` ``(N, D)`` and `b` ``(M, D)``."""
    a, b = _check(a, "a"), _check(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the feature sets have {a.shape[1]} and {b.shape[1]} dimensions; compare like with like")
    return frechet_from_moments(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def frechet_estimate(a: np.ndarray, b: np.ndarray, *, resamples: int = 200, seed: int = 0) -> Estimate:
    """`frechet_distance` with a bias-shifted bootstrap 95% interval: both sets resampled with replacement.

    A resample repeats images, which inflates the distance (by about as much as the distance itself
    at a few hundred images), so the resampled distances sit above the value. The interval is their
    2.5–97.5 percentiles moved down by that inflation (their mean minus the value), clipped at 0. To
    compare two generated sets against one reference, use `frechet_difference`, where the inflation
    cancels. ``n`` is the size of `a` (the generated set; `b` is the reference).
    """
    a, b = _check(a, "a"), _check(b, "b")
    value = frechet_distance(a, b)
    rng = np.random.default_rng(seed)
    draws = np.array([frechet_distance(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
                      for _ in range(resamples)])
    shift = draws.mean() - value
    low, high = np.percentile(draws - shift, [2.5, 97.5])
    return Estimate(value, max(0.0, float(low)), max(0.0, float(high)), len(a))


def frechet_difference(a: np.ndarray, b: np.ndarray, reference: np.ndarray, *, resamples: int = 200,
                       seed: int = 0) -> Estimate:
    """d²(a, reference) − d²(b, reference), negative where `a` is closer, with a percentile bootstrap 95%
    interval: `a`, `b` and the reference resampled together, so the inflation of a resample cancels.

    ``n`` is the size of `a`.
    """
    a, b, r = _check(a, "a"), _check(b, "b"), _check(reference, "reference")
    value = frechet_distance(a, r) - frechet_distance(b, r)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        rr = r[rng.integers(0, len(r), len(r))]
        draws.append(frechet_distance(a[rng.integers(0, len(a), len(a))], rr)
                     - frechet_distance(b[rng.integers(0, len(b), len(b))], rr))
    low, high = np.percentile(draws, [2.5, 97.5])
    return Estimate(value, float(low), float(high), len(a))
