"""What `dit-lens demo` reports: the metrics of its pairs, the files it writes and the table it prints.

`measure_pairs` judges the counterfactual pairs (flip and target rates with the world's oracle, background
similarity outside the lesion masks, or over the whole image without a segmenter); `write_outputs`
writes every output (`OUTPUTS`) into the demo's claimed folder, each recorded before it is written;
`print_summary` prints the metrics with their 95% intervals and what each one means. Running the demo
is `dit_lens.apps.demo`.

Examples:
    >>> import tempfile
    >>> summary = {"steer": {"name": "polyps -> normal cecum"}, "steer_description": "steered", "n_pairs": 4,
    ...            "flip_rate": 0.75, "flip_rate_ci95": [0.25, 1.0], "seconds": 30.0}
    >>> print_summary(summary, Path(tempfile.mkdtemp()))  # doctest: +ELLIPSIS
    <BLANKLINE>
    polyps -> normal cecum: steered
    metric                 value  [95% CI]   (n = 4 pairs)
    flip_rate              0.750  [0.250, 1.000]
    where:
      flip_rate: share of steered images the oracle no longer reads as the source class
    finished in 30 s (0.5 min)
    wrote /...
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..storage import Claim, temporary_name

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["OUTPUTS", "MEANINGS", "measure_pairs", "write_outputs", "print_summary"]

#: What the demo writes into its folder.
OUTPUTS = ("summary.json", "pairs.png", "gates.png", "attention.png", "explorer.html", "vector.zarr")


def measure_pairs(pairs: xr.Dataset, oracle_source: str | None, source_label: str | None,
                  target_label: str | None) -> dict:
    """The demo's metrics of the counterfactual `pairs` (`dit_lens.interventions.generate.generate`'s result).

    Args:
        pairs: The unsteered and steered images of each seed.
        oracle_source: The classifier and segmenter (``"embedded"`` or a folder), or None: flip and target
            rates are then unavailable, and the background is the whole image.
        source_label: The class steered away from, or None when no class was named.
        target_label: The class steered towards, or None.

    Returns:
        ``{metric: value, metric_ci95: [low, high]}``, or ``metric_status`` saying why a metric is
        unavailable, with what the background was and the metrics' version.
    """
    from .. import metrics as M

    result: dict = {}
    if oracle_source is None:
        masks_note = "no segmenter: whole image"
        background = ~M.segment(pairs, lambda x: np.zeros(x.shape[:3], bool)).any("branch")
        for key in ("flip_rate", "target_rate", "confidence_shift"):
            result[key] = None
            result[f"{key}_status"] = "unavailable: no classifier for this model (pass --oracle)"
    else:
        from ..world import load_oracle, load_segmenter
        from ..world.domain import DYE_CLASSES, dye_detection_rate, polyp_kept

        oracle, segmenter = load_oracle(oracle_source), load_segmenter(oracle_source)
        probs = M.classify(pairs, oracle)
        masks = M.segment(pairs, segmenter)
        background = M.background_mask(masks)
        masks_note = f"outside the union of both images' lesion masks ({oracle_source} segmenter)"
        judged = M.Judged(pairs, probs, masks, source_label, target_label)
        rates = {"flip_rate": (source_label, lambda: M.flips(probs, source_label)),
                 "target_rate": (target_label, lambda: M.target_rate(probs, target_label)),
                 "confidence_shift": (source_label, lambda: M.confidence_drop(probs, source_label)),
                 "unsteered_recognised": (source_label, lambda: 1.0 - M.flips(probs, source_label, branch="original"))}
        if source_label in DYE_CLASSES and target_label == "polyps":  # removing dye must keep the polyp
            rates["dye_detection_rate"] = (source_label, lambda: dye_detection_rate(judged))
            rates["polyp_kept"] = (source_label, lambda: polyp_kept(judged))
        for key, (label, values) in rates.items():
            if label is None:
                side = "--source" if label is source_label else "--target"
                result[key], result[f"{key}_status"] = None, f"unavailable: no class named; pass {side}"
                continue
            est = M.estimate(values())
            result[key], result[f"{key}_ci95"] = est.value, [est.low, est.high]
    ssim = "bg_ssim" if oracle_source is not None else "whole_image_ssim"
    psnr = "bg_psnr" if oracle_source is not None else "whole_image_psnr"
    for key, values in ((ssim, M.background_ssim(pairs, background)),
                        (psnr, M.background_psnr(pairs, background))):
        est = M.estimate(values)
        result[key], result[f"{key}_ci95"] = est.value, [est.low, est.high]
    lpips = M.background_lpips(pairs, background, unavailable="nan")  # the reason is printed
    lp = "bg_lpips" if oracle_source is not None else "whole_image_lpips"
    result[lp] = None if lpips.attrs["status"].startswith("unavailable") else M.estimate(lpips).value
    result[f"{lp}_status"] = lpips.attrs["status"]
    result["background"] = masks_note
    result["metrics_version"] = M.METRICS_VERSION
    result[f"{ssim}_definition"] = ("7x7 SSIM, window statistics over background pixels only, averaged over them"
                                    if oracle_source is not None else "7x7 SSIM over the whole image")
    return result


def write_outputs(out: Claim, pairs: xr.Dataset, vector: xr.DataArray, summary: dict, maps: xr.Dataset | None = None,
                  judge: Callable | None = None, segmenter: Callable | None = None) -> None:
    """Every output (`OUTPUTS`) into the claimed folder `out`, each recorded in the folder's marker before it
    is written (atomically); ``attention.png`` only with cross-attention `maps`."""
    from ..readouts.vector_files import save_vector
    from ..views.attention import attention_figure
    from ..views.explorer import write_explorer
    from ..views.figures import gate_figure, pairs_figure

    out.write("summary.json", json.dumps(summary, indent=2).encode())
    figures = {"pairs.png": pairs_figure(pairs, max_pairs=8, judge=judge),
               "gates.png": gate_figure(pairs, segmenter=segmenter)}
    if maps is not None:
        figures["attention.png"] = attention_figure(maps)
    for name, figure in figures.items():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        out.write(name, buffer.getvalue())
    out.record("explorer.html")
    page = out.path / "explorer.html"
    write_explorer(pairs, temporary_name(page), attention=maps, judge=judge)
    os.replace(temporary_name(page), page)
    out.record("vector.zarr")
    save_vector(vector, out.path / "vector.zarr")
    out.record(*(p.relative_to(out.path) for p in (out.path / "vector.zarr").rglob("*") if p.is_file()))


#: What each printed metric means (a pair is the unsteered and the steered image of one seed).
MEANINGS = {
    "flip_rate": "share of steered images the oracle no longer reads as the source class",
    "target_rate": "share of steered images the oracle reads as the target class",
    "dye_detection_rate": "share of steered images where dye is still detected (lower is better)",
    "polyp_kept": "share of steered images that still show the polyp after the dye was removed",
    "confidence_shift": "mean drop of the oracle's probability of the source class, unsteered minus steered",
    "unsteered_recognised": "share of unsteered images the oracle reads as the source class (how often there "
                            "was a source class to remove)",
    "bg_ssim": "structural similarity of the two images outside the lesion masks (1 = background untouched)",
    "bg_psnr": "peak signal-to-noise ratio (dB) of the two images outside the lesion masks, capped at 100",
    "whole_image_ssim": "structural similarity of the two whole images (no segmenter for this model)",
    "whole_image_psnr": "peak signal-to-noise ratio (dB) of the two whole images, capped at 100",
}


def print_summary(summary: dict, out_dir: Path) -> None:
    """Print `summary` (`measure_pairs`' metrics with the run's settings) as a table, with what each metric
    means, and the outputs found in `out_dir`."""

    def fmt(key: str) -> str:
        value = summary.get(key)
        if value is None:
            return summary.get(f"{key}_status", "unavailable")
        low, high = summary.get(f"{key}_ci95", [value, value])
        return f"{value:.3f}  [{low:.3f}, {high:.3f}]"

    print(f"\n{summary['steer']['name']}: {summary['steer_description']}")
    print(f"{'metric':22s} value  [95% CI]   (n = {summary['n_pairs']} pairs)")
    for key in ("flip_rate", "target_rate", "dye_detection_rate", "polyp_kept", "confidence_shift",
                "unsteered_recognised", "bg_ssim", "bg_psnr", "whole_image_ssim", "whole_image_psnr"):
        if key in summary:
            print(f"{key:22s} {fmt(key)}")
    for key in ("bg_lpips", "whole_image_lpips"):
        if f"{key}_status" in summary:
            print(f"{key:22s} {summary[f'{key}_status']}")
    shown = [key for key in MEANINGS if key in summary]
    print("where:")
    for key in shown:
        print(f"  {key}: {MEANINGS[key]}")
    print(f"finished in {summary['seconds']:.0f} s ({summary['seconds'] / 60:.1f} min)")
    written = [name for name in OUTPUTS if (out_dir / name).exists()]
    print(f"wrote {out_dir}/" + ", ".join(written))
