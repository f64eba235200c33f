"""`dit-lens demo`: the main job on the embedded world (or a user's checkpoint)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .lens import load

__all__ = ["run_demo"]

DEMO_PROMPTS = ("An endoscopic image of polyps", "An endoscopic image of normal cecum")


def run_demo(args: argparse.Namespace) -> int:
    """Generate one image per demo prompt and seed, and save them with provenance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lens = load(args.model, lora=args.lora)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = range(4)
    images = np.stack(
        [[lens.plain(p, seed=s) for s in seeds] for p in DEMO_PROMPTS]
    )  # (prompt, seed, H, W, 3)
    fig, axes = plt.subplots(len(DEMO_PROMPTS), len(seeds), figsize=(2 * len(seeds), 2.2 * len(DEMO_PROMPTS)))
    for i, prompt in enumerate(DEMO_PROMPTS):
        for j, seed in enumerate(seeds):
            axes[i, j].imshow(images[i, j])
            axes[i, j].set_axis_off()
            axes[i, j].set_title(f"{prompt.split(' of ')[-1]} / seed {seed}", fontsize=7)
    fig.savefig(out / "samples.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    (out / "summary.json").write_text(json.dumps({"provenance": lens.provenance()}, indent=2))
    print(f"wrote {out / 'samples.png'} and {out / 'summary.json'}")
    return 0
