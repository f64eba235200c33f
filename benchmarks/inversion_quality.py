"""How much DDIM inversion loses: reconstruction PSNR and recovered noise on the embedded world.

For each row, images are inverted under their prompt (`dit_lens.invert`, guidance 1) and denoised
again from the inverted noise with the same DDIM sampler and prompt (`dit_lens.regenerate`); the
PSNR of the reconstruction to the input is what every inversion-based editor (PnP, h-Edit) carries
into its background before it edits anything. Rows:

- generated: images the pipeline made (its default sampler, 20 steps, guidance 4.5), fresh seeds;
- procedural: the world's own procedural images (never generated), held-out seeds;
- noise recovery: a run of the DDIM sampler at guidance 1 inverted from its own latents (and from its
  decoded images, through the VAE), cosine of the inverted z_T to the run's initial noise.

Each at 20 and 50 steps, plain inversion (refine 0, as published) and with fixed-point refinement.
Means with 95% bootstrap intervals over images.

    python benchmarks/inversion_quality.py [--images 32] [--seed-base 40000] [--steps 20 50] [--refine 0 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

import dit_lens
from dit_lens.inversion import ddim_scheduler
from dit_lens.sampling.images import decode
from dit_lens.metrics import estimate
from dit_lens.trace.runner import traced_generate
from dit_lens.world import render
from dit_lens.world.domain import ENDOSCOPY_CONTEXTS

PROMPT_LABEL = "polyps"


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return -10 * np.log10(np.maximum(((a - b) ** 2).mean(axis=(1, 2, 3)), 1e-12))


def summary(values: np.ndarray) -> dict:
    e = estimate(values)
    return {"mean": e.value, "low": e.low, "high": e.high, "min": float(np.min(values)), "n": e.n}


def _line(s: dict) -> str:
    return f"{s['mean']:.4f} [{s['low']:.4f}, {s['high']:.4f}]  min {s['min']:.4f}  n={s['n']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32, help="images per row")
    p.add_argument("--seed-base", type=int, default=40_000, help="first seed (fresh: not used in development)")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50], help="DDIM step counts T")
    p.add_argument("--refine", type=int, nargs="+", default=[0, 3], help="fixed-point iterations per step")
    p.add_argument("--out", help="write the table as JSON here")
    args = p.parse_args()
    torch.set_num_threads(2)
    lens = dit_lens.load("embedded")
    prompt = ENDOSCOPY_CONTEXTS[0].format(PROMPT_LABEL)
    seeds = list(range(args.seed_base, args.seed_base + args.images))
    generated = dit_lens.generate(lens, prompt, seeds=seeds, progress=False)["image"].isel(prompt=0, branch=0).values
    procedural = render([PROMPT_LABEL] * args.images, [100_000 + s for s in seeds]).images.astype(np.float32)
    rows = {}
    for T in args.steps:
        ddim = ddim_scheduler(lens, T)
        run = traced_generate(lens, [prompt] * args.images, seeds, num_inference_steps=T, guidance_scale=1.0,
                              output_type="latent", scheduler=ddim).images.float()
        noise = torch.cat([randn_tensor((1, *run.shape[1:]), generator=lens.generator(s)) for s in seeds])
        run_images = decode(lens, run)
        for refine in args.refine:
            for name, images in (("generated", generated), ("procedural", procedural)):
                trajectory = dit_lens.invert(lens, images, prompt, num_inference_steps=T, refine=refine, progress=False)
                key = f"{name}, T={T}, refine={refine}: reconstruction PSNR dB"
                rows[key] = summary(psnr(dit_lens.regenerate(lens, trajectory, progress=False), images))
                print(key, _line(rows[key]), flush=True)
            for name, kwargs in (("latents", {"latents": run}), ("images via VAE", {})):
                trajectory = dit_lens.invert(lens, None if kwargs else run_images, prompt, num_inference_steps=T,
                                             refine=refine, progress=False, **kwargs)
                z_t = torch.from_numpy(trajectory["latent"].isel(step=0).values)
                cosine = torch.nn.functional.cosine_similarity(z_t.flatten(1), noise.flatten(1)).numpy()
                key = f"DDIM run at guidance 1, T={T}, refine={refine}, from {name}: noise cosine"
                rows[key] = summary(cosine)
                print(key, _line(rows[key]), flush=True)
    width = max(map(len, rows))
    print()
    for name, s in rows.items():
        print(f"{name:<{width}}  {_line(s)}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"rows": rows, "settings": vars(args), "provenance": lens.provenance()}, fh, indent=1)


if __name__ == "__main__":
    main()
