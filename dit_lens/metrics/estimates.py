"""Estimates with intervals: a mean with its n and a bootstrap 95% interval (`estimate`), a share of hits
with a Wilson interval (`proportion`).

Examples:
    >>> import xarray as xr
    >>> e = estimate(xr.DataArray([1.0, 0.0, 1.0, 1.0], dims="seed"), seed=0)
    >>> e.value, e.n, e.low <= e.value <= e.high
    (0.75, 4, True)
    >>> str(proportion([True] * 64))
    '1.000 [0.943, 1.000] (n=64)'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import xarray as xr

__all__ = ["Estimate", "estimate", "proportion"]


@dataclass(frozen=True)
class Estimate:
    """A mean with its sample size and bootstrap 95% confidence interval."""

    value: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"



def estimate(values: xr.DataArray | np.ndarray, *, resamples: int = 2000, seed: int = 0) -> Estimate:
    """Mean of `values` (NaNs dropped) with a percentile bootstrap 95% interval."""
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    if x.size == 1 or np.all(x == x[0]):
        return Estimate(float(x.mean()), float(x.min()), float(x.max()), int(x.size))
    ci = bootstrap(
        (x,), np.mean, n_resamples=resamples, confidence_level=0.95, method="percentile",
        random_state=np.random.default_rng(seed),
    ).confidence_interval
    return Estimate(float(x.mean()), float(ci.low), float(ci.high), int(x.size))


def proportion(hits: xr.DataArray | np.ndarray) -> Estimate:
    """The share of true values in `hits` (bools or 0/1; NaNs dropped) with a Wilson score 95% interval,
    which, unlike a bootstrap, stays informative at 0 or n of n (64 of 64: [0.943, 1])."""
    from scipy.stats import binomtest

    x = np.asarray(hits, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    if not np.isin(x, (0.0, 1.0)).all():
        raise ValueError("proportion takes hits (True/False or 0/1); for other values use estimate")
    k = int(x.sum())
    ci = binomtest(k, int(x.size)).proportion_ci(confidence_level=0.95, method="wilson")
    return Estimate(k / x.size, float(ci.low), float(ci.high), int(x.size))
