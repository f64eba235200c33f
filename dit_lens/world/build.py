"""`dit-lens world build`: rebuild the embedded world from seeded code.

Writes ``pipeline/`` (a `PixArtAlphaPipeline` saved with ``save_pretrained``), ``oracle/``,
``segmenter/``, ``anatomy/`` and ``world.json`` (every setting, the time each stage took and the machine
it ran on), running the stages of `dit_lens.world.stages` in order. `build_judge`
(``python -m dit_lens.world.build oracle|anatomy [WORLD_DIR]``) retrains one judge of a built world,
from its own VAE.
``--device cuda`` trains on a GPU (same recipe, same random draws; float results differ by rounding);
``--set transformer.steps=3000`` changes one setting of the recipe and is recorded in world.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..storage import cache_root, content_key, exclusive, write_atomic
from .judges import EMBEDDED_JUDGES, save_judge, train_oracle, train_segmenter
from .procedural import LABELS, render
from .stages import (FINETUNE, STAGES, KeptStages, expected_minutes, log, machine, reconstruct, recipe,
                     train_anatomy_stage, world_captions)
from .train import StageConfig, train_transformer, train_vae, world_spec

__all__ = ["build_world", "build_judge", "build_anatomy_segmenter", "finetune_transformer"]

def build_world(args: argparse.Namespace) -> Path:
    """Build the world: six stages (`STAGES`), each reported as ``[k/6 stage]`` with the time it took.

    A stage that finished is kept under the cache (``world-build/<recipe key>/``, recipe = every setting,
    the scale and the device) and a build of the same recipe stopped later resumes after it."""
    from ..model.builders import build_pixart

    out = Path(args.out) if getattr(args, "out", None) else EMBEDDED_JUDGES
    scale = float(getattr(args, "scale", None) or 1.0)
    stages = recipe(getattr(args, "set", None), scale)
    device = torch.device(getattr(args, "device", None) or "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    identity = {"stages": {k: (v.to_dict() if isinstance(v, StageConfig) else v) for k, v in stages.items()},
                "device": device.type, "spec": world_spec().to_dict()}
    folder = cache_root() / "world-build" / content_key(identity)
    with exclusive(folder):
        return _build(out, stages, device, KeptStages(folder, identity), scale, build_pixart)


def _build(out: Path, stages: dict, device: torch.device, kept: KeptStages, scale: float, build_pixart) -> Path:
    from diffusers import PixArtAlphaPipeline

    from .judges import load_anatomy_segmenter, load_oracle, load_segmenter

    timings: dict[str, float] = {}
    start = time.perf_counter()
    reused = [s for s in STAGES[1:] if kept.done(s)]
    log(f"world: {len(STAGES)} stages ({', '.join(STAGES)}); expect about {expected_minutes(stages, scale):.0f} min "
         f"on a machine like the shipped build's (its world.json stage times × --scale) plus fixed costs of a few "
         f"minutes" + (f"; reusing {', '.join(reused)} from {kept.folder}" if reused else ""))

    def stage(k: int, name: str) -> bool:
        """Announce stage k; True when it must run (False: kept from an earlier build)."""
        if kept.done(name):
            timings[name] = kept.seconds(name)
            log(f"[{k}/{len(STAGES)} {name}] kept from an earlier build of this recipe ({timings[name]:.0f} s then)")
            return False
        log(f"[{k}/{len(STAGES)} {name}] {time.perf_counter() - start:.0f} s into the build")
        return True

    def finished(name: str, since: float) -> None:
        timings[name] = time.perf_counter() - since
        kept.finish(name, timings[name])

    n = stages["images_per_class"]
    labels = [label for label in LABELS for _ in range(n)]
    t = time.perf_counter()
    log(f"[1/{len(STAGES)} images] rendering {len(labels)} training images (seeded: rendered on every build)")
    data = render(labels, [i for _ in LABELS for i in range(n)])
    y = np.array([LABELS.index(label) for label in labels])
    timings["images"] = time.perf_counter() - t

    spec = world_spec()
    pipeline = None
    if stage(2, "vae"):
        t = time.perf_counter()
        pipeline = build_pixart(spec, seed=0).to(device)
        pipeline.vae.requires_grad_(True)
        train_vae(pipeline.vae, data.images, stages["vae"], log=log)
        pipeline.to("cpu").save_pretrained(kept.path("after_vae"))
        pipeline.to(device)
        finished("vae", t)
    mean, std, recon = None, None, None
    if not kept.done("transformer"):
        if pipeline is None:
            pipeline = PixArtAlphaPipeline.from_pretrained(kept.folder / "after_vae").to(device)
        mean, std, recon = reconstruct(pipeline.vae, data.images)
    if stage(3, "transformer"):
        t = time.perf_counter()
        captions, caption_ids = world_captions(labels)
        train_transformer(pipeline, mean, std, caption_ids, captions, stages["transformer"],
                          train_text_encoder=stages["train_text_encoder"], log=log)
        pipeline.to("cpu").save_pretrained(kept.path("pipeline"))
        finished("transformer", t)
    pipeline = PixArtAlphaPipeline.from_pretrained(kept.folder / "pipeline")
    if recon is None:
        mean, std, recon = reconstruct(pipeline.vae.to(device), data.images)
        pipeline.vae.to("cpu")
    recon_psnr = float(np.mean(-10 * np.log10(((recon - data.images) ** 2).mean((1, 2, 3)))))
    log(f"world: VAE reconstruction PSNR {recon_psnr:.2f} dB")

    # judges see procedural images and their VAE reconstructions, so they judge generated images too
    judge_images = np.concatenate([data.images, recon])
    if stage(4, "oracle"):
        t = time.perf_counter()
        save_judge(train_oracle(judge_images, np.concatenate([y, y]), stages["oracle"], device=device, log=log),
                   kept.path("oracle"))
        finished("oracle", t)
    if stage(5, "segmenter"):
        t = time.perf_counter()
        save_judge(train_segmenter(judge_images, np.concatenate([data.lesion, data.lesion]), stages["segmenter"],
                                   device=device, log=log), kept.path("segmenter"))
        finished("segmenter", t)
    if stage(6, "anatomy"):
        t = time.perf_counter()
        save_judge(train_anatomy_stage(data.images, recon, data.anatomy, stages["anatomy"], device=device),
                   kept.path("anatomy"))
        finished("anatomy", t)

    out.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(out / "pipeline")
    save_judge(load_oracle(kept.folder / "oracle"), out / "oracle")
    save_judge(load_segmenter(kept.folder / "segmenter"), out / "segmenter")
    save_judge(load_anatomy_segmenter(kept.folder / "anatomy"), out / "anatomy")
    timings["total"] = sum(timings[s] for s in STAGES)
    from ..version import __version__

    record = {
        "spec": spec.to_dict(),
        "stages": {k: (v.to_dict() if isinstance(v, StageConfig) else v) for k, v in stages.items()},
        "vae_reconstruction_psnr_db": recon_psnr,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "built_on": machine(device),
        "dit_lens_version": __version__,
    }
    write_atomic(out / "world.json", json.dumps(record, indent=1).encode())
    log(f"world: wrote {out} in {(time.perf_counter() - start) / 60:.1f} min ({timings['total'] / 60:.1f} min of "
         f"stage work, kept ones counted at their first run)")
    return out


def build_judge(judge: str, world_dir: str | Path = EMBEDDED_JUDGES, *, overrides: list[str] | None = None,
                device: str = "cpu") -> Path:
    """Retrain one judge (``"oracle"`` or ``"anatomy"``) of the world built in `world_dir` from its own
    training images (seeds ``0 … images_per_class − 1``) and its pipeline's VAE reconstructions, write it
    there and record the stage in ``world.json``. `overrides` are `recipe` overrides, e.g.
    ``["oracle.steps=800"]``. Returns the judge's folder.
    """
    from diffusers import AutoencoderKL

    if judge not in ("oracle", "anatomy"):
        raise ValueError(f"judge must be 'oracle' or 'anatomy', got {judge!r}")
    world_dir = Path(world_dir)
    record_path = world_dir / "world.json"
    if not (world_dir / "pipeline" / "vae").is_dir() or not record_path.is_file():
        raise FileNotFoundError(f"no built world at {world_dir} (needs pipeline/vae and world.json); "
                                "build one with `dit-lens world build`")
    record = json.loads(record_path.read_text())
    stages = recipe([f"images_per_class={record['stages']['images_per_class']}"] + list(overrides or []))
    start = time.perf_counter()
    n = stages["images_per_class"]
    labels = [label for label in LABELS for _ in range(n)]
    data = render(labels, [i for _ in LABELS for i in range(n)])
    vae = AutoencoderKL.from_pretrained(world_dir / "pipeline" / "vae").to(device).eval()
    _, _, recon = reconstruct(vae, data.images)
    log(f"world: rendered and reconstructed {len(data.images)} training images "
         f"({time.perf_counter() - start:.0f} s)")
    if judge == "anatomy":
        made = train_anatomy_stage(data.images, recon, data.anatomy, stages["anatomy"], device=device)
    else:
        y = np.array([LABELS.index(label) for label in labels])
        made = train_oracle(np.concatenate([data.images, recon]), np.concatenate([y, y]), stages["oracle"],
                            device=device, log=log)
    save_judge(made, world_dir / judge)
    record["stages"][judge] = stages[judge].to_dict()
    record["seconds"][judge] = round(time.perf_counter() - start, 1)
    record[f"{judge}_built_on"] = machine(torch.device(device))
    write_atomic(record_path, json.dumps(record, indent=1).encode())
    log(f"world: wrote {world_dir / judge} in {record['seconds'][judge] / 60:.1f} min")
    return world_dir / judge


def build_anatomy_segmenter(world_dir: str | Path = EMBEDDED_JUDGES, *, overrides: list[str] | None = None,
                            device: str = "cpu") -> Path:
    """`build_judge` for the anatomy segmenter."""
    return build_judge("anatomy", world_dir, overrides=overrides, device=device)


def finetune_transformer(world_dir: str | Path, out: str | Path, cfg: StageConfig = FINETUNE, *,
                         class_weights: dict[str, int] | None = None, device: str = "cpu") -> Path:
    """Continue training the transformer of the world in `world_dir` with `train_transformer`'s data and
    loss (its text encoder trains along if the build's did), and write a whole world to `out`.

    Args:
        world_dir: A built world (``pipeline/``, the judges and ``world.json``); it is not modified.
        out: A new folder: the fine-tuned ``pipeline/``, the judges copied, ``world.json`` with a
            ``"finetune"`` entry. Compare with ``benchmarks/world_quality.py --world OUT``.
        cfg: The fine-tune's optimiser settings.
        class_weights: Label → how many times its training images are repeated (default 1), to train
            more on classes the oracle confuses, e.g. ``{"normal cecum": 3}``.
        device: Where to train.

    Returns:
        `out`.
    """
    from diffusers import PixArtAlphaPipeline

    world_dir, out = Path(world_dir), Path(out)
    if out.resolve() == world_dir.resolve() or out.exists():
        raise FileExistsError(f"finetune_transformer writes a new world; {out} exists (or is `world_dir`), "
                              "pick a new folder")
    record = json.loads((world_dir / "world.json").read_text())
    weights = dict(class_weights or {})
    for label, k in weights.items():
        if label not in LABELS or not isinstance(k, int) or k < 1:
            raise ValueError(f"class_weights takes labels of {LABELS} to ints >= 1, got {label!r}: {k!r}")
    start = time.perf_counter()
    n = record["stages"]["images_per_class"]
    labels = [label for label in LABELS for _ in range(n * weights.get(label, 1))]
    seeds = [i for label in LABELS for _ in range(weights.get(label, 1)) for i in range(n)]
    pipeline = PixArtAlphaPipeline.from_pretrained(world_dir / "pipeline").to(device)
    mean, std, _ = reconstruct(pipeline.vae, render(labels, seeds).images)
    captions, caption_ids = world_captions(labels)
    log(f"world: encoded {len(labels)} training images ({time.perf_counter() - start:.0f} s)")
    train_transformer(pipeline, mean, std, caption_ids, captions, cfg,
                      train_text_encoder=record["stages"]["train_text_encoder"], log=log)
    out.mkdir(parents=True)
    pipeline.to("cpu").save_pretrained(out / "pipeline")
    for judge in ("oracle", "segmenter", "anatomy"):
        if (world_dir / judge).is_dir():
            shutil.copytree(world_dir / judge, out / judge)
    record["finetune"] = {"from": str(world_dir), "stage": cfg.to_dict(), "class_weights": weights,
                          "seconds": round(time.perf_counter() - start, 1), "built_on": machine(torch.device(device))}
    write_atomic(out / "world.json", json.dumps(record, indent=1).encode())
    log(f"world: wrote {out} in {record['finetune']['seconds'] / 60:.1f} min")
    return out


if __name__ == "__main__":  # python -m dit_lens.world.build oracle|anatomy [WORLD_DIR]
    import sys

    if len(sys.argv) not in (2, 3) or sys.argv[1] not in ("oracle", "anatomy"):
        sys.exit("usage: python -m dit_lens.world.build oracle|anatomy [WORLD_DIR]  (the whole world: dit-lens world "
                 "build)")
    build_judge(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else EMBEDDED_JUDGES)
