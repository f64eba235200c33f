"""Metrics: estimates with intervals, pair metrics (flips, target rate, background SSIM/PSNR), LPIPS, region
metrics and distribution distances. This layer imports only dit-lens' own core (`dit_lens.validate`); the
studies, the embedded world and the apps build on it.

- `estimates`: `estimate` (mean, n, bootstrap 95% interval), `proportion` (Wilson interval);
- `pairs`: metrics on pairs Datasets and the `Metric` a study declares;
- `perceptual`: Bg-LPIPS, only where its packages and weights are on disk;
- `regions`: metrics of edits confined to a region;
- `distribution`: Fréchet distances between feature sets.
"""

from .distribution import frechet_difference, frechet_distance, frechet_estimate, frechet_from_moments
from .estimates import Estimate, estimate, proportion
from .pairs import (LPIPS_UNAVAILABLE, METRICS_VERSION, PSNR_CEILING, STANDARD_METRICS, Judged, Metric, as_pairs,
                    background_mask, background_psnr, background_ssim, classify, confidence_drop, flips,
                    masked_ssim_map, segment, target_rate)
from .perceptual import LPIPS_BACKBONES, MetricUnavailableError, background_lpips, lpips_unavailable
from .regions import REGION_METRICS, inserted_inside, lesion_inside, outside_ssim, region_dice, target_read

__all__ = [
    "Estimate", "estimate", "proportion",
    "as_pairs", "classify", "segment", "flips", "target_rate", "confidence_drop", "background_mask",
    "background_ssim", "masked_ssim_map", "background_psnr", "Judged", "Metric", "STANDARD_METRICS",
    "LPIPS_UNAVAILABLE", "PSNR_CEILING", "METRICS_VERSION",
    "LPIPS_BACKBONES", "MetricUnavailableError", "background_lpips", "lpips_unavailable",
    "REGION_METRICS", "inserted_inside", "lesion_inside", "outside_ssim", "region_dice", "target_read",
    "frechet_difference", "frechet_distance", "frechet_estimate", "frechet_from_moments",
]
