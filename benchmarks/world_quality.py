"""Measure the embedded world against its quality bars; prints one table.

- oracle accuracy on held-out procedural images (seeds never used in training) and on the shifted split;
- segmenter Dice on held-out lesion images;
- per class, how often the oracle recognises the prompted class on images *generated* by the pipeline
  (20 steps, guidance 4.5);
- time to sample 8 images with 20 steps.

    python benchmarks/world_quality.py [--seeds 64] [--world DIR] [--device cuda]

The shipped world's figures are the ones measured on the CPU (the default device): a CUDA generator
draws other initial noise for the same seed.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import dit_lens
from dit_lens.world import LABELS, load_oracle, load_segmenter, render

HELD_OUT = 100_000  # training used seeds 0 … images_per_class − 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=64, help="generated images per class")
    p.add_argument("--held-out", type=int, default=200, help="procedural test images per class and split")
    p.add_argument("--world", default="embedded", help="folder written by `dit-lens world build` (default: shipped)")
    p.add_argument("--device", default="cpu", help="where the pipeline samples (the judges run on the CPU)")
    args = p.parse_args()
    torch.set_num_threads(2)
    source = "embedded" if args.world == "embedded" else None
    oracle = load_oracle(source or f"{args.world}/oracle")
    segmenter = load_segmenter(source or f"{args.world}/segmenter")
    lens = dit_lens.load(source or f"{args.world}/pipeline", device=args.device)
    results: dict = {}

    k = args.held_out
    labels = [label for label in LABELS for _ in range(k)]
    seeds = [HELD_OUT + i for _ in LABELS for i in range(k)]
    truth = np.array([LABELS.index(label) for label in labels])
    for split in ("train", "shifted"):
        s = render(labels, seeds, split=split)
        results[f"oracle_accuracy_{split}"] = float((oracle(s.images).argmax(1) == truth).mean())
        if split == "train":
            pred = segmenter(s.images)
            has = s.lesion.reshape(len(s.lesion), -1).any(1)
            inter = (pred & s.lesion).reshape(len(pred), -1).sum(1)[has]
            total = (pred.reshape(len(pred), -1).sum(1) + s.lesion.reshape(len(pred), -1).sum(1))[has]
            results["segmenter_dice"] = float(np.mean(2 * inter / np.maximum(total, 1)))

    generated = {}
    for label in LABELS:
        images = []
        for start in range(0, args.seeds, 16):
            batch = list(range(start, min(start + 16, args.seeds)))
            out = lens.pipeline([f"An endoscopic image of {label}"] * len(batch),
                                generator=[lens.generator(s) for s in batch], num_inference_steps=20,
                                guidance_scale=4.5, output_type="np", **lens.pipeline_kwargs)
            images.append(out.images)
        pred = oracle(np.concatenate(images).clip(0, 1)).argmax(1)
        generated[label] = float((pred == LABELS.index(label)).mean())
        print(f"generated {label:24s} recognised {generated[label]:.3f}", flush=True)
    results["generated_recognised"] = generated

    prompt = ["An endoscopic image of polyps"] * 8
    lens.pipeline(prompt, num_inference_steps=2, output_type="np", **lens.pipeline_kwargs)  # warm-up
    t = time.perf_counter()
    lens.pipeline(prompt, generator=lens.generator(0), num_inference_steps=20, guidance_scale=4.5,
                  output_type="np", **lens.pipeline_kwargs)
    results["sample_8_images_20_steps_s"] = time.perf_counter() - t
    results["device"] = str(lens.device)

    print(json.dumps(results, indent=1))
    bars = {"oracle_accuracy_train": 0.95, "oracle_accuracy_shifted": 0.85, "segmenter_dice": 0.85}
    for key, bar in bars.items():
        print(f"{key:28s} {results[key]:.3f}  (bar {bar})  {'met' if results[key] >= bar else 'MISSED'}")
    worst = min(generated.values())
    print(f"{'generated, worst class':28s} {worst:.3f}  (bar 0.90)  {'met' if worst >= 0.9 else 'MISSED'}")
    print(f"{'sampling 8 images, 20 steps':28s} {results['sample_8_images_20_steps_s']:.2f} s  "
          f"on {results['device']} (bar 3 s on the 2-core CPU)")


if __name__ == "__main__":
    main()
