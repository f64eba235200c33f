"""Metrics on pairs Datasets: concept flips, confidence shift, background preservation.

Each metric has a per-pair form (a DataArray over ``(prompt, seed)``) and is summarised with
`dit_lens.metrics.estimate`, which gives the mean, its n and a bootstrap 95% interval. Classifiers and segmenters
are plain callables with the embedded oracle's call shape: images ``(N, H, W, 3)`` float in [0, 1]
→ probabilities ``(N, K)`` (with ``.labels``), or → boolean lesion masks ``(N, H, W)``. A study
measures `STANDARD_METRICS` and any extra `Metric` it declares (a function of the `Judged` pairs;
the endoscopy world's dye metrics are `dit_lens.world.domain.DYE_METRICS`). Images holding NaN or inf
are refused (`dit_lens.validate.NonFiniteError`): no metric is ever computed on them.

Examples:
    >>> import numpy as np
    >>> pairs = as_pairs(np.zeros((2, 8, 8, 3)), np.ones((2, 8, 8, 3)))
    >>> pairs.image.dims
    ('prompt', 'seed', 'branch', 'y', 'x', 'rgb')
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import xarray as xr

from ..validate import check_finite

__all__ = [
    "as_pairs",
    "classify",
    "segment",
    "flips",
    "target_rate",
    "confidence_drop",
    "background_mask",
    "background_ssim",
    "masked_ssim_map",
    "background_psnr",
    "Judged",
    "Metric",
    "STANDARD_METRICS",
    "LPIPS_UNAVAILABLE",
    "PSNR_CEILING",
    "METRICS_VERSION",
]

#: Changes when a metric's definition changes; study results measured under another version are
#: not reused. 2: `background_ssim` takes each window's statistics over background pixels only.
#: 3: `target_rate` (the counterfactual is read as the target class) is measured beside the flip rate.
#: 4: `background_psnr` scores an untouched background `PSNR_CEILING` instead of infinity (which every
#: estimate dropped).
METRICS_VERSION = 4
#: Bg-PSNR of identical backgrounds (dB): the most `background_psnr` reports.
PSNR_CEILING = 100.0

#: What a study measures for every cell of every method, in this order.
STANDARD_METRICS = ("flip_rate", "target_rate", "confidence_shift", "bg_ssim", "bg_psnr", "bg_lpips")

#: What `background_lpips` reports when no LPIPS weights are on disk (never a stand-in under that name).
LPIPS_UNAVAILABLE = "unavailable: no LPIPS weights on disk"


@dataclass(frozen=True)
class Judged:
    """A cell's pairs with what the judges said about them: the input of a `Metric`.

    Attributes:
        out: The pairs ``image (prompt, seed, branch, y, x, rgb)``.
        probs: Classifier probabilities ``(prompt, seed, branch, class)`` (`classify`).
        masks: Lesion masks ``(prompt, seed, branch, y, x)`` (`segment`).
        source: The label of the concept removed.
        target: The label the counterfactual should read as.
    """

    out: xr.Dataset
    probs: xr.DataArray
    masks: xr.DataArray
    source: str
    target: str


@dataclass(frozen=True)
class Metric:
    """An extra metric a study declares: per-pair values ``(prompt, seed)`` from the `Judged` pairs.

    Attributes:
        name: The result variable (with ``_low``, ``_high``, ``_n``).
        fn: ``fn(judged) → DataArray (prompt, seed)``; a module-level function, so a saved
            declaration can be loaded back (`from_dict`).
        version: Bump when the definition changes: the study's folder key changes with it, so cells
            measured under the old definition are not reused.
    """

    name: str
    fn: Callable[[Judged], xr.DataArray] = field(compare=False)
    version: int = 1

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name in STANDARD_METRICS:
            raise ValueError(f"a Metric name must be an identifier other than {STANDARD_METRICS}, got {self.name!r}")
        if not callable(self.fn):
            raise TypeError(f"Metric {self.name!r}: fn must be callable, got {type(self.fn).__name__}")

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version,
                "function": f"{self.fn.__module__}:{getattr(self.fn, '__qualname__', repr(self.fn))}"}

    @classmethod
    def from_dict(cls, data: dict) -> "Metric":
        """Load back, importing the function by its recorded module and name."""
        module, _, qualname = data["function"].partition(":")
        try:
            fn: Any = importlib.import_module(module)
            for part in qualname.split("."):
                fn = getattr(fn, part)
        except (ImportError, AttributeError):
            raise ValueError(f"metric {data['name']!r}: cannot import its function {data['function']!r}; "
                             "metrics must be module-level functions to be loaded back") from None
        return cls(data["name"], fn, int(data.get("version", 1)))


def as_pairs(original: Any, edited: Any, *, prompt: str = "your images", seeds: Any = None) -> xr.Dataset:
    """Your own pairs laid out as `dit_lens.generate` lays them out, so every metric here reads them.

    Args:
        original, edited: Images ``(N, H, W, 3)`` float in [0, 1] (or one image ``(H, W, 3)``), pair i
            being ``original[i]`` and ``edited[i]``.
        prompt: The ``prompt`` coordinate (one for all pairs).
        seeds: The ``seed`` coordinate, one per pair (default 0 … N − 1).

    Returns:
        ``image (prompt, seed, branch, y, x, rgb)`` with branches ``original`` and ``edited``.

    Examples:
        >>> import numpy as np
        >>> out = as_pairs(np.zeros((2, 8, 8, 3)), np.ones((2, 8, 8, 3)))
        >>> dict(out["image"].sizes)
        {'prompt': 1, 'seed': 2, 'branch': 2, 'y': 8, 'x': 8, 'rgb': 3}
    """
    a, b = np.asarray(original, dtype=np.float32), np.asarray(edited, dtype=np.float32)
    a, b = (a[None] if a.ndim == 3 else a), (b[None] if b.ndim == 3 else b)
    if a.ndim != 4 or a.shape[-1] != 3 or a.shape != b.shape:
        raise ValueError(f"as_pairs takes two image arrays of the same shape (N, H, W, 3), floats in [0, 1]; "
                         f"got {np.asarray(original).shape} and {np.asarray(edited).shape}")
    _refuse_non_finite(np.stack([a, b]), "the images")
    if a.min() < 0 or a.max() > 1 or b.min() < 0 or b.max() > 1:
        raise ValueError("as_pairs takes images in [0, 1]; divide 0-255 images by 255")
    seeds = list(range(len(a))) if seeds is None else [int(x) for x in seeds]
    if len(seeds) != len(a) or len(set(seeds)) != len(seeds):
        raise ValueError(f"as_pairs needs one distinct seed per pair ({len(a)}), got {seeds}")
    image = np.stack([a, b], axis=1)[None]  # (1, N, 2, H, W, 3)
    return xr.Dataset({"image": (("prompt", "seed", "branch", "y", "x", "rgb"), image)},
                      coords={"prompt": [prompt], "seed": seeds, "branch": ["original", "edited"]})


def _images(out: xr.Dataset, branch: str) -> tuple[np.ndarray, tuple]:
    im = out["image"].sel(branch=branch).transpose("prompt", "seed", "y", "x", "rgb")
    shape = im.shape
    values = im.values
    _refuse_non_finite(values, f"the {branch} images")
    return values.reshape(-1, *shape[2:]), shape[:2]


def _refuse_non_finite(values: np.ndarray, what: str) -> None:
    """No metric is computed on NaN or inf pixels: they would read as a flip or a NaN score."""
    check_finite(values, what, "no metric is computed on them; the run that made them diverged (lower the "
                               "edit strength, e.g. Steer alpha) and generate them again")


def classify(out: xr.Dataset, classifier: Callable, *, batch: int = 64) -> xr.DataArray:
    """Class probabilities for every image: DataArray ``(prompt, seed, branch, class)``."""
    labels = list(getattr(classifier, "labels", []))
    per_branch = []
    for branch in out["branch"].values:
        flat, cells = _images(out, str(branch))
        probs = np.concatenate([np.asarray(classifier(flat[i : i + batch])) for i in range(0, len(flat), batch)])
        if probs.ndim != 2 or probs.shape[0] != len(flat):
            raise ValueError(f"the classifier returned shape {probs.shape}; expected (N, classes)")
        per_branch.append(probs.reshape(*cells, probs.shape[1]))
    stacked = np.stack(per_branch, axis=2)  # (prompt, seed, branch, class)
    coords = {k: out[k].values for k in ("prompt", "seed", "branch")}
    coords["class"] = labels or list(range(stacked.shape[-1]))
    return xr.DataArray(stacked, dims=("prompt", "seed", "branch", "class"), coords=coords, name="probability")


def segment(out: xr.Dataset, segmenter: Callable, *, batch: int = 64) -> xr.DataArray:
    """Lesion masks for every image: boolean DataArray ``(prompt, seed, branch, y, x)``."""
    per_branch = []
    for branch in out["branch"].values:
        flat, cells = _images(out, str(branch))
        masks = np.concatenate([np.asarray(segmenter(flat[i : i + batch]), dtype=bool) for i in range(0, len(flat), batch)])
        if masks.shape != flat.shape[:3]:
            raise ValueError(f"the segmenter returned shape {masks.shape}; expected {flat.shape[:3]}")
        per_branch.append(masks.reshape(*cells, *masks.shape[1:]))
    coords = {k: out[k].values for k in ("prompt", "seed", "branch")}
    return xr.DataArray(np.stack(per_branch, axis=2), dims=("prompt", "seed", "branch", "y", "x"), coords=coords, name="lesion")


def _class_index(probs: xr.DataArray, label: str | int) -> Any:
    labels = list(probs["class"].values)
    if label not in labels:
        raise ValueError(f"class {label!r} is not one of the classifier's labels {labels}")
    return label


def flips(probs: xr.DataArray, source: str | int, *, branch: str = "edited") -> xr.DataArray:
    """1.0 where the `branch` image is no longer classified as `source`, else 0.0 ``(prompt, seed)``."""
    source = _class_index(probs, source)
    predicted = probs.sel(branch=branch).idxmax("class")
    return (predicted != source).astype(np.float64).rename("flip")


def target_rate(probs: xr.DataArray, target: str | int, *, branch: str = "edited") -> xr.DataArray:
    """1.0 where the `branch` image is classified as `target`, else 0.0 ``(prompt, seed)``.

    The flip rate counts images that are no longer the source class, whatever they became (a
    destroyed polyp read as normal cecum, colitis read as polyps); this counts only the class asked for."""
    target = _class_index(probs, target)
    predicted = probs.sel(branch=branch).idxmax("class")
    return (predicted == target).astype(np.float64).rename("target_rate")


def confidence_drop(probs: xr.DataArray, source: str | int) -> xr.DataArray:
    """p(source | unsteered) − p(source | steered) per pair ``(prompt, seed)``."""
    source = _class_index(probs, source)
    p = probs.sel({"class": source})
    return (p.sel(branch="original") - p.sel(branch="edited")).rename("confidence_drop")


def background_mask(masks: xr.DataArray) -> xr.DataArray:
    """Pixels outside the lesion in *both* images of a pair ``(prompt, seed, y, x)``."""
    return ~masks.any("branch")


def background_ssim(out: xr.DataArray | xr.Dataset, background: xr.DataArray, *,
                    masked_windows: bool = True) -> xr.DataArray:
    """Mean SSIM (7×7 window, RGB) between the pair over background pixels ``(prompt, seed)``.

    With ``masked_windows`` (the default) each window's means, variances and covariance are taken
    over its background pixels only (`masked_ssim_map`), so an edit that leaves every background
    pixel unchanged scores exactly 1.0 however close or ragged the lesion. ``masked_windows=False``
    averages the plain SSIM map over the background instead, as many papers do: there a window
    that straddles the lesion edge is penalised for the lesion's change, which for a diffuse
    lesion caps even a perfect edit well below 1.
    """
    from skimage.metrics import structural_similarity

    def one(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
        if not keep.any():
            return float("nan")
        if masked_windows:
            full = masked_ssim_map(a, b, keep)
        else:
            _, full = structural_similarity(a, b, channel_axis=-1, data_range=1.0, full=True)
        return float(full.mean(-1)[keep].mean())

    return _pairwise(out, background, one, "bg_ssim")


def masked_ssim_map(a: np.ndarray, b: np.ndarray, keep: np.ndarray, *, win_size: int = 7,
                    data_range: float = 1.0) -> np.ndarray:
    """Per-pixel, per-channel SSIM ``(H, W, C)`` whose window statistics use only `keep` pixels.

    Normalised convolution: a window's mean, variance and covariance are weighted by the mask,
    with the sample-covariance correction n/(n − 1) for its n kept pixels. Where `keep` is all
    true this is exactly scikit-image's ``structural_similarity`` map (uniform window, K1 = 0.01,
    K2 = 0.03, reflected borders); pixels outside `keep` are meaningless and should be ignored.
    """
    from scipy.ndimage import uniform_filter

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.shape[:2] != keep.shape:
        raise ValueError(f"masked_ssim_map needs two (H, W, C) images and an (H, W) mask, got {a.shape}, "
                         f"{b.shape}, {keep.shape}")
    m = keep.astype(np.float64)[..., None]
    box = lambda x: uniform_filter(x, size=(win_size, win_size, 1), mode="reflect")  # noqa: E731
    weight = box(np.broadcast_to(m, a.shape).copy())
    safe = np.where(weight > 0, weight, 1.0)
    mean = lambda x: box(x * m) / safe  # noqa: E731
    ua, ub = mean(a), mean(b)
    n = weight * win_size**2
    norm = np.where(n > 1.5, n / np.maximum(n - 1, 1e-12), 1.0)
    va, vb, cov = (norm * (mean(x * y) - ux * uy) for x, y, ux, uy in ((a, a, ua, ua), (b, b, ub, ub), (a, b, ua, ub)))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * ua * ub + c1) * (2 * cov + c2)) / ((ua**2 + ub**2 + c1) * (va + vb + c2))


def background_psnr(out: xr.Dataset, background: xr.DataArray) -> xr.DataArray:
    """PSNR (dB, peak 1.0) between the pair over background pixels ``(prompt, seed)``, at most
    `PSNR_CEILING`: an untouched background (infinite PSNR) scores the ceiling, so the best-preserving
    edits count in every mean instead of being dropped from it.

    Examples:
        >>> import numpy as np
        >>> out = as_pairs(np.zeros((2, 4, 4, 3)), np.stack([np.zeros((4, 4, 3)), np.full((4, 4, 3), 0.1)]))
        >>> everywhere = xr.DataArray(np.ones((1, 2, 4, 4), bool), dims=("prompt", "seed", "y", "x"))
        >>> background_psnr(out, everywhere).values.round(6).tolist()
        [[100.0, 20.0]]
    """

    def one(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
        if not keep.any():
            return float("nan")
        mse = float(((a - b) ** 2)[keep].mean())
        return PSNR_CEILING if mse == 0 else min(PSNR_CEILING, 10.0 * np.log10(1.0 / mse))

    return _pairwise(out, background, one, "bg_psnr")


def _pairwise(out: xr.Dataset, background: xr.DataArray, fn: Callable, name: str) -> xr.DataArray:
    image = out["image"].transpose("prompt", "seed", "branch", "y", "x", "rgb")
    keep = background.transpose("prompt", "seed", "y", "x").values
    values = np.zeros(image.shape[:2])
    data = image.values.astype(np.float64)
    _refuse_non_finite(data, "the images")
    branches = list(image["branch"].values)
    u, s = branches.index("original"), branches.index("edited")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            values[i, j] = fn(data[i, j, u], data[i, j, s], keep[i, j])
    return xr.DataArray(values, dims=("prompt", "seed"), coords={k: image[k].values for k in ("prompt", "seed")}, name=name)
