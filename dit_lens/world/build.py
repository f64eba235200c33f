"""`dit-lens world build`: rebuild the embedded world from seeded code.

Writes ``pipeline/`` (a `PixArtAlphaPipeline` saved with ``save_pretrained``), ``oracle/``,
``segmenter/``, ``anatomy/`` and ``world.json`` (every setting, the time each stage took and the machine
it ran on). `build_judge` (``python -m dit_lens.world.build oracle|anatomy [WORLD_DIR]``) retrains one judge of a
built world, from its own VAE.
``--device cuda`` trains on a GPU (same recipe, same random draws; float results differ by rounding);
``--set transformer.steps=3000`` changes one setting of the recipe and is recorded in world.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .judges import EMBEDDED_JUDGES, Segmenter, save_judge, train_oracle, train_segmenter
from .procedural import CONTEXTS, LABELS, render
from .train import StageConfig, train_transformer, train_vae, world_spec

__all__ = ["build_world", "build_judge", "build_anatomy_segmenter", "finetune_transformer", "train_anatomy_stage", "recipe",
           "BUILD_STAGES", "FINETUNE"]

#: Stage settings of the shipped build (training images per class, whether the text encoder trains
#: with the transformer, then each network's optimiser).
BUILD_STAGES = {
    "images_per_class": 800,
    "train_text_encoder": True,
    "vae": StageConfig(steps=600, batch_size=16, lr=1e-3, warmup=50, seed=1),
    "transformer": StageConfig(steps=4000, batch_size=64, lr=1e-3, warmup=100, seed=2, ema=0.995),
    "oracle": StageConfig(steps=1500, batch_size=64, lr=2e-3, warmup=50, seed=3),
    "segmenter": StageConfig(steps=500, batch_size=32, lr=2e-3, warmup=50, seed=4),
    "anatomy": StageConfig(steps=500, batch_size=32, lr=2e-3, warmup=50, seed=5),
}
#: `finetune_transformer`'s default: continues the shipped transformer at a tenth of the build's peak
#: learning rate, with a slower EMA.
FINETUNE = StageConfig(steps=500, batch_size=64, lr=1e-4, warmup=20, seed=6, ema=0.999)


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

    mean, std, recon = _reconstruct(pipeline.vae, data.images)
    recon_psnr = float(np.mean(-10 * np.log10(((recon - data.images) ** 2).mean((1, 2, 3)))))
    _log(f"world: VAE reconstruction PSNR {recon_psnr:.2f} dB")

    captions, caption_ids = _captions(labels)
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
    t = time.perf_counter()
    anatomy = train_anatomy_stage(data.images, recon, data.anatomy, stages["anatomy"], device=device)
    timings["anatomy"] = time.perf_counter() - t

    out.mkdir(parents=True, exist_ok=True)
    pipeline.to("cpu").save_pretrained(out / "pipeline")
    save_judge(oracle, out / "oracle")
    save_judge(segmenter, out / "segmenter")
    save_judge(anatomy, out / "anatomy")
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


def _reconstruct(vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Posterior mean and std ``(N, 4, h, w)`` of `images` ``(N, H, W, 3)`` and their reconstructions
    from the mean (same shape as `images`), on the VAE's device."""
    with torch.no_grad():
        x = (torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).to(vae.device)  # (N, 3, H, W)
        posts = [vae.encode(x[i : i + 256]).latent_dist for i in range(0, len(x), 256)]
        mean, std = torch.cat([p.mean for p in posts]), torch.cat([p.std for p in posts])
        recon = torch.cat([vae.decode(mean[i : i + 256]).sample for i in range(0, len(x), 256)])
        recon = ((recon.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
    return mean, std, recon


def train_anatomy_stage(images: np.ndarray, recon: np.ndarray, anatomy: np.ndarray, cfg: StageConfig, *,
                        device: torch.device | str = "cpu") -> Segmenter:
    """The anatomy segmenter, trained as the lesion one: on procedural `images` and their VAE
    reconstructions `recon` ``(N, H, W, 3)``, with the landmark masks `anatomy` ``(N, H, W)``."""
    return train_segmenter(np.concatenate([images, recon]), np.concatenate([anatomy, anatomy]), cfg,
                           target="anatomy", device=device, log=_log)


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
    _, _, recon = _reconstruct(vae, data.images)
    _log(f"world: rendered and reconstructed {len(data.images)} training images "
         f"({time.perf_counter() - start:.0f} s)")
    if judge == "anatomy":
        made = train_anatomy_stage(data.images, recon, data.anatomy, stages["anatomy"], device=device)
    else:
        y = np.array([LABELS.index(label) for label in labels])
        made = train_oracle(np.concatenate([data.images, recon]), np.concatenate([y, y]), stages["oracle"],
                            device=device, log=_log)
    save_judge(made, world_dir / judge)
    record["stages"][judge] = stages[judge].to_dict()
    record["seconds"][judge] = round(time.perf_counter() - start, 1)
    record[f"{judge}_built_on"] = _machine(torch.device(device))
    record_path.write_text(json.dumps(record, indent=1))
    _log(f"world: wrote {world_dir / judge} in {record['seconds'][judge] / 60:.1f} min")
    return world_dir / judge


def build_anatomy_segmenter(world_dir: str | Path = EMBEDDED_JUDGES, *, overrides: list[str] | None = None,
                            device: str = "cpu") -> Path:
    """`build_judge` for the anatomy segmenter."""
    return build_judge("anatomy", world_dir, overrides=overrides, device=device)


def _captions(labels: list[str]) -> tuple[list[str], torch.Tensor]:
    """Every caption of the world, and per image the indices ``(N, len(CONTEXTS))`` of its label's."""
    captions = [c.format(label) for label in LABELS for c in CONTEXTS]
    ids = torch.tensor([[LABELS.index(label) * len(CONTEXTS) + k for k in range(len(CONTEXTS))] for label in labels])
    return captions, ids


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
    mean, std, _ = _reconstruct(pipeline.vae, render(labels, seeds).images)
    captions, caption_ids = _captions(labels)
    _log(f"world: encoded {len(labels)} training images ({time.perf_counter() - start:.0f} s)")
    train_transformer(pipeline, mean, std, caption_ids, captions, cfg,
                      train_text_encoder=record["stages"]["train_text_encoder"], log=_log)
    out.mkdir(parents=True)
    pipeline.to("cpu").save_pretrained(out / "pipeline")
    for judge in ("oracle", "segmenter", "anatomy"):
        if (world_dir / judge).is_dir():
            shutil.copytree(world_dir / judge, out / judge)
    record["finetune"] = {"from": str(world_dir), "stage": cfg.to_dict(), "class_weights": weights,
                          "seconds": round(time.perf_counter() - start, 1), "built_on": _machine(torch.device(device))}
    (out / "world.json").write_text(json.dumps(record, indent=1))
    _log(f"world: wrote {out} in {record['finetune']['seconds'] / 60:.1f} min")
    return out


def _machine(device: torch.device) -> str:
    """Where the weights were trained, for world.json."""
    cpu = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} GPU ({cpu}), torch {torch.__version__}"
    return f"{cpu}, torch {torch.__version__}"


if __name__ == "__main__":  # python -m dit_lens.world.build oracle|anatomy [WORLD_DIR]
    import sys

    if len(sys.argv) not in (2, 3) or sys.argv[1] not in ("oracle", "anatomy"):
        sys.exit("usage: python -m dit_lens.world.build oracle|anatomy [WORLD_DIR]  (the whole world: dit-lens world "
                 "build)")
    build_judge(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else EMBEDDED_JUDGES)
