"""Linear probes on the embedded world: where is polyps vs normal cecum decodable, and where is the lesion?

1. **Item level** (`dit_lens.readouts.probes.probe`): one probe per (layer, step) separating runs of the captions of
   polyps and normal cecum (`dit_lens.world.procedural.caption`), on fresh seeds (``--seed-base`` …), split by
   seed; read from attn2's token mean on the conditional branch (the text attended to), and from the block
   output on the unconditional branch (empty prompt: only what the image latent carries). Accuracy, control
   accuracy (shuffled labels) and selectivity with 95 % bootstrap intervals over test runs, summarised per step.
2. **Token level**: a probe per (layer, step) of attn2's image tokens of polyps runs, labelled by the world's
   lesion *segmenter* on the generated images (a judge, not ground truth). The cell is chosen by ROC AUC on half
   of the test images and its map (8×8 grid, nearest-upsampled, thresholded at its mean) scored by IoU against
   the segmenter's mask on the other half, beside the ceiling the token grid sets (the mask's own token-area map,
   same threshold) and a position-only baseline (each token's lesion rate over the training images).

Captures are cached under ``cache/captures`` (content-addressed); results, figures and a sealed record go to
``--out`` (default ``cache/studies/probes``).

    python studies/probes.py [--quick] [--seeds 96] [--seed-base 200000] [--steps 20] [--out DIR]

``--quick``: 16 item seeds, 16 token seeds, 4 denoising steps, 200 bootstrap resamples (well under a minute).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

GUIDANCE = 4.5
CLASSES = ("polyps", "normal cecum")
QUICK = {"seeds": 16, "token_seeds": 16, "steps": 4, "n_boot": 200}


def parse(argv=None) -> argparse.Namespace:
    """The study's flags (the docs' checks parse commands with this)."""
    p = argparse.ArgumentParser(prog="probes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"the small version: {QUICK}")
    p.add_argument("--seeds", type=int, default=96, help="seeds per class for the item probes (default 96)")
    p.add_argument("--seed-base", type=int, default=200_000, help="first item seed (fresh: >= 200000)")
    p.add_argument("--token-seeds", type=int, default=64, help="polyps images for the token probe (default 64)")
    p.add_argument("--token-seed-base", type=int, default=200_100, help="first token seed (default 200100)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--out", default=None, help="output folder, claimed (default: cache/studies/probes)")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for key in ("seeds", "token_seeds", "steps"):
        if getattr(args, key) < (4 if key != "steps" else 1):
            p.error(f"--{key.replace('_', '-')} {getattr(args, key)} is too small (seeds >= 4, steps >= 1)")
    item = set(range(args.seed_base, args.seed_base + args.seeds))
    if item & set(range(args.token_seed_base, args.token_seed_base + args.token_seeds)):
        p.error("the item and token seed ranges overlap; move --token-seed-base")
    return args


def save_dataset(claim, name: str, ds) -> None:
    """Write `ds` as a Zarr store in the claimed folder, sealed by a digest over its data and attrs."""
    from dit_lens.storage import DIGEST, dataset_digest, exclusive
    from dit_lens.study.assembly import replace_zarr

    ds = ds.copy()
    ds.attrs[DIGEST] = dataset_digest(ds)
    claim.record(name)
    with exclusive(claim.path):
        replace_zarr(ds, claim.path / name)


def save_figure(claim, name: str, fig) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    claim.write(name, buffer.getvalue())


def interval(ds, name: str, **where) -> list[float]:
    cell = ds.sel(where) if where else ds
    return [round(float(cell[name + s]), 4) for s in ("", "_low", "_high")]


def item_summary(r, label: str) -> list[dict]:
    """Per step: the mean over layers, the best layer's accuracy and selectivity with intervals, the control."""
    n = 2 * len(r.attrs["test_seeds"])
    print(f"\n{label}: item probe, {len(r.attrs['train_seeds'])} training seeds, n = {n} test runs "
          f"(test seeds {r.attrs['test_seeds']}); 95% bootstrap intervals over test runs; the best layer is "
          f"picked on the test runs (optimistic)")
    rows = []
    for step in r.step.values.tolist():
        c = r.sel(step=step)
        best = int(c.layer[int(np.argmax(c.accuracy.values))])
        row = {"step": step, "n": n, "mean_accuracy": round(float(c.accuracy.mean()), 4), "best_layer": best,
               "accuracy": interval(c, "accuracy", layer=best), "selectivity": interval(c, "selectivity", layer=best),
               "control_accuracy": interval(c, "control_accuracy", layer=best),
               "control_mean": round(float(c.control_accuracy.mean()), 4)}
        rows.append(row)
        a, s, k = row["accuracy"], row["selectivity"], row["control_accuracy"]
        print(f"  step {step:2d}: mean over layers {row['mean_accuracy']:.3f}; best layer {best:2d} accuracy {a[0]:.3f} "
              f"[{a[1]:.3f}, {a[2]:.3f}] selectivity {s[0]:.3f} [{s[1]:.3f}, {s[2]:.3f}] control {k[0]:.3f} "
              f"[{k[1]:.3f}, {k[2]:.3f}] (n={n})")
    holds = float(((r.control_accuracy_low <= 0.5) & (r.control_accuracy_high >= 0.5)).mean())
    print(f"  control accuracy over cells: mean {float(r.control_accuracy.mean()):.3f}, range "
          f"[{float(r.control_accuracy.min()):.3f}, {float(r.control_accuracy.max()):.3f}]; share of cells whose "
          f"control interval holds 0.5: {holds:.3f}; converged everywhere: {bool(r.converged.all())}")
    return rows


def iou(map8: np.ndarray, mask: np.ndarray) -> float:
    """IoU of a token map (nearest-upsampled, thresholded at its mean) with a pixel mask."""
    scale = mask.shape[0] // map8.shape[0]
    big = np.kron(map8, np.ones((scale, scale))) >= map8.mean()
    return float((big & mask).sum() / max((big | mask).sum(), 1))


def token_grid_labels(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    n, h, w = masks.shape
    rows, cols = grid
    return masks.reshape(n, rows, h // rows, cols, w // cols).mean((2, 4)) >= 0.5  # (image, row, col)


def token_study(t, masks: np.ndarray, seeds: list[int], n_boot: int) -> dict:
    """Choose the cell by AUC on half the test images, score IoU on the other half; ceiling and position prior."""
    from sklearn.metrics import roc_auc_score

    from dit_lens.metrics.estimates import estimate

    index = {s: k for k, s in enumerate(seeds)}
    test, train = [int(s) for s in t.attrs["test_seeds"]], [int(s) for s in t.attrs["train_seeds"]]
    pick, score = test[: len(test) // 2], test[len(test) // 2:]
    grid = (t.sizes["row"], t.sizes["col"])
    y = token_grid_labels(masks, grid)

    def auc(cell, chosen):
        truth = y[[index[s] for s in chosen]].reshape(-1)
        if truth.all() or not truth.any():
            return float("nan")
        return float(roc_auc_score(truth, cell.probe_map.sel(seed=chosen).values.reshape(-1)))

    def ious(cell, chosen):
        return np.array([iou(cell.probe_map.sel(seed=s).values[0], masks[index[s]]) for s in chosen])

    aucs = np.array([[auc(t.sel(layer=l, step=s), pick) for s in t.step.values] for l in t.layer.values])
    li, si = np.unravel_index(int(np.nanargmax(aucs)), aucs.shape)
    cell = t.isel(layer=li, step=si)
    chosen = ious(cell, score)
    ceiling = np.array([iou(masks[index[s]].reshape(grid[0], masks.shape[1] // grid[0], grid[1], -1).mean((1, 3)),
                            masks[index[s]]) for s in score])
    prior = y[[index[s] for s in train]].mean(0)  # (row, col): each token's lesion rate over the training images
    position = np.array([iou(prior, masks[index[s]]) for s in score])
    truth_test = y[[index[s] for s in test]]
    position_auc = float(roc_auc_score(truth_test.reshape(-1), np.broadcast_to(prior, truth_test.shape).reshape(-1)))
    every = np.array([[ious(t.sel(layer=l, step=s), score).mean() for s in t.step.values] for l in t.layer.values])
    e = {k: estimate(v, resamples=n_boot, seed=0) for k, v in
         (("iou", chosen), ("ceiling", ceiling), ("position_iou", position))}
    best = t.isel(layer=li, step=si)
    out = {"selection_seeds": pick, "score_seeds": score, "layer": int(cell.layer), "step": int(cell.step),
           "selection_auc": round(float(aucs[li, si]), 4), "score_auc": round(auc(cell, score), 4),
           **{k: [round(v.value, 4), round(v.low, 4), round(v.high, 4), v.n] for k, v in e.items()},
           "position_auc": round(position_auc, 4), "auc_cell": interval(best, "auc"),
           "balanced_accuracy_cell": interval(best, "balanced_accuracy"),
           "control_balanced_accuracy_cell": interval(best, "control_balanced_accuracy"),
           "iou_over_cells": [round(float(every.min()), 4), round(float(np.median(every)), 4), round(float(every.max()), 4)],
           "lesion_token_share": round(float(y.mean()), 4), "lesion_pixel_share": round(float(masks.mean()), 4)}
    print(f"\ntoken probe (attn2, polyps runs, labels = the lesion segmenter's masks on the generated images): "
          f"{len(train)} training images, {len(test)} test images ({len(test) * grid[0] * grid[1]} tokens); lesion "
          f"pixels {out['lesion_pixel_share']:.3f}, lesion tokens {out['lesion_token_share']:.3f}")
    print(f"  AUC over cells: min {float(t.auc.min()):.3f} max {float(t.auc.max()):.3f}; control AUC mean "
          f"{float(t.control_auc.mean()):.3f}; control balanced accuracy mean {float(t.control_balanced_accuracy.mean()):.3f}")
    print(f"  cell chosen by AUC on {len(pick)} selection images (seeds {pick}): layer {out['layer']} step {out['step']} "
          f"(selection AUC {out['selection_auc']:.3f}; AUC on the {len(score)} scoring images {out['score_auc']:.3f}); "
          f"its test-set AUC {out['auc_cell'][0]:.3f} [{out['auc_cell'][1]:.3f}, {out['auc_cell'][2]:.3f}], balanced "
          f"accuracy {out['balanced_accuracy_cell'][0]:.3f} [{out['balanced_accuracy_cell'][1]:.3f}, "
          f"{out['balanced_accuracy_cell'][2]:.3f}]")
    print(f"  IoU (probe map > its mean vs the segmenter mask) on scoring seeds {score}: {e['iou']}")
    print(f"  ceiling (the mask's own token-area map > its mean): {e['ceiling']}")
    print(f"  position only (training images' lesion rate per token): IoU {e['position_iou']}; AUC on the test "
          f"tokens {position_auc:.3f}")
    print(f"  IoU on the scoring images over all cells: min {out['iou_over_cells'][0]:.3f} median "
          f"{out['iou_over_cells'][1]:.3f} max {out['iou_over_cells'][2]:.3f}")
    return out


def polyp_images(lens, prompt: str, seeds: list[int], steps: int) -> np.ndarray:
    """The images of the token capture's runs (the same seeds, steps and guidance), in batches of 8."""
    import torch

    images = []
    with torch.no_grad():
        for k in range(0, len(seeds), 8):
            batch = seeds[k:k + 8]
            out = lens.pipeline([prompt] * len(batch), generator=[lens.generator(s) for s in batch],
                                num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="np",
                                **lens.pipeline_kwargs)
            images.append(out.images)
    return np.concatenate(images)


def main(argv=None) -> int:
    args = parse(argv)
    import dit_lens
    from dit_lens.readouts.probes import probe
    from dit_lens.storage import cache_root, claimed, write_record
    from dit_lens.trace.attrs import typed
    from dit_lens.views.probes import probe_figure
    from dit_lens.world import load_segmenter
    from dit_lens.world.procedural import caption

    start = time.perf_counter()
    lens, segmenter = dit_lens.load("embedded"), load_segmenter("embedded")
    prompts = [caption(c) for c in CLASSES]
    labels = dict(zip(prompts, CLASSES))
    seeds = list(range(args.seed_base, args.seed_base + args.seeds))
    token_seeds = list(range(args.token_seed_base, args.token_seed_base + args.token_seeds))
    settings = {"seeds": seeds, "token_seeds": token_seeds, "num_inference_steps": args.steps,
                "guidance_scale": GUIDANCE, "n_boot": args.n_boot, "classes": list(CLASSES), "prompts": prompts,
                "quick": args.quick}
    out = Path(args.out) if args.out else cache_root() / "studies" / "probes"
    claim = claimed(out, "probes_study", identity={k: v for k, v in settings.items() if k != "prompts"},
                    overwrite=True, what="--out")
    common = dict(seeds=seeds, num_inference_steps=args.steps, guidance_scale=GUIDANCE, reduce="mean")
    print(f"item seeds {seeds[0]}-{seeds[-1]} ({len(seeds)} per class), token seeds {token_seeds[0]}-{token_seeds[-1]}, "
          f"{args.steps} steps, guidance {GUIDANCE}", flush=True)
    stores = {"attn2_cond": dit_lens.capture(lens, prompts, site="attn2", branch="cond", **common),
              "block_uncond": dit_lens.capture(lens, prompts, site="block", branch="uncond", **common)}
    record = {"study": "probes", **settings, **lens.provenance(), "segmenter": segmenter.fingerprint, "item": {}}
    for name, store in stores.items():
        r = probe(store, labels=labels, n_boot=args.n_boot, seed=0, progress=True)
        r.attrs.update(typed({**lens.provenance(), **settings, "probe": name}))
        save_dataset(claim, f"item_{name}.zarr", r)
        save_figure(claim, f"item_{name}.png", probe_figure(r))
        record["item"][name] = {"train_seeds": r.attrs["train_seeds"], "test_seeds": r.attrs["test_seeds"],
                                "per_step": item_summary(r, name.replace("_", " ")),
                                "control_mean": round(float(r.control_accuracy.mean()), 4)}
    tokens = dit_lens.capture(lens, [prompts[0]], seeds=token_seeds, num_inference_steps=args.steps,
                              guidance_scale=GUIDANCE, site="attn2", reduce=None)
    images = polyp_images(lens, prompts[0], token_seeds, args.steps)
    masks = np.asarray(segmenter(images), bool)  # (seed, H, W): the segmenter's lesion masks, used as labels
    t = probe(tokens, masks=masks, token_level=True, n_boot=args.n_boot, seed=0, progress=True)
    t.attrs.update(typed({**lens.provenance(), **settings, "probe": "token_attn2",
                          "labels_from": "lesion segmenter on the generated images"}))
    save_dataset(claim, "token_attn2.zarr", t)
    save_figure(claim, "token_attn2.png", probe_figure(t))
    record["token"] = {"train_seeds": t.attrs["train_seeds"], "test_seeds": t.attrs["test_seeds"],
                       **token_study(t, masks, token_seeds, args.n_boot)}
    claim.record("results.json")
    write_record(claim.path / "results.json", record)
    print(f"\nprobes: {time.perf_counter() - start:.0f} s; results in {claim.path} (results.json, item_attn2_cond.zarr, "
          f"item_block_uncond.zarr, token_attn2.zarr and their .png figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
