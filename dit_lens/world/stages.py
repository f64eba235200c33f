"""The stages of a world build: their settings (`recipe`), the finished ones kept for a build stopped
later (`KeptStages`), and the work shared by the builds (VAE reconstructions, captions, the anatomy stage).

`dit_lens.world.build` runs them in order (`build_world`), or retrains one judge or the transformer of a
built world.

Examples:
    >>> stages = recipe(["transformer.steps=3000", "images_per_class=10"], scale=0.1)
    >>> stages["transformer"].steps, stages["vae"].steps, stages["images_per_class"]
    (300, 60, 10)
    >>> recipe(["transformer.rate=1"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --set 'transformer.rate=1': transformer has no field 'rate'; fields: [...]
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from .judges import EMBEDDED_JUDGES, Segmenter, train_segmenter
from .procedural import CONTEXTS, LABELS
from .train import StageConfig

__all__ = ["BUILD_STAGES", "FINETUNE", "STAGES", "KeptStages", "recipe", "reconstruct", "train_anatomy_stage"]


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


def log(message: str) -> None:
    """Print a build's progress line at once (builds run for minutes to hours)."""
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


#: The stages of a build, in order; each one after the rendering, once finished, is kept (`KeptStages`)
#: and reused by a build of the same recipe that was stopped after it.
STAGES = ("images", "vae", "transformer", "oracle", "segmenter", "anatomy")


class KeptStages:
    """The finished stages of one build recipe, kept in `folder` (under the cache): each stage's weights
    and a sealed record saying it finished, with a digest of every file it wrote. The folder is claimed
    through `dit_lens.storage`; hold ``exclusive(folder)`` while building, so two builds of one recipe
    never train a stage at once."""

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
            log(f"world: the kept {stage} stage is not used: {err}")
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


def expected_minutes(stages: dict, scale: float) -> float:
    """The shipped build's stage times (world.json) times `scale`: a rough guide on a machine like it."""
    try:
        shipped = json.loads((EMBEDDED_JUDGES / "world.json").read_text())["seconds"]
    except (OSError, ValueError, KeyError):
        return float("nan")
    images = stages["images_per_class"] / BUILD_STAGES["images_per_class"]
    return sum(float(shipped.get(k, 0)) * (images if k == "images" else scale * images) for k in STAGES) / 60


def reconstruct(vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
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
                           target="anatomy", device=device, log=log)


def world_captions(labels: list[str]) -> tuple[list[str], torch.Tensor]:
    """Every caption of the world, and per image the indices ``(N, len(CONTEXTS))`` of its label's."""
    captions = [c.format(label) for label in LABELS for c in CONTEXTS]
    ids = torch.tensor([[LABELS.index(label) * len(CONTEXTS) + k for k in range(len(CONTEXTS))] for label in labels])
    return captions, ids


def machine(device: torch.device) -> str:
    """Where the weights were trained, for world.json."""
    cpu = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} GPU ({cpu}), torch {torch.__version__}"
    return f"{cpu}, torch {torch.__version__}"
