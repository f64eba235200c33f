"""Localised MedSteer: steer only inside a region of each image and keep the original outside it.

The region of each seed comes from (setting ``region``):

- ``"lesion"``: the lesion segmenter (``MethodContext.segmenter``) on the seed's original image;
- ``"gate"``: the steer's own gate map, no outside mask: an unrestricted steered run records the gate
  g = max(0, h·v) at the steered layers and steps, and the region is where its mean over them reaches
  half its maximum (`GATE_SHARE`), at the token grid.

Either is grown by ``grow`` pixels. The pair is then made by one `generate` call: the `Steer` — on the
region's tokens only (``steer_in="region"``) or on every token (``steer_in="image"``: what the
region changes still hears the steered context) — and, for the first ``confine`` fraction of the
steps, `Confine` (the edited branch's latents outside the region reset to the original's after each
step; 0 = off).
A seed whose original image has no lesion (or no open gate) has nothing to confine to and is steered
everywhere, as plain MedSteer; results count them (attr ``unlocalised_seeds``). Results hold the
region of every seed, ``region (prompt, seed, y, x)``.

Examples:
    >>> from dit_lens.methods import get
    >>> get("medsteer_local").cell_name(0, {"window": (0.0, 0.25), "steps": (0.0, 1.0), "alpha": 3.0,
    ...     "vector_seeds": 32, "region": "lesion", "grow": 4, "confine": 1.0, "steer_in": "image"})
    'medsteer_local_p0_w0-0.25_t0-1_a3_n32_rlesion_g4_c1_simage'
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import xarray as xr
from scipy import ndimage

from ..interventions.generate import generate
from ..interventions.region import Confine
from .axes import Axis, check_fraction
from .medsteer import AXES as MEDSTEER_AXES
from .medsteer import medsteer_steer
from .pair import ConceptPair
from .registry import VECTOR_SEEDS, Method, MethodContext, register

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["GATE_SHARE", "LOCAL", "gate_region", "grow_masks"]

#: A token is in the gate region where the mean gate reaches this share of the image's largest.
GATE_SHARE = 0.5
SOURCES = ("lesion", "gate")
STEER_IN = ("region", "image")


def _check_source(value: Any) -> str:
    if value not in SOURCES:
        raise ValueError(f"expected one of {list(SOURCES)}, got {value!r}")
    return str(value)


def _check_steer_in(value: Any) -> str:
    if value not in STEER_IN:
        raise ValueError(f"expected one of {list(STEER_IN)} (steer the region's tokens, or every token), got {value!r}")
    return str(value)


def _check_grow(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"expected a whole number of pixels >= 0, got {value!r}")
    return int(value)


_BY_NAME = {a.name: a for a in MEDSTEER_AXES}
AXES = (
    _BY_NAME["window"], _BY_NAME["steps"], _BY_NAME["alpha"], _BY_NAME[VECTOR_SEEDS],
    Axis("region", default=("lesion",), parse=str, check=_check_source, key="r", flag="regions",
         help="where each image's region comes from: lesion (the segmenter on the original) or gate (the gate map)"),
    Axis("grow", default=(4,), parse=int, check=_check_grow, key="g", flag="grow",
         help="pixels to grow each region by"),
    Axis("confine", default=(1.0,), parse=float, check=check_fraction, key="c", flag="confine",
         help="fraction of the steps during which the original is kept outside the region (0 = off)"),
    Axis("steer_in", default=("region",), parse=str, check=_check_steer_in, key="s", flag="steer-in",
         help="which tokens are steered: region (only the region's) or image (every token; the latents "
              "are still confined to the region)"),
)


def grow_masks(masks: np.ndarray, pixels: int) -> np.ndarray:
    """Binary masks ``(N, H, W)`` grown by `pixels` (a square neighbourhood)."""
    if pixels == 0:
        return masks.astype(bool)
    square = np.ones((2 * pixels + 1, 2 * pixels + 1), bool)
    return np.stack([ndimage.binary_dilation(m, structure=square) for m in masks])


def gate_region(gate: xr.DataArray, image_size: tuple[int, int], share: float = GATE_SHARE) -> np.ndarray:
    """Pixel masks ``(seed, H, W)`` where a run's mean gate ``(seed, step, layer, row, col)`` reaches `share` of
    its maximum, each token's patch filled."""
    mean = gate.mean(("step", "layer")).transpose("seed", "row", "col").values  # (seeds, rows, cols)
    peak = mean.max(axis=(1, 2), keepdims=True)
    tokens = (mean >= share * peak) & (peak > 0)
    rows, cols = tokens.shape[1:]
    return np.kron(tokens, np.ones((image_size[0] // rows, image_size[1] // cols), bool)).astype(bool)


def _regions(lens: Lens, pair: ConceptPair, seeds: Sequence[int], settings: dict, steer: Any,
             context: MethodContext) -> np.ndarray:
    size = (lens.pipeline_kwargs["height"], lens.pipeline_kwargs["width"])
    common = dict(num_inference_steps=context.num_inference_steps, guidance_scale=context.guidance_scale,
                  batch_size=context.batch_size, progress=context.progress)
    if settings["region"] == "lesion":
        if context.segmenter is None:
            raise ValueError("medsteer_local with region='lesion' needs a lesion segmenter: "
                             "pass MethodContext(segmenter=...)")
        plain = generate(lens, pair.source_prompt, seeds=seeds, **common)
        images = plain["image"].sel(branch="original").isel(prompt=0).values  # (seeds, H, W, 3)
        masks = np.asarray(context.segmenter(images), dtype=bool)
    else:
        first = generate(lens, pair.source_prompt, seeds=seeds, steer=steer, record_gates=True, **common)
        masks = gate_region(first["gate"].isel(prompt=0), size)
    return grow_masks(masks, settings["grow"])


def _run(lens: Lens, pair: ConceptPair, seeds: Sequence[int], settings: dict, *, context: MethodContext) -> xr.Dataset:
    steer = medsteer_steer(lens, pair, {**settings, "renormalize": False}, context)  # the paper's update
    masks = _regions(lens, pair, seeds, settings, steer, context)
    found = masks.reshape(len(seeds), -1).any(1)
    masks[~found] = True  # nothing found: steered everywhere, as plain MedSteer
    region = xr.DataArray(masks, dims=("seed", "y", "x"), coords={"seed": list(seeds)})
    edits = [Confine(region, steps=(0.0, settings["confine"]))] if settings["confine"] > 0 else []
    steer = replace(steer, region=region) if settings["steer_in"] == "region" else steer
    out = generate(lens, pair.source_prompt, seeds=seeds, steer=steer,
                   edits=edits, num_inference_steps=context.num_inference_steps,
                   guidance_scale=context.guidance_scale, record_gates=context.record_gates,
                   batch_size=context.batch_size, progress=context.progress)
    out["region"] = region.expand_dims(prompt=out["prompt"].values)
    out.attrs["unlocalised_seeds"] = [int(s) for s, f in zip(seeds, found) if not f]
    return out


LOCAL = register(Method("medsteer_local", AXES, _run,
                        description="MedSteer inside a region of each image (segmented lesion or gate map), "
                                    "the original kept outside"))
