"""`dit-lens world build`: rebuild the embedded world from seeded code.

Writes ``pipeline/`` (a `PixArtAlphaPipeline` saved with ``save_pretrained``), ``oracle/``,
``segmenter/`` and ``world.json`` (every setting, the time each stage took and the machine it ran on).
``--device cuda`` trains on a GPU (same recipe, same random draws; float results differ by rounding);
``--set transformer.steps=3000`` changes one setting of the recipe and is recorded in world.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from .judges import EMBEDDED_JUDGES, save_judge, train_oracle, train_segmenter
from .procedural import CONTEXTS, LABELS, render
from .train import StageConfig, train_transformer, train_vae, world_spec

__all__ = ["build_world", "recipe", "BUILD_STAGES"]

#: Stage settings of the shipped build (training images per class, whether the text encoder trains
#: with the transformer, then each network's optimiser).
BUILD_STAGES = {
    "images_per_class": 800,
    "train_text_encoder": True,
    "vae": StageConfig(steps=600, batch_size=16, lr=1e-3, warmup=50, seed=1),
    "transformer": StageConfig(steps=4000, batch_size=64, lr=1e-3, warmup=100, seed=2, ema=0.995),
    "oracle": StageConfig(steps=500, batch_size=64, lr=2e-3, warmup=50, seed=3),
    "segmenter": StageConfig(steps=500, batch_size=32, lr=2e-3, warmup=50, seed=4),
}


def _log(message: str) -> None:
    print(message, flush=True)


def recipe(overrides: list[str] | None = None, scale: float = 1.0) -> dict:
    """`BUILD_STAGES` with ``"stage.field=value"`` / ``"key=value"`` overrides, steps times `scale`."""
    stages = dict(BUILD_STAGES)
    for item in overrides or []:
        key, sep, text = item.partition("=")
        stage, _, name = key.partition(".")
        if not sep or stage not in stages or bool(name) != isinstance(stages[stage], StageConfig):
            raise ValueError(
                f"--set {item!r}: expected stage.field=value for a stage in "
                f"{[k for k, v in stages.items() if isinstance(v, StageConfig)]} or key=value for "
                f"{[k for k, v in stages.items() if not isinstance(v, StageConfig)]}"
            )
        value = json.loads(text.lower() if text.lower() in ("true", "false", "null") else text)
        if name:
            fields = stages[stage].to_dict()
            if name not in fields:
                raise ValueError(f"--set {item!r}: {stage} has no field {name!r}; fields: {sorted(fields)}")
            stages[stage] = StageConfig(**{**fields, name: value})
        else:
            if type(value) is not type(stages[stage]):
                raise ValueError(f"--set {item!r}: {stage} takes a {type(stages[stage]).__name__}")
            stages[stage] = value
    if scale != 1.0:  # shorter builds for checks: every stage's steps times `scale`
        stages = {k: (StageConfig(**{**v.to_dict(), "steps": max(1, int(v.steps * scale)),
                                     "warmup": max(1, int(v.warmup * scale))})
                      if isinstance(v, StageConfig) else v)
                  for k, v in stages.items()}
    return stages


def build_world(args: argparse.Namespace) -> Path:
    out = Path(args.out) if getattr(args, "out", None) else EMBEDDED_JUDGES
    stages = recipe(getattr(args, "set", None), float(getattr(args, "scale", None) or 1.0))
    device = torch.device(getattr(args, "device", None) or "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    n = stages["images_per_class"]
    labels = [label for label in LABELS for _ in range(n)]
    data = render(labels, [i for _ in LABELS for i in range(n)])
    y = np.array([LABELS.index(label) for label in labels])
    timings["images"] = time.perf_counter() - start
    _log(f"world: rendered {len(labels)} training images ({timings['images']:.0f} s)")

    from ..model.builders import build_pixart

    spec = world_spec()
    pipeline = build_pixart(spec, seed=0).to(device)
    pipeline.vae.requires_grad_(True)
    t = time.perf_counter()
    train_vae(pipeline.vae, data.images, stages["vae"], log=_log)
    timings["vae"] = time.perf_counter() - t

    with torch.no_grad():
        x = (torch.from_numpy(data.images).permute(0, 3, 1, 2) * 2 - 1).to(device)  # (N, 3, H, W)
        posts = [pipeline.vae.encode(x[i : i + 256]).latent_dist for i in range(0, len(x), 256)]
        mean, std = torch.cat([p.mean for p in posts]), torch.cat([p.std for p in posts])
        recon = torch.cat([pipeline.vae.decode(mean[i : i + 256]).sample for i in range(0, len(x), 256)])
        recon = ((recon.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    recon_psnr = float(np.mean(-10 * np.log10(((recon - data.images) ** 2).mean((1, 2, 3)))))
    _log(f"world: VAE reconstruction PSNR {recon_psnr:.2f} dB")

    captions = [c.format(label) for label in LABELS for c in CONTEXTS]
    caption_ids = torch.tensor([[LABELS.index(label) * len(CONTEXTS) + k for k in range(len(CONTEXTS))]
                                for label in labels])
    t = time.perf_counter()
    train_transformer(pipeline, mean, std, caption_ids, captions, stages["transformer"],
                      train_text_encoder=stages["train_text_encoder"], log=_log)
    timings["transformer"] = time.perf_counter() - t

    # judges see procedural images and their VAE reconstructions, so they judge generated images too
    judge_images = np.concatenate([data.images, recon])
    t = time.perf_counter()
    oracle = train_oracle(judge_images, np.concatenate([y, y]), stages["oracle"], device=device, log=_log)
    timings["oracle"] = time.perf_counter() - t
    t = time.perf_counter()
    segmenter = train_segmenter(judge_images, np.concatenate([data.lesion, data.lesion]), stages["segmenter"],
                                device=device, log=_log)
    timings["segmenter"] = time.perf_counter() - t

    out.mkdir(parents=True, exist_ok=True)
    pipeline.to("cpu").save_pretrained(out / "pipeline")
    save_judge(oracle, out / "oracle")
    save_judge(segmenter, out / "segmenter")
    timings["total"] = time.perf_counter() - start
    from .. import __version__

    record = {
        "spec": spec.to_dict(),
        "stages": {k: (v.to_dict() if isinstance(v, StageConfig) else v) for k, v in stages.items()},
        "vae_reconstruction_psnr_db": recon_psnr,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "built_on": _machine(device),
        "dit_lens_version": __version__,
    }
    (out / "world.json").write_text(json.dumps(record, indent=1))
    _log(f"world: wrote {out} in {timings['total'] / 60:.1f} min")
    return out


def _machine(device: torch.device) -> str:
    """Where the weights were trained, for world.json."""
    cpu = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} GPU ({cpu}), torch {torch.__version__}"
    return f"{cpu}, torch {torch.__version__}"
