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

from ..storage import cache_root, content_key, exclusive, write_atomic
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


#: The stages of a build, in order; each one after the rendering, once finished, is kept (`_Stages`)
#: and reused by a build of the same recipe that was stopped after it.
STAGES = ("images", "vae", "transformer", "oracle", "segmenter", "anatomy")


class _Stages:
    """The finished stages of one build recipe, kept in `folder` (under the cache): each stage's weights
    and a sealed record saying it finished, with a digest of every file it wrote. The folder is claimed through `dit_lens.storage`; hold
    ``exclusive(folder)`` while building, so two builds of one recipe never train a stage at once."""

    def __init__(self, folder: Path, identity: dict) -> None:
        from ..storage import claim

        self.folder = folder
        self.claim = claim(folder, "world-build", identity=identity)

    #: What each stage writes into the folder (checked against the digests its record lists).
    WRITES = {"vae": "after_vae", "transformer": "pipeline", "oracle": "oracle", "segmenter": "segmenter",
              "anatomy": "anatomy"}

    def done(self, stage: str) -> bool:
        """Whether `stage` finished and its files are as it wrote them (a damaged one is built again)."""
        from ..storage import StorageError, check_files, read_record

        path = self.folder / f"{stage}.json"
        if not path.is_file():
            return False
        try:
            record = read_record(path, what=f"the {stage} stage record")
            check_files(self.folder, record["files"], record=path.name, fix="it is built again")
        except (StorageError, KeyError, TypeError) as err:
            _log(f"world: the kept {stage} stage is not used: {err}")
            return False
        return True

    def finish(self, stage: str, seconds: float) -> None:
        from ..storage import file_digests, write_record

        self.claim.record(f"{stage}.json")
        write_record(self.folder / f"{stage}.json", {"stage": stage, "seconds": round(seconds, 1),
                                                     "files": file_digests(self.folder, [self.WRITES[stage]])})

    def seconds(self, stage: str) -> float:
        from ..storage import read_record

        return float(read_record(self.folder / f"{stage}.json", what=f"the {stage} stage record")["seconds"])

    def path(self, name: str) -> Path:
        """Where a stage writes `name` (recorded as the build's first)."""
        self.claim.record(name)
        return self.folder / name


def _expected_minutes(stages: dict, scale: float) -> float:
    """The shipped build's stage times (world.json) times `scale`: a rough guide on a machine like it."""
    try:
        shipped = json.loads((EMBEDDED_JUDGES / "world.json").read_text())["seconds"]
    except (OSError, ValueError, KeyError):
        return float("nan")
    images = stages["images_per_class"] / BUILD_STAGES["images_per_class"]
    return sum(float(shipped.get(k, 0)) * (images if k == "images" else scale * images) for k in STAGES) / 60


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
        return _build(out, stages, device, _Stages(folder, identity), scale, build_pixart)


def _build(out: Path, stages: dict, device: torch.device, kept: _Stages, scale: float, build_pixart) -> Path:
    from diffusers import PixArtAlphaPipeline

    from .judges import load_anatomy_segmenter, load_oracle, load_segmenter

    timings: dict[str, float] = {}
    start = time.perf_counter()
    reused = [s for s in STAGES[1:] if kept.done(s)]
    _log(f"world: {len(STAGES)} stages ({', '.join(STAGES)}); expect about {_expected_minutes(stages, scale):.0f} min "
         f"on a machine like the shipped build's (its world.json stage times × --scale) plus fixed costs of a few "
         f"minutes" + (f"; reusing {', '.join(reused)} from {kept.folder}" if reused else ""))

    def stage(k: int, name: str) -> bool:
        """Announce stage k; True when it must run (False: kept from an earlier build)."""
        if kept.done(name):
            timings[name] = kept.seconds(name)
            _log(f"[{k}/{len(STAGES)} {name}] kept from an earlier build of this recipe ({timings[name]:.0f} s then)")
            return False
        _log(f"[{k}/{len(STAGES)} {name}] {time.perf_counter() - start:.0f} s into the build")
        return True

    def finished(name: str, since: float) -> None:
        timings[name] = time.perf_counter() - since
        kept.finish(name, timings[name])

    n = stages["images_per_class"]
    labels = [label for label in LABELS for _ in range(n)]
    t = time.perf_counter()
    _log(f"[1/{len(STAGES)} images] rendering {len(labels)} training images (seeded: rendered on every build)")
    data = render(labels, [i for _ in LABELS for i in range(n)])
    y = np.array([LABELS.index(label) for label in labels])
    timings["images"] = time.perf_counter() - t

    spec = world_spec()
    pipeline = None
    if stage(2, "vae"):
        t = time.perf_counter()
        pipeline = build_pixart(spec, seed=0).to(device)
        pipeline.vae.requires_grad_(True)
        train_vae(pipeline.vae, data.images, stages["vae"], log=_log)
        pipeline.to("cpu").save_pretrained(kept.path("after_vae"))
        pipeline.to(device)
        finished("vae", t)
    mean, std, recon = None, None, None
    if not kept.done("transformer"):
        if pipeline is None:
            pipeline = PixArtAlphaPipeline.from_pretrained(kept.folder / "after_vae").to(device)
        mean, std, recon = _reconstruct(pipeline.vae, data.images)
    if stage(3, "transformer"):
        t = time.perf_counter()
        captions, caption_ids = _captions(labels)
        train_transformer(pipeline, mean, std, caption_ids, captions, stages["transformer"],
                          train_text_encoder=stages["train_text_encoder"], log=_log)
        pipeline.to("cpu").save_pretrained(kept.path("pipeline"))
        finished("transformer", t)
    pipeline = PixArtAlphaPipeline.from_pretrained(kept.folder / "pipeline")
    if recon is None:
        mean, std, recon = _reconstruct(pipeline.vae.to(device), data.images)
        pipeline.vae.to("cpu")
    recon_psnr = float(np.mean(-10 * np.log10(((recon - data.images) ** 2).mean((1, 2, 3)))))
    _log(f"world: VAE reconstruction PSNR {recon_psnr:.2f} dB")

    # judges see procedural images and their VAE reconstructions, so they judge generated images too
    judge_images = np.concatenate([data.images, recon])
    if stage(4, "oracle"):
        t = time.perf_counter()
        save_judge(train_oracle(judge_images, np.concatenate([y, y]), stages["oracle"], device=device, log=_log),
                   kept.path("oracle"))
        finished("oracle", t)
    if stage(5, "segmenter"):
        t = time.perf_counter()
        save_judge(train_segmenter(judge_images, np.concatenate([data.lesion, data.lesion]), stages["segmenter"],
                                   device=device, log=_log), kept.path("segmenter"))
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
        "built_on": _machine(device),
        "dit_lens_version": __version__,
    }
    write_atomic(out / "world.json", json.dumps(record, indent=1).encode())
    _log(f"world: wrote {out} in {(time.perf_counter() - start) / 60:.1f} min ({timings['total'] / 60:.1f} min of "
         f"stage work, kept ones counted at their first run)")
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
    write_atomic(record_path, json.dumps(record, indent=1).encode())
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
    write_atomic(out / "world.json", json.dumps(record, indent=1).encode())
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
