"""Metrics of edits confined to a region: the result holds ``region (prompt, seed, y, x)``, the mask each
pair was edited in (region-confined methods return it). Each is a function of the `Judged` pairs, and
`REGION_METRICS` declares them for a study (`studies/insert_lesion.py`)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from .pairs import Judged, Metric, background_ssim, target_rate

__all__ = ["REGION_METRICS", "inserted_inside", "lesion_inside", "outside_ssim", "region_dice", "target_read"]


# -- edits confined to a region: the result holds ``region (prompt, seed, y, x)`` --------------------------------

def _region(judged: Judged) -> xr.DataArray:
    if "region" not in judged.out:
        raise ValueError("this metric needs the region each pair was edited in (a 'region' variable (prompt, seed, y, "
                         "x) in the result, as region-confined methods return)")
    return judged.out["region"].astype(bool).transpose("prompt", "seed", "y", "x")


def target_read(judged: Judged) -> xr.DataArray:
    """Per pair: the counterfactual is classified as the target (the pathology asked for): `target_rate`
    as a study's `Metric` reads it."""
    return target_rate(judged.probs, judged.target).rename("target_read")


def lesion_inside(judged: Judged) -> xr.DataArray:
    """Per pair: the share of the counterfactual's lesion pixels (segmenter) inside the region; 0 without a lesion."""
    lesion = judged.masks.sel(branch="edited").transpose("prompt", "seed", "y", "x")
    inside = (lesion & _region(judged)).sum(("y", "x"))
    return (inside / lesion.sum(("y", "x")).clip(min=1)).astype(np.float64).rename("lesion_inside")


def inserted_inside(judged: Judged) -> xr.DataArray:
    """Per pair: the share of the *inserted* lesion pixels inside the region; 0 when nothing was inserted.

    Inserted pixels are those the segmenter marks in the counterfactual but not in the original. When the
    original already shows something the segmenter calls a lesion (a false positive on a normal image, or a
    lesion that was there before), `lesion_inside` counts it against the edit wherever it lies; this counts
    only what the edit added.
    """
    masks = judged.masks.transpose("prompt", "seed", "branch", "y", "x")
    new = masks.sel(branch="edited") & ~masks.sel(branch="original")
    inside = (new & _region(judged)).sum(("y", "x"))
    return (inside / new.sum(("y", "x")).clip(min=1)).astype(np.float64).rename("inserted_inside")


def region_dice(judged: Judged) -> xr.DataArray:
    """Per pair: Dice between the counterfactual's lesion mask and the region."""
    lesion = judged.masks.sel(branch="edited").transpose("prompt", "seed", "y", "x")
    region = _region(judged)
    both = (lesion & region).sum(("y", "x"))
    return (2 * both / (lesion.sum(("y", "x")) + region.sum(("y", "x")))).astype(np.float64).rename("region_dice")


def outside_ssim(judged: Judged) -> xr.DataArray:
    """Per pair: SSIM between original and counterfactual over the pixels outside the region (masked windows)."""
    return background_ssim(judged.out, ~_region(judged)).rename("outside_ssim")


#: What a study of region-confined edits measures beside the standard metrics.
REGION_METRICS = (Metric("target_read", target_read), Metric("lesion_inside", lesion_inside),
                  Metric("inserted_inside", inserted_inside),
                  Metric("region_dice", region_dice), Metric("outside_ssim", outside_ssim))
