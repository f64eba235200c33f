"""The ``sae_steer`` method: steering by sparse-autoencoder feature, beside MedSteer's steering vector.

For a concept pair (source → target), on the same vector seeds MedSteer's vector is computed from:

1. capture the SAE's site (``attn2``) at every token, at the blocks of the layer ``window``, for the pair's
   positive (source) and negative (target) prompts, seeds ``0 … vector_seeds − 1``
   (``dit_lens.capture(..., reduce=None)``, content-addressed in the cache, so a re-run reads it back);
2. train a TopK SAE on that store (`dit_lens.train_sae`, ``k = sae_k``, expansion 4, 32 passes over its training
   tokens up to 2**18 tokens; cached the same way);
3. pick the ``sae_features`` features whose mean activation (over those seeds, steps, blocks and image tokens)
   is most larger on the source prompts than on the target prompts — the features the source concept turns on;
4. run the source prompt with a `FeatureEdit` scaling those features by ``sae_scale`` (0: ablation) at the
   window's blocks and the ``steps`` window's steps, both guidance halves, the SAE's error term kept.

The defaults (64 features, scale −3) are what turned polyps into another class on the embedded world with
the background kept (blocks 6–11; ablation alone, scale 0, flipped almost none: RESULTS.md).

The result is a pairs Dataset like every method's (``image (prompt, seed, branch, y, x, rgb)``); attrs
``sae`` record the SAE (folder, digest, quality) and the chosen features with their mean differences.

Examples:
    >>> from dit_lens.methods import get
    >>> [a.name for a in get("sae_steer").axes]
    ['window', 'steps', 'sae_features', 'sae_scale', 'sae_k', 'blend', 'vector_seeds']
    >>> get("sae_steer").cell_name(0, {"window": (0.5, 1.0), "steps": (0.0, 1.0), "sae_features": 4,
    ...                                "sae_scale": 0.0, "sae_k": 32, "blend": 0.0, "vector_seeds": 16})
    'sae_steer_p0_w0.5-1_t0-1_f4_s0_k32_n16'
"""

from __future__ import annotations

from typing import Sequence

import xarray as xr

from ..features.maps import store_feature_means, top_features
from ..features.train import train_sae
from ..interventions.feature import FeatureEdit
from ..interventions.generate import generate
from ..model.lens import Lens
from ..model.where import At
from ..trace.attrs import typed
from ..trace.capture import capture
from .axes import BLEND, Axis, check_count, check_real, window_layers, window_steps
from .medsteer import AXES as MEDSTEER_AXES
from .pair import ConceptPair
from .registry import VECTOR_SEEDS, Method, MethodContext, register

__all__ = ["SAE_STEER", "sae_feature_edit"]

_SHARED = {axis.name: axis for axis in MEDSTEER_AXES}  # an axis name means one thing across methods

AXES = (
    _SHARED["window"],
    _SHARED["steps"],
    Axis("sae_features", default=(64,), parse=int, check=check_count, key="f", flag="sae-features",
         help="how many SAE features to steer: those most more active on the source prompts than the target's"),
    Axis("sae_scale", default=(-3.0,), parse=float, check=check_real, key="s", flag="sae-scales",
         help="factor on the chosen features' activations (0 = ablation, 1 = no edit)"),
    Axis("sae_k", default=(32,), parse=int, check=check_count, key="k", flag="sae-k",
         help="active features per token of the TopK SAE"),
    BLEND,
    _SHARED[VECTOR_SEEDS],
)


def sae_feature_edit(lens: Lens, pair: ConceptPair, settings: dict, context: MethodContext) -> tuple[FeatureEdit, dict]:
    """The `FeatureEdit` of one setting (steps 1–4 of the module's docs) and what it records (``sae`` attrs)."""
    seeds = settings[VECTOR_SEEDS]
    if seeds < 2:
        raise ValueError(f"sae_steer trains an SAE on the vector seeds and measures it on held-out ones: "
                         f"vector_seeds must be at least 2, got {seeds}")
    layers = window_layers(settings["window"], lens.num_layers)
    store = capture(lens, pair.positive() + pair.negative(), seeds=list(range(seeds)), reduce=None, layers=layers,
                    num_inference_steps=context.num_inference_steps, guidance_scale=context.guidance_scale,
                    batch_size=context.batch_size, label="capture tokens for the SAE")
    training = store["attn2"].isel(seed=slice(0, seeds - max(1, round(0.25 * seeds)))).size // lens.width
    batch = min(1024, max(16, training // 8))  # tokens per step; a store of 16 seeds takes the default 1024
    sae = train_sae(store, k=settings["sae_k"], batch_size=batch, tokens=max(batch, min(2**18, 32 * training)),
                    progress=context.progress)
    top = top_features(store_feature_means(sae, store), pair.positive(), pair.negative(),
                       min(settings["sae_features"], sae.num_features))
    chosen = [int(f) for f in top.feature.values]
    steps = window_steps(settings["steps"], context.num_inference_steps)
    edit = FeatureEdit(sae, features=chosen, mode="scale", scale=settings["sae_scale"], at=At(sae.site, layers, steps))
    record = {"folder": str(sae.folder), "digest": sae.digest, "fvu": sae.fvu, "dead_rate": sae.dead_rate,
              "dense_rate": sae.dense_rate, "features": chosen, "difference": [float(d) for d in top.values]}
    return edit, record


def _run(lens: Lens, pair: ConceptPair, seeds: Sequence[int], settings: dict, *, context: MethodContext) -> xr.Dataset:
    edit, record = sae_feature_edit(lens, pair, settings, context)
    out = generate(lens, pair.source_prompt, seeds=seeds, edits=edit, num_inference_steps=context.num_inference_steps,
                   guidance_scale=context.guidance_scale, blend=settings["blend"], batch_size=context.batch_size,
                   progress=context.progress)
    out.attrs["sae"] = typed(record)
    return out


SAE_STEER = register(Method("sae_steer", AXES, _run,
                            description="scale (ablate) the SAE features the source concept turns on"))
