"""`segmentation_scores`: how well maps over the image-token grid segment a ground-truth mask, with the metrics
of the zero-shot segmentation protocols (pixel accuracy, mIoU, mAP) and bootstrap intervals over images.

As those protocols do, each map is upsampled to the mask's size (bilinear, half-pixel centres: torch's
``interpolate(align_corners=False)``), never the mask downsampled. Per image: the map is thresholded at its
own mean (``threshold="mean"``; or at a given value) into a predicted mask; *pixel accuracy* is the share of
pixels where prediction and truth agree; the *IoU* of each class (lesion, background) is
``|pred ∩ truth| / |pred ∪ truth|``, *mIoU* their mean, and the lesion IoU is reported alone too; *AP* is the
threshold-free average precision of the map's values ranking the lesion pixels
(``sklearn.metrics.average_precision_score``), mAP its mean over images. Each mean comes with a percentile
bootstrap 95% interval over images (`dit_lens.metrics.estimates.estimate`).

Examples:
    >>> import numpy as np
    >>> masks = np.zeros((2, 4, 4), bool); masks[:, :2, :2] = True
    >>> maps = np.zeros((2, 2, 2)); maps[:, 0, 0] = 1.0
    >>> scores = segmentation_scores(maps, masks, n_boot=100)
    >>> float(scores["lesion_iou"][0]), float(scores["pixel_accuracy"][0])  # above its mean: the top-left quarter
    (1.0, 1.0)
    >>> scores["summary"].sel(metric="ap", stat="value").item()
    1.0
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from .estimates import estimate

__all__ = ["METRICS", "segmentation_scores"]

METRICS = ("pixel_accuracy", "miou", "lesion_iou", "background_iou", "ap")


def segmentation_scores(maps: Any, masks: Any, *, threshold: str | float = "mean", n_boot: int = 1000,
                        seed: int = 0) -> xr.Dataset:
    """Pixel accuracy, mIoU, lesion IoU and AP of `maps` against `masks`, per image and with intervals.

    Args:
        maps: ``(n, rows, cols)`` maps (numpy, or a DataArray whose dims end in ``row, col``; its other
            dims are flattened into images in order); larger is "more lesion".
        masks: ``(n, H, W)`` ground truth, True on the lesion; every image needs a lesion pixel and a
            background pixel, and ``H ≥ rows``, ``W ≥ cols``.
        threshold: ``"mean"`` (each map at its own mean, as the published protocols) or a number.
        n_boot: Bootstrap resamples of the intervals.
        seed: Seed of the bootstrap.

    Returns:
        Dataset with one value per image (``item``) of each of `METRICS` and ``summary (metric, stat)``
        (stat: value, low, high: the mean over images and its 95% interval); attrs hold the threshold, the
        resampling, the upsampling and n.

    Raises:
        ValueError: maps and masks of different counts, masks smaller than the map grid or not boolean, an
            image whose mask is all False (or all True), maps with NaN or inf.
    """
    values = _as_maps(maps)
    truth = np.asarray(masks)
    if truth.ndim == 2:
        truth = truth[None]
    if truth.ndim != 3:
        raise ValueError(f"masks must be (n, H, W), got shape {truth.shape}")
    if truth.dtype != bool:
        if not np.isin(truth, (0, 1)).all():
            raise ValueError("masks must be boolean (True on the lesion) or 0/1 values")
        truth = truth.astype(bool)
    if len(truth) != len(values):
        raise ValueError(f"{len(values)} maps but {len(truth)} masks: give one mask per map")
    if truth.shape[1] < values.shape[1] or truth.shape[2] < values.shape[2]:
        raise ValueError(f"masks of {truth.shape[1]}×{truth.shape[2]} pixels are smaller than the {values.shape[1]}×"
                         f"{values.shape[2]} maps; give masks at the image's resolution")
    area = truth.reshape(len(truth), -1).mean(1)
    empty = [int(i) for i in np.flatnonzero(area == 0)]
    full = [int(i) for i in np.flatnonzero(area == 1)]
    if empty or full:
        raise ValueError(f"masks {empty or full} are all {'False' if empty else 'True'}: segmentation scores need "
                         f"lesion and background pixels in every image; leave those images out")
    if not isinstance(threshold, str) and not np.isfinite(float(threshold)):
        raise ValueError(f"threshold must be 'mean' or a finite number, got {threshold!r}")
    if isinstance(threshold, str) and threshold != "mean":
        raise ValueError(f"threshold must be 'mean' or a number, got {threshold!r}")
    if not (isinstance(n_boot, (int, np.integer)) and n_boot >= 2):
        raise ValueError(f"n_boot must be an integer of at least 2 resamples (1000 is usual), got {n_boot!r}")
    up = upsample(values, truth.shape[1:])  # (n, H, W)
    per = {name: np.zeros(len(up)) for name in METRICS}
    from sklearn.metrics import average_precision_score

    for i, (m, t) in enumerate(zip(up, truth)):
        pred = m > (m.mean() if threshold == "mean" else float(threshold))
        per["pixel_accuracy"][i] = (pred == t).mean()
        per["lesion_iou"][i] = _iou(pred, t)
        per["background_iou"][i] = _iou(~pred, ~t)
        per["ap"][i] = average_precision_score(t.ravel(), m.ravel())
    per["miou"] = (per["lesion_iou"] + per["background_iou"]) / 2
    summary = np.zeros((len(METRICS), 3))
    for k, name in enumerate(METRICS):
        e = estimate(per[name], resamples=int(n_boot), seed=seed)
        summary[k] = (e.value, e.low, e.high)
    ds = xr.Dataset({name: ("item", per[name]) for name in METRICS}, coords={"item": np.arange(len(up))})
    ds["summary"] = xr.DataArray(summary, dims=("metric", "stat"),
                                 coords={"metric": list(METRICS), "stat": ["value", "low", "high"]})
    ds.attrs.update(threshold=threshold if isinstance(threshold, str) else float(threshold),
                    threshold_rule="each map thresholded at its own mean (pred = map > mean)"
                    if threshold == "mean" else "pred = map > threshold",
                    upsampling="maps upsampled bilinearly (align_corners=False) to the masks' size",
                    n=int(len(up)), n_boot=int(n_boot), bootstrap_seed=int(seed),
                    interval="percentile bootstrap 95% over images")
    return ds


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Maps ``(n, rows, cols)`` bilinearly upsampled to ``(n, *size)`` (float64)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float64))[:, None]
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)[:, 0].numpy()


def _iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(pred, truth).sum()
    return float(np.logical_and(pred, truth).sum() / union) if union else 1.0


def _as_maps(maps: Any) -> np.ndarray:
    if isinstance(maps, xr.DataArray):
        if maps.dims[-2:] != ("row", "col"):
            maps = maps.transpose(..., "row", "col")
        maps = maps.values
    values = np.asarray(maps, dtype=np.float64)
    if values.ndim == 2:
        values = values[None]
    if values.ndim < 3:
        raise ValueError(f"maps must be (n, rows, cols), got shape {values.shape}")
    values = values.reshape(-1, *values.shape[-2:])
    if not np.isfinite(values).all():
        raise ValueError("maps hold NaN or inf values; check the run that made them")
    return values
