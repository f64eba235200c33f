"""Insert a pathology where asked: the source prompt's image, and the target prompt's from the same seed
with `AttentionRegulation` holding the target inside a region of each image.

Each seed's region is drawn from the seed itself (`placed_region`), so a cell's regions are the same
on every run and differ across seeds: a ``"box"`` (sides 0.375–0.56 of the image's, anywhere inside it)
or a ``"blob"`` (an ellipse with radii 0.19–0.28 of the side, at any angle). The setting ``modules``
names which regulation runs, for the ablation:

- ``"default"``: the library's defaults (`AttentionRegulation`: conditioning outside the region,
  contrast and enhancement inside); ``"no-outside"`` / ``"no-contrast"`` switch one off; ``"+self"`` /
  ``"+energy"`` add self-attention gating / the latent correction (published settings); ``"keep"`` adds
  keeping the original outside;
- ``"paper"``: the four published modules alone at the published settings (`AttentionRegulation.published`);
- ``"none"``: no regulation at all (plain re-prompting; the region is only recorded, to measure where
  the lesion landed).

The world's captions name no anatomy, so the self-attention partition is the region itself (the
anatomy-word module has nothing to gate). Results hold ``region (prompt, seed, y, x)``; measure them
with `dit_lens.metrics.REGION_METRICS`.

Examples:
    >>> box = placed_region(7, "box", (64, 64))  # the same region for seed 7 on every run
    >>> bool((box == placed_region(7, "box", (64, 64))).all()), bool((box != placed_region(8, "box", (64, 64))).any())
    (True, True)
    >>> from dit_lens.methods import get
    >>> get("regulate").cell_name(0, {"place": "box", "modules": "default"})
    'regulate_p0_xbox_mdefault'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import xarray as xr

from ..interventions.generate import reprompt
from ..interventions.regulate import AttentionRegulation
from .axes import Axis
from .pair import ConceptPair
from .registry import Method, MethodContext, register

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["MODULES", "PLACES", "REGULATE", "placed_region", "regulation_for"]

PLACES = ("box", "blob")
MODULES = ("default", "paper", "+self", "+energy", "no-outside", "no-contrast", "keep", "none")


def _choice(options: Sequence[str]):
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {list(options)}, got {value!r}")
        return str(value)

    return check


AXES = (
    Axis("place", default=("box",), parse=str, check=_choice(PLACES), key="x", flag="places",
         help="region shapes: box or blob (one per seed, drawn from the seed)"),
    Axis("modules", default=("default",), parse=str, check=_choice(MODULES), key="m",
         help=f"which regulation runs: {', '.join(MODULES)}"),
)


def placed_region(seed: int, place: str, size: tuple[int, int]) -> np.ndarray:
    """The region of one seed: a bool mask ``(H, W)`` drawn from the seed (see the module docstring)."""
    rng = np.random.default_rng([int(seed), 18])
    height, width = size
    mask = np.zeros(size, bool)
    if place == "box":
        h, w = (int(round(rng.uniform(0.375, 0.56) * n)) for n in size)
        y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        mask[y : y + h, x : x + w] = True
        return mask
    if place != "blob":
        raise ValueError(f"place must be one of {list(PLACES)}, got {place!r}")
    ry, rx = rng.uniform(0.19, 0.28, 2) * np.array(size)
    reach = max(ry, rx)
    cy, cx = rng.uniform(reach, height - reach), rng.uniform(reach, width - reach)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[:height, :width] + 0.5
    u = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
    v = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
    return (u / ry) ** 2 + (v / rx) ** 2 <= 1.0


def regulation_for(modules: str, region: Any, pathology_words: Sequence[str]) -> AttentionRegulation | None:
    """The `AttentionRegulation` a ``modules`` setting names (None for ``"none"``)."""
    if modules == "none":
        return None
    if modules == "paper":
        return AttentionRegulation.published(region, pathology_words=pathology_words)
    changes = {"+self": {"gate_self_attention": True}, "+energy": {"energy_step": 0.05}, "keep": {"keep_outside": 1.0},
               "no-outside": {"condition_outside": False}, "no-contrast": {"contrast": 0.0}}.get(modules, {})
    return AttentionRegulation(region=region, pathology_words=list(pathology_words), **changes)


def _run(lens: Lens, pair: ConceptPair, seeds: Sequence[int], settings: dict, *, context: MethodContext) -> xr.Dataset:
    size = (lens.pipeline_kwargs["height"], lens.pipeline_kwargs["width"])
    masks = np.stack([placed_region(s, settings["place"], size) for s in seeds])
    region = xr.DataArray(masks, dims=("seed", "y", "x"), coords={"seed": list(seeds)})
    reg = regulation_for(settings["modules"], region, [pair.target])
    out = reprompt(lens, pair.source_prompt, pair.target_prompt, seeds=seeds, edits=[] if reg is None else [reg],
                   num_inference_steps=context.num_inference_steps, guidance_scale=context.guidance_scale,
                   batch_size=context.batch_size, progress=context.progress)
    out["region"] = region.expand_dims(prompt=out["prompt"].values)
    return out


REGULATE = register(Method("regulate", AXES, _run,
                           description="the target prompt from the same seed, regulated to stay inside a region"))
