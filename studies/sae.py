"""A sparse autoencoder of attn2 on the embedded world: how well it reconstructs, where its features fire, what
removing or reversing the polyp features does.

1. **Capture and train**: attn2's image tokens (``reduce=None``) of the captions of polyps and normal cecum
   (`dit_lens.world.procedural.caption`) on fresh seeds (``--seed-base`` …), at the blocks ``--layers``; a TopK
   SAE (`dit_lens.features.train_sae`, ``--k``, ``--expansion``) on them, its last quarter of seeds held out.
   FVU, dead and dense rates on the held-out tokens; FVU and dense rate with 95 % bootstrap intervals over held-out
   (prompt, seed) cells, the dead rate with a Wilson interval over features.
2. **Lesion map**: feature maps (`dit_lens.features.sae_features`) of polyps runs (seeds base + 100 …), averaged
   over steps, per block and over all blocks, bilinearly upsampled and thresholded at their mean; the (feature,
   block) of best mean IoU against the world's lesion *segmenter* (a judge on generated images, not ground
   truth) on the first half of the seeds, its IoU reported on the second half, beside the same score of the
   segmenter mask's own token-grid average (the ceiling the 8×8 grid sets).
3. **Splice cost**: runs whose attn2 output at the SAE's blocks (every step, both guidance halves) is replaced by
   the reconstruction x̂, against the plain runs (seeds base + 500 …): PSNR and the oracle's verdicts.
4. **Edits** (`dit_lens.interventions.FeatureEdit`): the ``--features`` features most more active on polyps than
   on normal cecum in the training store (`store_feature_means`, `top_features`), ablated and scaled by
   ``--scale``, on polyps runs (seeds base + 400 …): flip rate (the oracle no longer reads polyps), rate read as
   normal cecum (Wilson intervals) and Bg-SSIM outside the segmenter's lesion masks (bootstrap interval).

The capture is cached under ``cache/captures``; the SAE, a sealed record and nothing else go to ``--out``
(default ``cache/studies/sae``).

    python studies/sae.py [--quick] [--layers 6 7 8 9 10 11] [--k 32] [--expansion 4] [--seeds 16] [--out DIR]

``--quick``: 4 store seeds, 4 steps, 16 384 training tokens, 8 map, 4 splice and 8 edit seeds (about a minute).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

GUIDANCE = 4.5
SOURCE, TARGET = "polyps", "normal cecum"
#: Where each seed set starts, after ``--seed-base`` (each set must stay below the next offset).
OFFSETS = {"seeds": 0, "map_seeds": 100, "edit_seeds": 400, "splice_seeds": 500}
QUICK = {"seeds": 4, "steps": 4, "tokens": 16_384, "batch_size": 256, "map_seeds": 8, "splice_seeds": 4,
         "edit_seeds": 8, "features": 16, "n_boot": 200}


def parse(argv=None) -> argparse.Namespace:
    """The study's flags (the docs' checks parse commands with this)."""
    p = argparse.ArgumentParser(prog="sae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"the small version: {QUICK}")
    p.add_argument("--layers", type=int, nargs="+", default=list(range(6, 12)), help="blocks the SAE reads (default 6-11)")
    p.add_argument("--k", type=int, default=32, help="active features per token (default 32)")
    p.add_argument("--expansion", type=int, default=4, help="features per channel (default 4)")
    p.add_argument("--tokens", type=int, default=2**18, help="training tokens (default 262144)")
    p.add_argument("--batch-size", type=int, default=1024, help="tokens per optimiser step (default 1024)")
    p.add_argument("--seeds", type=int, default=16, help="store seeds per class; the last quarter held out (default 16)")
    p.add_argument("--seed-base", type=int, default=200_000, help="first seed (fresh: >= 200000)")
    p.add_argument("--map-seeds", type=int, default=32, help="polyps runs for the lesion map, half to choose (default 32)")
    p.add_argument("--splice-seeds", type=int, default=16, help="runs per class for the splice cost (default 16)")
    p.add_argument("--edit-seeds", type=int, default=32, help="polyps runs per edit (default 32)")
    p.add_argument("--features", type=int, default=64, help="top polyp features edited (default 64)")
    p.add_argument("--scale", type=float, default=-3.0, help="the scale edit's factor (default -3)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--out", default=None, help="output folder, claimed (default: cache/studies/sae)")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.seeds < 4 or args.map_seeds < 2 or min(args.splice_seeds, args.edit_seeds, args.features, args.steps) < 1:
        p.error("--seeds must be >= 4 (a quarter is held out), --map-seeds >= 2, the others >= 1")
    stops = sorted(OFFSETS.values()) + [10**9]
    for key, offset in OFFSETS.items():
        if getattr(args, key) > stops[stops.index(offset) + 1] - offset:
            p.error(f"--{key.replace('_', '-')} {getattr(args, key)} would overlap the next seed set (offsets {OFFSETS})")
    return args


def seeds_of(args, key: str) -> list[int]:
    start = args.seed_base + OFFSETS[key]
    return list(range(start, start + getattr(args, key)))


def quality(sae, n_boot: int) -> dict:
    """FVU, dead and dense rates on the held-out seeds, each with a bootstrap interval over (prompt, seed) cells."""
    import torch
    import xarray as xr

    from dit_lens.metrics.estimates import proportion

    da = xr.open_zarr(sae.store["path"])[sae.site].sel(seed=list(sae.store["held_out_seeds"]), layer=list(sae.layers),
                                                     step=list(sae.steps))
    err, sq, sums, counts, fired = [], [], [], [], []
    for p in da.prompt.values:
        for s in da.seed.values:
            x = torch.from_numpy(np.asarray(da.sel(prompt=p, seed=s).values).reshape(-1, sae.width))  # (tokens, C)
            z = sae.encode(x)  # (tokens, features)
            err.append(float(((x - sae.decode(z)).double() ** 2).sum()))
            sq.append(float((x.double() ** 2).sum()))
            sums.append(x.double().sum(0).numpy())
            counts.append(len(x))
            fired.append((z > 0).sum(0).numpy())
    err, sq, sums, counts, fired = map(np.array, (err, sq, sums, counts, fired))

    def figures(idx):
        n = counts[idx].sum()
        rate = fired[idx].sum(0) / n
        return (err[idx].sum() / (sq[idx].sum() - (sums[idx].sum(0) ** 2).sum() / n),
                float((rate == 0).mean()), float((rate > 0.1).mean()))

    point = figures(np.arange(len(counts)))
    rng = np.random.default_rng(0)
    boots = np.array([figures(rng.integers(0, len(counts), len(counts))) for _ in range(n_boot)])
    out = {name: [round(float(point[i]), 5), *(round(float(np.percentile(boots[:, i], q)), 5) for q in (2.5, 97.5)),
                  len(counts)] for i, name in ((0, "fvu"), (2, "dense_rate"))}
    # a resample of cells holds fewer distinct tokens, so a bootstrap of "never fired" is biased upwards: the dead
    # rate's interval is Wilson's over the features instead
    dead = proportion(fired.sum(0) == 0)
    out["dead_rate"] = [round(dead.value, 5), round(dead.low, 5), round(dead.high, 5), dead.n]
    out["tokens"] = int(counts.sum())
    return out


def lesion_map(sae, lens, segmenter, seeds: list[int], steps: int, n_boot: int) -> dict:
    """Best (feature, block) by map IoU with the segmenter on the first half of `seeds`, scored on the second."""
    import torch

    from dit_lens.features import sae_features
    from dit_lens.metrics.estimates import estimate
    from dit_lens.world.procedural import caption

    acts, masks = [], []
    for k in range(0, len(seeds), 8):  # 8 runs at a time: the maps of every feature stay small
        maps = sae_features(sae, lens, [caption(SOURCE)], seeds=seeds[k:k + 8], num_inference_steps=steps,
                            guidance_scale=GUIDANCE, progress=True)
        acts.append(maps.activation.mean("step").values[0])  # (seed, layer, feature, row, col)
        masks.append(np.asarray(segmenter(maps.image.values[0]), bool))  # (seed, H, W)
    act, masks = np.concatenate(acts), np.concatenate(masks)
    act = np.concatenate([act, act.mean(1, keepdims=True)], 1)  # the last "block": the mean over blocks
    n, blocks, features, rows, cols = act.shape
    size = masks.shape[1:]

    def up(x):  # (..., rows, cols) -> (..., H, W) bilinear
        t = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, 1, rows, cols), np.float32))
        return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False).numpy()

    def iou(maps, mask):  # maps (m, H, W), mask (H, W)
        thr = maps > maps.mean((-2, -1), keepdims=True)
        union = (thr | mask).sum((-2, -1))
        return np.where(union > 0, (thr & mask).sum((-2, -1)) / np.maximum(union, 1), 0.0)

    scores = np.stack([iou(up(act[i]).reshape(blocks * features, *size), masks[i]) for i in range(n)])
    scores = scores.reshape(n, blocks, features)
    pick, score = slice(0, n // 2), slice(n // 2, n)
    chosen = scores[pick].mean(0)
    b, f = np.unravel_index(int(np.argmax(chosen)), chosen.shape)
    grid = masks.reshape(n, rows, size[0] // rows, cols, size[1] // cols).mean((2, 4))
    ceiling = np.array([iou(up(grid[i]), masks[i])[0] for i in range(n)])
    names = [str(x) for x in sae.layers] + ["mean over blocks"]
    e, c = estimate(scores[score, b, f], resamples=n_boot, seed=0), estimate(ceiling[score], resamples=n_boot, seed=0)
    out = {"selection_seeds": seeds[pick], "score_seeds": seeds[score], "feature": int(f), "block": names[b],
           "selection_iou": round(float(chosen[b, f]), 4), "iou": [round(e.value, 4), round(e.low, 4), round(e.high, 4), e.n],
           "ceiling": [round(c.value, 4), round(c.low, 4), round(c.high, 4), c.n],
           "per_image_iou": [round(float(x), 4) for x in scores[score, b, f]],
           "lesion_pixel_share": round(float(masks.mean()), 4), "images_with_lesion": int(masks.reshape(n, -1).any(1).sum())}
    print(f"\nlesion map: lesion pixels {out['lesion_pixel_share']:.3f}, images with a lesion "
          f"{out['images_with_lesion']}/{n}; best on selection seeds {seeds[pick][0]}-{seeds[pick][-1]}: feature {f} at "
          f"block {names[b]} (IoU {chosen[b, f]:.3f}); on seeds {seeds[score][0]}-{seeds[score][-1]}: IoU {e}; ceiling "
          f"(the mask's own token-grid average, same upsampling and threshold) {c}")
    return out


def splice(sae, lens, oracle, seeds: list[int], steps: int, n_boot: int) -> dict:
    """PSNR and oracle verdicts of runs with attn2 replaced by the SAE's reconstruction, against plain runs."""
    from tqdm.auto import tqdm

    from dit_lens.metrics.estimates import estimate, proportion
    from dit_lens.trace.runner import Hook, traced_generate
    from dit_lens.world.procedural import caption

    replace = Hook(sae.site, sae.layers, lambda t, l, h: sae.decode(sae.encode(h)).to(h.dtype))
    out = {}
    for label in (SOURCE, TARGET):
        runs = {"plain": [], "spliced": []}
        for k in tqdm(range(0, len(seeds), 8), desc=f"splice {label}", unit="batch"):
            batch = seeds[k:k + 8]
            for name, hooks in (("plain", []), ("spliced", [replace])):
                runs[name].append(traced_generate(lens, [caption(label)] * len(batch), batch, num_inference_steps=steps,
                                                  guidance_scale=GUIDANCE, hooks=hooks, output_type="np").images)
        runs = {k: np.concatenate(v) for k, v in runs.items()}
        mse = ((runs["plain"] - runs["spliced"]) ** 2).mean((1, 2, 3))
        psnr = 10 * np.log10(1 / np.maximum(mse, 1e-12))
        read = {k: np.array(oracle.labels)[np.asarray(oracle(v)).argmax(1)] for k, v in runs.items()}
        e = {"psnr": estimate(psnr, resamples=n_boot, seed=0), "plain_reads": proportion(read["plain"] == label),
             "spliced_reads": proportion(read["spliced"] == label), "same_verdict": proportion(read["plain"] == read["spliced"])}
        out[label] = {k: [round(v.value, 4), round(v.low, 4), round(v.high, 4), v.n] for k, v in e.items()}
        out[label]["per_image_psnr"] = [round(float(x), 3) for x in psnr]
        print(f"splice {label}: PSNR spliced vs plain {e['psnr']} dB; oracle reads {label}: plain {e['plain_reads']}, "
              f"spliced {e['spliced_reads']}; same verdict {e['same_verdict']}")
    return out


def edits(sae, lens, oracle, segmenter, seeds: list[int], args) -> dict:
    """Ablate and scale the top polyp features (chosen on the training store) on polyps runs."""
    from dit_lens.features import store_feature_means, top_features
    from dit_lens.interventions import FeatureEdit
    from dit_lens.interventions.generate import generate
    from dit_lens.metrics.estimates import estimate, proportion
    from dit_lens.metrics.pairs import background_mask, background_ssim, classify, flips, segment, target_rate
    from dit_lens.world.procedural import caption

    means = store_feature_means(sae, sae.store["path"])
    top = top_features(means, caption(SOURCE), caption(TARGET), args.features)
    features = [int(x) for x in top.feature.values]
    out = {"features": features, "difference": [round(float(x), 5) for x in top.values],
           "positive_difference_features": int(((means.sel(prompt=caption(SOURCE)) - means.sel(prompt=caption(TARGET))) > 0).sum())}
    print(f"\nedits: top {len(features)} polyp features by store mean difference (polyps − normal cecum, "
          f"training store): {features[:8]}{' …' if len(features) > 8 else ''}")
    for name, edit in (("ablate", FeatureEdit(sae, features=features, mode="ablate")),
                       (f"scale {args.scale:g}", FeatureEdit(sae, features=features, scale=args.scale))):
        run = generate(lens, caption(SOURCE), seeds=seeds, num_inference_steps=args.steps, guidance_scale=GUIDANCE,
                       edits=edit, progress=True)
        probs = classify(run, oracle)
        flip = flips(probs, SOURCE).values
        ssim = background_ssim(run, background_mask(segment(run, segmenter))).values
        e = {"flip_rate": proportion(flip), "target_rate": proportion(target_rate(probs, TARGET).values),
             "bg_ssim": estimate(ssim, resamples=args.n_boot, seed=0),
             "flip_with_bg_ssim_0.9": proportion(((flip > 0) & (ssim >= 0.9)).astype(float)),
             "original_reads_polyps": proportion((probs.sel(branch="original").idxmax("class") == SOURCE).values)}
        out[name] = {k: [round(v.value, 4), round(v.low, 4), round(v.high, 4), v.n] for k, v in e.items()}
        out[name]["per_image_bg_ssim"] = [round(float(x), 4) for x in np.ravel(ssim)]
        print(f"{name} top {len(features)}: " + "; ".join(f"{k} {v}" for k, v in e.items()))
    return out


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    import dit_lens
    from dit_lens.features import train_sae
    from dit_lens.storage import cache_root, claimed, write_record
    from dit_lens.world import load_oracle, load_segmenter
    from dit_lens.world.procedural import caption

    start = time.perf_counter()
    lens, oracle, segmenter = dit_lens.load("embedded"), load_oracle("embedded"), load_segmenter("embedded")
    seeds = {key: seeds_of(args, key) for key in OFFSETS}
    settings = {"layers": sorted(set(args.layers)), "k": args.k, "expansion": args.expansion, "tokens": args.tokens,
                "batch_size": args.batch_size, "num_inference_steps": args.steps, "guidance_scale": GUIDANCE,
                "features": args.features, "scale": args.scale, "n_boot": args.n_boot, "quick": args.quick,
                "seeds": seeds}
    out = Path(args.out) if args.out else cache_root() / "studies" / "sae"
    claim = claimed(out, "sae_study", identity=settings, overwrite=True, what="--out")
    print("seeds: " + ", ".join(f"{k} {v[0]}-{v[-1]} ({len(v)})" for k, v in seeds.items())
          + f"; {args.steps} steps, guidance {GUIDANCE}", flush=True)
    store = dit_lens.capture(lens, [caption(SOURCE), caption(TARGET)], seeds=seeds["seeds"], num_inference_steps=args.steps,
                             guidance_scale=GUIDANCE, layers=settings["layers"], site="attn2", reduce=None)
    claim.record("sae")
    torch.manual_seed(0)
    sae = train_sae(store, layers=settings["layers"], k=args.k, expansion=args.expansion, tokens=args.tokens,
                    batch_size=args.batch_size, out=claim.path / "sae", progress=True)
    measured = quality(sae, args.n_boot)
    print(f"\nSAE blocks {list(sae.layers)}, k {sae.k}, {sae.num_features} features, trained on seeds "
          f"{sae.store['train_seeds']}; on held-out seeds {sae.store['held_out_seeds']} ({measured['tokens']} tokens, "
          f"fvu and dense: bootstrap over n = {measured['fvu'][3]} (prompt, seed) cells; dead: Wilson over n = "
          f"{measured['dead_rate'][3]} features): " + ", ".join(
              f"{k} {v[0]:.4f} [{v[1]:.4f}, {v[2]:.4f}]" for k, v in measured.items() if k != "tokens"))
    record = {"study": "sae", **settings, **lens.provenance(), "oracle": oracle.fingerprint,
              "segmenter": segmenter.fingerprint, "sae_digest": sae.digest, "sae_folder": "sae",
              "train_seeds": list(sae.store["train_seeds"]), "held_out_seeds": list(sae.store["held_out_seeds"]),
              "quality": measured, "reported_quality": {k: sae.quality[k] for k in ("fvu", "dead_rate", "dense_rate")}}
    record["map"] = lesion_map(sae, lens, segmenter, seeds["map_seeds"], args.steps, args.n_boot)
    print()
    record["splice"] = splice(sae, lens, oracle, seeds["splice_seeds"], args.steps, args.n_boot)
    record["edits"] = edits(sae, lens, oracle, segmenter, seeds["edit_seeds"], args)
    claim.record("results.json")
    write_record(claim.path / "results.json", record)
    print(f"\nsae: {time.perf_counter() - start:.0f} s; results in {claim.path} (results.json, sae/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
