"""Zero-shot lesion segmentation on the embedded world: which kind of map finds the lesion?

Every map kind in `MAP_KINDS` reads one map of the lesion concept per image over the 8×8 image-token grid;
`dit_lens.segmentation_scores` scores it (bilinear upsampling, threshold at each map's mean, pixel accuracy,
mIoU, lesion IoU, mAP, bootstrap intervals over images) against

- **given images**: procedural renders of the world (`dit_lens.world.procedural.render`) with their true lesion
  masks, read as given images (encoded, noised, one denoiser call per noise level), and
- **generated images**: the world's own runs of the class's caption, scored against the lesion *segmenter*'s
  masks (a judge, not ground truth; images where it finds no lesion are left out and counted),

per class with lesions. Choices (noise levels, layers, steps) are tuned per map kind with ``--tune`` on seeds
100 000 … (never used for measuring) and fixed in `CHOSEN`; the measurement runs on fresh seeds 200 000 ….
Most kinds are zero-shot (no mask is seen); two are not, and the ``supervision`` column says so: ``probe`` (a
token-level linear probe trained on the masks of tuning seeds: the segmenter's for generated runs, the true ones
for given renders) and ``sae_feature`` (an unsupervised SAE trained on tuning-seed tokens, whose feature is
selected by its lesion IoU on the tuning seeds' masks). Both use tuning seeds 100 000 … only (as many as are
measured), recorded under ``trained_on_tuning_seeds`` with the probe's cell and the feature chosen.
A new map kind is one entry of `MAP_KINDS`: a function
``(lens, label, images_or_seeds, given) -> (maps (n, step, layer, row, col), images (n, H, W, 3))``, the lesion
maps of every step (noise level) and layer it can read and the images they are of; its choices go in `CHOSEN`.
Beside the kinds, the bounds the 8×8 grid sets: the true mask's share of each token, and random maps.

    python studies/segmentation.py [--quick] [--tune] [--n 32] [--seed-base 200000] [--sources given generated]
        [--kinds cross_attention output ...] [--classes polyps ...] [--out DIR]

``--quick``: one class, 4 images, 10 denoising steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import xarray as xr

import dit_lens
from dit_lens.features import sae_features, train_sae
from dit_lens.features.maps import image_features
from dit_lens.interventions import Steer
from dit_lens.methods import Vectors
from dit_lens.metrics.estimates import estimate
from dit_lens.metrics.segmentation import METRICS, segmentation_scores
from dit_lens.readouts.concept_maps import concept_maps
from dit_lens.readouts.probes import probe, probe_maps
from dit_lens.sampling import Denoiser, encode, noise_field, noised
from dit_lens.storage import cache_root, claimed, write_record
from dit_lens.trace.capture import capture
from dit_lens.trace.runner import scheduler_timesteps, traced_generate
from dit_lens.world import endoscopy_pair, load_segmenter
from dit_lens.world.procedural import caption, render

#: Classes with lesions, each with the normal class of its anatomy (the contrast concept and MedSteer's target).
CLASSES = {"polyps": "normal cecum", "dyed lifted polyps": "normal cecum", "dyed resection margins": "normal cecum",
           "ulcerative colitis": "normal cecum", "esophagitis": "normal z-line"}
LEVELS = (0.05, 0.1, 0.2, 0.3, 0.5)  # noise levels read from given images (the tuning picks among them)
T, GUIDANCE, VECTOR_SEEDS = 20, 4.5, 16
TUNE_BASE = 100_000


@dataclass(frozen=True)
class MapKind:
    """One kind of map: ``read(lens, label, source, given)`` -> lesion maps ``(n, step, layer, row, col)`` and the
    images ``(n, H, W, 3)`` they are of; `source` is the images (given) or the seeds (generated)."""

    read: Callable
    about: str
    supervision: str = "zero-shot"


def _concept(kind: str, space: str = "prototype") -> Callable:
    def read(lens, label, source, given):
        common = dict(prompt=caption(label), kind=kind, output_space=space, progress=False)
        concepts = [label] if kind == "cross_attention" else [label, CLASSES[label]]
        if given:
            ds = concept_maps(lens, source, concepts=concepts, noise_levels=LEVELS, seeds=[0], **common)
        else:
            ds = concept_maps(lens, seeds=source, concepts=concepts, num_inference_steps=T, guidance_scale=GUIDANCE,
                              **common)
        return ds["map"].sel(concept=label).values, ds["image"].values
    return read


_VECTORS: dict = {}


def _gates(lens, label, source, given):
    """MedSteer's gate g = max(0, h·v) of the class's concept vector (lesion class − normal class, 16 seeds) on
    attn2's output, at every layer; generated: recorded on a run steered with α = 0 (the plain run); given: at
    each noise level, with the vector of the step whose timestep is nearest."""
    if T not in _VECTORS:
        _VECTORS[T] = Vectors(lens, seeds=VECTOR_SEEDS, num_inference_steps=T, guidance_scale=GUIDANCE)
    vector = _VECTORS[T](endoscopy_pair(label, CLASSES[label]))  # (step, layer, channel), unit
    rows, cols = lens.token_grid
    if not given:
        out = dit_lens.generate(lens, caption(label), seeds=source, steer=Steer(vector, alpha=0.0),
                                record_gates=True, num_inference_steps=T, guidance_scale=GUIDANCE, progress=False)
        return out["gate"].isel(prompt=0).values, out["image"].isel(prompt=0).sel(branch="original").values
    latents = encode(lens, source)
    noise = noise_field(latents, 0)
    times = scheduler_timesteps(lens, T)
    maps = np.zeros((len(source), len(LEVELS), lens.num_layers, rows * cols), np.float32)
    denoiser, handles, state = Denoiser(lens, [caption(label)]), [], {}
    for layer in range(lens.num_layers):
        def hook(_m, _a, out, layer=layer):
            v = torch.from_numpy(vector.isel(step=state["step"]).sel(layer=layer).values).to(out)
            maps[:, state["level"], layer] = (out @ v).clamp(min=0).numpy()
        handles.append(lens.site_module("attn2", layer).register_forward_hook(hook))
    try:
        for i, level in enumerate(LEVELS):
            noisy, t = noised(lens, latents, noise, level)
            state.update(level=i, step=int(np.abs(times - t).argmin()))
            denoiser.raw(noisy, t, [0] * len(source))
    finally:
        for h in handles:
            h.remove()
    return maps.reshape(len(source), len(LEVELS), lens.num_layers, rows, cols), source


# Kinds trained (probe) or selected (SAE feature) with masks: on seeds TUNE_BASE … TUNE_BASE + TRAIN_N − 1, never
# the measured ones; generated: the segmenter's masks of the tuning-seed runs, given: the tuning renders' true masks.
TRAIN_N = 32
SAE_SETTINGS = {"k": 8, "expansion": 4, "tokens": 2**15, "batch_size": 256}
_TRAINED: dict = {}


def _train_seeds() -> list[int]:
    return list(range(TUNE_BASE, TUNE_BASE + TRAIN_N))


def _runs(lens, label, seeds):
    """The generated runs' images ``(n, H, W, 3)`` (the same runs every capture of these seeds records)."""
    return traced_generate(lens, [caption(label)] * len(seeds), list(seeds), num_inference_steps=T,
                           guidance_scale=GUIDANCE, hooks=[], output_type="np").images


def _train_store(lens, label):
    """The tuning-seed token capture (attn2, every layer and step, ``reduce=None``) of the class's caption, the
    segmenter's masks of its images and the store's path; stored under the cache, reused when complete."""
    key = ("store", label, T, TRAIN_N)
    if key not in _TRAINED:
        path = cache_root() / "studies" / "segmentation-train" / f"{label.replace(' ', '_')}-n{TRAIN_N}-T{T}.zarr"
        capture(lens, [caption(label)], seeds=_train_seeds(), num_inference_steps=T, guidance_scale=GUIDANCE,
                reduce=None, store=path, label="segmentation study training capture")
        _TRAINED[key] = (path, load_segmenter()(_runs(lens, label, _train_seeds())))
    return _TRAINED[key]


def _given_tokens(lens, label, images) -> xr.Dataset:
    """attn2's image tokens of given images, read like `_gates` (one denoiser call per noise level), as a capture
    ``(prompt, seed, step, layer, token, channel)`` with the levels as steps and the images as seeds."""
    latents = encode(lens, images)
    noise = noise_field(latents, 0)
    rows, cols = lens.token_grid
    values, denoiser, handles, state = None, Denoiser(lens, [caption(label)]), [], {}
    for layer in range(lens.num_layers):
        def hook(_m, _a, out, layer=layer):
            h = lens.part(layer).read("attn2", out, lens.text_tokens()).float().numpy()
            nonlocal values
            if values is None:
                values = np.zeros((1, len(images), len(LEVELS), lens.num_layers, rows * cols, h.shape[-1]), np.float32)
            values[0, :, state["level"], layer] = h
        handles.append(lens.site_module("attn2", layer).register_forward_hook(hook))
    try:
        for i, level in enumerate(LEVELS):
            state["level"] = i
            denoiser.raw(*noised(lens, latents, noise, level), [0] * len(images))
    finally:
        for h in handles:
            h.remove()
    return xr.Dataset({"attn2": (("prompt", "seed", "step", "layer", "token", "channel"), values)},
                      coords={"prompt": [caption(label)], "seed": range(len(images)), "step": range(len(LEVELS)),
                              "layer": range(lens.num_layers)},
                      attrs={"token_grid": [rows, cols], "model_fingerprint": lens.fingerprint})


def _probe(lens, label, source, given):
    """A token-level linear probe (`dit_lens.probe`) on attn2 at every (layer, step/level), trained on half the
    tuning seeds' masks; the cell with the best AUC on the other half (ties: balanced accuracy) maps the measured
    images, the same map at every step and layer of the returned array."""
    key = ("probe", given, label, T, TRAIN_N)
    if key not in _TRAINED:
        if given:
            truth = render([label] * TRAIN_N, _train_seeds())
            runs, masks = _given_tokens(lens, label, truth.images), truth.lesion
        else:
            runs, masks = _train_store(lens, label)[0], _train_store(lens, label)[1]
        result = probe(runs, masks=masks, token_level=True, n_controls=1, n_boot=100, progress=False)
        auc, balanced = (np.nan_to_num(result[m].transpose("layer", "step").values.ravel(), nan=-1.0)
                         for m in ("auc", "balanced_accuracy"))
        layer, step = np.unravel_index(int(np.lexsort((balanced, auc))[-1]),  # ties in AUC: balanced accuracy
                                       (result.sizes["layer"], result.sizes["step"]))
        cell = {"layer": int(result["layer"][layer]), "step": int(result["step"][step])}
        _TRAINED[key] = (result, cell)
        TRAINED_INFO[f"{'given' if given else 'generated'}/probe/{label}"] = {
            **cell, "test_auc": round(float(result["auc"].isel(layer=layer, step=step)), 4), "seeds": _train_seeds()}
    result, cell = _TRAINED[key]
    if given:
        maps, images = probe_maps(result, _given_tokens(lens, label, source), **cell).values[0], source
    else:
        maps = probe_maps(result, lens, prompts=[caption(label)], seeds=source, **cell).values[0]
        images = _runs(lens, label, source)
    count = len(LEVELS) if given else T
    return np.broadcast_to(maps[:, None, None], (len(maps), count, lens.num_layers, *maps.shape[1:])), images


def _iou(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Mean lesion IoU over images of maps ``(n, feature, row, col)`` thresholded at each map's mean, against
    boolean masks ``(n, H, W)``, at nearest upsampling (a token's pixels share its value):
    ∑ p·s / ∑ (p + s − p·s), with p the thresholded token and s the mask's share of the token's pixels."""
    n, _, rows, cols = maps.shape
    share = masks.reshape(n, rows, masks.shape[1] // rows, cols, -1).mean((2, 4))[:, None]
    pred = (maps > maps.mean((2, 3), keepdims=True)).astype(np.float64)
    union = (pred + share - pred * share).sum((2, 3))
    return np.where(union > 0, (pred * share).sum((2, 3)) / np.maximum(union, 1e-12), 0.0).mean(0)


def _sae_feature(lens, label, source, given):
    """A TopK SAE (`dit_lens.train_sae`) on the tuning-seed token capture (attn2, blocks of the upper half, every
    step); the feature whose map (mean over those blocks and the kind's chosen steps or levels) has the best lesion
    IoU on the tuning seeds is mapped on the measured ones (`sae_features`, given images `image_features`), the
    mean over the SAE's blocks at every step or level, the same at every layer of the returned array."""
    src = "given" if given else "generated"
    key = ("sae", given, label, T, TRAIN_N)
    if key not in _TRAINED:
        path, masks = _train_store(lens, label)
        layers = list(range(lens.num_layers // 2, lens.num_layers))
        sae = train_sae(path, layers=layers, progress=False, **SAE_SETTINGS)
        choice = CHOSEN.get((src, "sae_feature"), DEFAULT[src])
        if given:
            truth = render([label] * TRAIN_N, _train_seeds())
            acts, masks = image_features(sae, lens, truth.images, prompt=caption(label), noise_levels=LEVELS), \
                truth.lesion
            pooled_maps = acts["activation"].isel(level=list(choice["levels"])).mean(("level", "layer")).values
        else:
            acts = xr.open_zarr(path)["attn2"].sel(layer=layers).isel(prompt=0)
            steps = [t for t in range(T) if choice["steps"][0] * T <= t < choice["steps"][1] * T]
            rows, cols = lens.token_grid
            pooled_maps = np.stack([sae.encode(torch.from_numpy(acts.sel(seed=s).isel(step=steps).values)).mean((0, 1))
                                    .T.reshape(-1, rows, cols).numpy() for s in _train_seeds()])
        iou = _iou(pooled_maps, masks)
        best = int(np.argmax(iou))
        _TRAINED[key] = (sae, best)
        TRAINED_INFO[f"{src}/sae_feature/{label}"] = {"feature": best, "tuning_iou": round(float(iou[best]), 4),
                                                      "sae_fvu": round(float(sae.fvu), 4), "layers": layers,
                                                      "seeds": _train_seeds(), **SAE_SETTINGS}
    sae, best = _TRAINED[key]
    if given:
        acts = image_features(sae, lens, source, prompt=caption(label), noise_levels=LEVELS, features=[best])
        maps, images = acts["activation"].isel(feature=0).mean("layer").values, source  # (n, level, row, col)
    else:
        acts = sae_features(sae, lens, [caption(label)], seeds=source, num_inference_steps=T, guidance_scale=GUIDANCE,
                            features=[best], progress=False)
        maps = acts["activation"].isel(prompt=0, feature=0).mean("layer").values  # (n, step, row, col)
        images = acts["image"].isel(prompt=0).values
    return np.broadcast_to(maps[:, :, None], (maps.shape[0], maps.shape[1], lens.num_layers, *maps.shape[2:])), images


#: Where the trained and selected kinds ended up (cell, feature, its tuning IoU), per source, kind and class.
TRAINED_INFO: dict = {}


#: The map kinds compared. Add one entry per new kind of map.
MAP_KINDS = {
    "cross_attention": MapKind(_concept("cross_attention"), "cross-attention word maps (DAAM-style)"),
    "output": MapKind(_concept("output"), "output-space concept maps, o_c the image outputs the concept attends to"),
    "output_value": MapKind(_concept("output", "value"), "output-space maps, o_c = to_out(to_v(e_c)) (alternative)"),
    "output_key": MapKind(_concept("output", "key"), "concept maps from the logits q_x·k_c (alternative)"),
    "medsteer_gate": MapKind(_gates, "MedSteer gate maps max(0, h·v)"),
    "probe": MapKind(_probe, "token-level linear probe on attn2, its best-AUC (layer, step) cell",
                     "trained on tuning-seed masks"),
    "sae_feature": MapKind(_sae_feature, "the lesion-IoU-best feature of a TopK SAE on attn2",
                           "feature selected on tuning seeds"),
}
#: What the bounds are, in the supervision column.
REFERENCE = "reference (not a model map)"

#: The kind every other kind is compared with, image by image.
BASELINE = "cross_attention"
#: Not maps of the model: the bounds the 8×8 token grid sets (given images, whose true masks are known).
BOUNDS = ("bound_truth_on_grid", "bound_random")

#: Choices per (source, map kind), fixed from ``--tune`` on seeds 100 000 … (``levels``: indices into LEVELS for
#: given images, steps as fractions of the run for generated ones; layers as fractions of the depth).
CHOSEN: dict = {  # python studies/segmentation.py --tune --n 16 (seeds 100000-100015, 5 classes, n = 80 per source)
    ("given", "cross_attention"): {"levels": (2,), "layers": (0.75, 1.0)},
    ("given", "output"): {"levels": (1,), "layers": (0.5, 1.0)},
    ("given", "output_value"): {"levels": (2,), "layers": (0.75, 1.0)},
    ("given", "output_key"): {"levels": (2,), "layers": (0.75, 1.0)},
    ("given", "medsteer_gate"): {"levels": (0, 1), "layers": (0.0, 1.0)},
    ("generated", "cross_attention"): {"steps": (0.5, 1.0), "layers": (0.75, 1.0)},
    ("generated", "output"): {"steps": (0.75, 1.0), "layers": (0.5, 1.0)},
    ("generated", "output_value"): {"steps": (0.5, 1.0), "layers": (0.75, 1.0)},
    ("generated", "output_key"): {"steps": (0.5, 1.0), "layers": (0.75, 1.0)},
    ("generated", "medsteer_gate"): {"steps": (0.5, 1.0), "layers": (0.75, 1.0)},
}
DEFAULT = {"given": {"levels": (1,), "layers": (0.0, 1.0)}, "generated": {"steps": (0.0, 1.0), "layers": (0.0, 1.0)}}
LAYERS = ((0.0, 1.0), (0.0, 0.5), (0.5, 1.0), (0.25, 0.75), (0.75, 1.0))
GRID = {"given": [{"levels": lv, "layers": ly} for lv in ((0,), (1,), (2,), (3,), (4,), (0, 1), (0, 1, 2))
                  for ly in LAYERS],
        "generated": [{"steps": st, "layers": ly} for st in ((0.0, 1.0), (0.0, 0.5), (0.5, 1.0), (0.75, 1.0))
                      for ly in LAYERS]}


def pooled(maps: np.ndarray, source: str, choice: dict, depth: int) -> np.ndarray:
    """The mean over the chosen steps (levels) and layers of ``(n, step, layer, row, col)`` maps."""
    low, high = choice["layers"]
    layers = [l for l in range(depth) if low * depth <= l < max(high * depth, low * depth + 1)]
    if source == "given":
        steps = list(choice["levels"])
    else:
        count = maps.shape[1]
        steps = [t for t in range(count) if choice["steps"][0] * count <= t < choice["steps"][1] * count]
    return maps[:, steps][:, :, layers].mean((1, 2))


def read_all(lens, labels, n, base, sources, kinds, segmenter):
    """``{(source, label, kind): (maps (n, step, layer, r, c), masks)}`` for seeds ``base … base + n − 1``."""
    out, left_out = {}, {}
    for label in labels:
        seeds = list(range(base, base + n))
        truth = render([label] * n, seeds)
        for source in sources:
            for kind in kinds:
                start = time.perf_counter()
                images = truth.images if source == "given" else seeds
                maps, made = MAP_KINDS[kind].read(lens, label, images, source == "given")
                masks = truth.lesion if source == "given" else segmenter(made)
                keep = masks.reshape(n, -1).any(1) & ~masks.reshape(n, -1).all(1)
                left_out[(source, label)] = int((~keep).sum())
                out[(source, label, kind)] = (maps[keep], masks[keep])
                print(f"  read {source} {label!r} {kind}: {time.perf_counter() - start:.1f} s", flush=True)
            if source == "given":  # what the token grid allows: the true mask's share of each token, and noise
                shape = (n, len(LEVELS), lens.num_layers, *lens.token_grid)
                rows, cols = lens.token_grid
                share = truth.lesion.reshape(n, rows, truth.lesion.shape[1] // rows, cols, -1).mean((2, 4))
                noise = np.random.default_rng(base).random((n, *lens.token_grid))
                for kind, grid in (("bound_truth_on_grid", share), ("bound_random", noise)):
                    out[(source, label, kind)] = (np.broadcast_to(grid[:, None, None], shape), truth.lesion)
    return out, left_out


def parse(argv=None) -> argparse.Namespace:
    """The study's flags (the docs' checks parse commands with this)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one class, 4 images, 10 denoising steps")
    parser.add_argument("--tune", action="store_true", help="pick each kind's choices on seeds 100000+")
    parser.add_argument("--n", type=int, default=32, help="images per class (default 32)")
    parser.add_argument("--seed-base", type=int, default=200_000, help="first seed measured (fresh: >= 200000)")
    parser.add_argument("--sources", nargs="+", default=["given", "generated"], choices=["given", "generated"])
    parser.add_argument("--kinds", nargs="+", default=list(MAP_KINDS), choices=list(MAP_KINDS))
    parser.add_argument("--classes", nargs="+", default=list(CLASSES), choices=list(CLASSES))
    parser.add_argument("--out", default=None, help="output folder (claimed; default: cache/studies/segmentation-...)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    global T, TRAIN_N
    labels, n, base = args.classes, args.n, args.seed_base
    TRAIN_N = n
    if args.quick:
        labels, n, T, TRAIN_N = labels[:1], 4, 10, 4
    if args.tune:
        base = TUNE_BASE
        print("tuning: the probe and SAE-feature kinds are trained and selected on these same seeds (in-sample)")
    elif base < 200_000:
        print("measuring on seeds below 200000 (tuning seeds); pass --tune to tune", file=sys.stderr)
    lens, segmenter = dit_lens.load("embedded"), load_segmenter()
    reads, left_out = read_all(lens, labels, n, base, args.sources, args.kinds, segmenter)
    results, chosen, per_image = [], {}, {}
    for source in args.sources:
        bounds = BOUNDS if source == "given" else ()
        for kind in list(args.kinds) + list(bounds):
            grid = GRID[source] if args.tune and kind not in bounds else [CHOSEN.get((source, kind), DEFAULT[source])]
            best = None
            for choice in grid:
                maps = np.concatenate([pooled(reads[(source, l, kind)][0], source, choice, lens.num_layers)
                                       for l in labels])
                masks = np.concatenate([reads[(source, l, kind)][1] for l in labels])
                miou = float(segmentation_scores(maps, masks, n_boot=20)["miou"].mean())
                if best is None or miou > best[0]:
                    best = (miou, choice)
            chosen[(source, kind)] = best[1]
            for label in labels + ["all"]:
                use = labels if label == "all" else [label]
                maps = np.concatenate([pooled(reads[(source, l, kind)][0], source, best[1], lens.num_layers)
                                       for l in use])
                masks = np.concatenate([reads[(source, l, kind)][1] for l in use])
                scored = segmentation_scores(maps, masks, n_boot=1000, seed=0)
                per_image[(source, kind, label)] = scored["miou"].values
                scores = scored["summary"]
                supervision = MAP_KINDS[kind].supervision if kind in MAP_KINDS else REFERENCE
                row = {"source": source, "kind": kind, "class": label, "supervision": supervision,
                       "n": int(len(maps)), "choice": best[1],
                       **{m: [round(float(x), 4) for x in scores.sel(metric=m).values] for m in METRICS}}
                base_kind = (source, BASELINE, label)
                if kind != BASELINE and base_kind in per_image:  # the same images: a paired difference
                    gap = estimate(per_image[(source, kind, label)] - per_image[base_kind], resamples=1000, seed=0)
                    row[f"miou_minus_{BASELINE}"] = [round(x, 4) for x in (gap.value, gap.low, gap.high)]
                results.append(row)
                gap = row.get(f"miou_minus_{BASELINE}")
                versus = f"  miou - {BASELINE} {gap[0]:+.3f} [{gap[1]:+.3f}, {gap[2]:+.3f}]" if gap else ""
                print(f"{source:9s} {kind:19s} {label:24s} n={row['n']:3d} " + "  ".join(
                    f"{m} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for m, v in row.items() if m in METRICS) + versus
                    + f"  ({supervision})" * (supervision != "zero-shot"),
                    flush=True)
    if args.tune:
        print("CHOSEN =", {k: v for k, v in chosen.items()})
    record = {"study": "segmentation", "tuned" if args.tune else "measured": True, "seeds": [base, base + n - 1],
              "classes": labels, "num_inference_steps": T, "guidance_scale": GUIDANCE, "levels": LEVELS,
              "left_out_no_lesion": {f"{s}/{l}": v for (s, l), v in left_out.items()},
              "chosen": {f"{s}/{k}": v for (s, k), v in chosen.items()}, "results": results,
              "trained_on_tuning_seeds": {f"{s}/{k}/{l}": TRAINED_INFO[f"{s}/{k}/{l}"] for s in args.sources
                                          for k in args.kinds for l in labels if f"{s}/{k}/{l}" in TRAINED_INFO},
              "segmenter": segmenter.fingerprint, **lens.provenance()}
    identity = {"quick": args.quick, "tune": args.tune, "n": n, "seed_base": base}
    out = Path(args.out) if args.out else cache_root() / "studies" / (
        f"segmentation-n{n}-s{base}" + "-quick" * args.quick + "-tune" * args.tune)
    claim = claimed(out, "segmentation_study", identity=identity, what="--out")
    name = "tuning.json" if args.tune else "results.json"
    claim.record(name)
    write_record(claim.path / name, record)
    print(f"wrote {claim.path / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
