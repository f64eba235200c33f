"""Downstream use of adapted models: does augmenting the new domain's few real images with an adapted
model's images help a detector there? (seed 004's classifier experiment at this scale).

A binary detector (`dit_lens.experiments.downstream.train_detector`: the source class against the rest) is
trained on the shifted split's ``real_per_class`` real images of `source` and `target` (the first
images of the fine-tuning data), alone (arm ``real``) or plus ``synthetic_per_class`` generated images
of each of the two classes from a generator: the shipped model, or an adapted one with its z_T drift δ
(`dit_lens.LatentDrift`). Every arm has the same real images, and for a training seed the same
initialisation and batch order; the test set is the downstream study's held-out shifted set (the
source against `target` and the colon's other findings, which training never shows). Reported per arm:
AUC and F1 with bootstrap intervals over training seeds, and the AUC gain over ``real`` and over the
shipped model's arm, paired by training seed.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..interventions.drift import LatentDrift
from ..interventions.generate import generate
from ..metrics import estimate
from ..storage import DamagedError, FolderClaimError, digest, read_record, write_atomic, write_record
from ..world.procedural import caption, render
from .downstream import DownstreamConfig, _test_set, _train_and_test
from .folders import cached_json, claim_experiment

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["AdaptedDownstreamConfig", "run_adapted_downstream"]


@dataclass(frozen=True)
class AdaptedDownstreamConfig:
    """Settings of the adapted-model downstream test.

    Attributes:
        source, target: The positive class and the training negative class.
        test_negatives: Negative classes of the test set.
        real_per_class: Real shifted images of each of `source` and `target` (seeds 0 …).
        synthetic_per_class: Generated images of each of the two classes per generator arm.
        synthetic_seed_base: Their first seed (fresh: not used by the adaptation study).
        train_seeds: Detector seeds; test_per_class, detector_steps: as the downstream study's.
        num_inference_steps, guidance_scale: The generators' runs.
    """

    source: str = "polyps"
    target: str = "normal cecum"
    test_negatives: tuple[str, ...] = ("normal cecum", "ulcerative colitis", "dyed resection margins")
    real_per_class: int = 20
    synthetic_per_class: int = 64
    synthetic_seed_base: int = 600_000
    train_seeds: tuple[int, ...] = tuple(range(8))
    test_per_class: int = 200
    detector_steps: int = 300
    num_inference_steps: int = 20
    guidance_scale: float = 4.5

    def __post_init__(self) -> None:
        DownstreamConfig(source=self.source, target=self.target, test_negatives=self.test_negatives,
                         real_per_class=self.real_per_class, synthetic_per_class=self.synthetic_per_class,
                         test_per_class=self.test_per_class, train_seeds=self.train_seeds)  # validates the shared fields

    def to_dict(self) -> dict:
        return asdict(self)

    def downstream(self) -> DownstreamConfig:
        return DownstreamConfig(source=self.source, target=self.target, test_negatives=self.test_negatives,
                                test_per_class=self.test_per_class, detector_steps=self.detector_steps)


def _drift(value: float | LatentDrift) -> LatentDrift:
    return value if isinstance(value, LatentDrift) else LatentDrift(float(value), steps=None)  # z_T only


def _synthetic(lens: Lens, drift: LatentDrift, cfg: AdaptedDownstreamConfig) -> np.ndarray:
    """``(2, K, H, W, 3)``: K images of the source prompt, then K of the target prompt, drifted."""
    edits = [] if drift.is_identity else [drift]
    seeds = [cfg.synthetic_seed_base + i for i in range(cfg.synthetic_per_class)]
    prompts = [caption(cfg.source), caption(cfg.target)]
    out = generate(lens, prompts, seeds=seeds, edits=edits, num_inference_steps=cfg.num_inference_steps,
                   guidance_scale=cfg.guidance_scale, batch_size=16, progress=False)
    return out["image"].sel(branch="edited" if edits else "original", prompt=prompts).values


def run_adapted_downstream(generators: dict[str, tuple[Any, float | LatentDrift]], cfg: AdaptedDownstreamConfig,
                           folder: str | Path, *, progress: bool = True, overwrite: bool = False) -> dict:
    """Train and test the detector of every arm and training seed.

    Args:
        generators: Arm name -> (lens, drift): δ of a z_T drift, or a `LatentDrift`; the name ``"shipped"`` (if given) is the arm the
            others are also compared with. Names must be identifiers.
        cfg: The settings.
        folder: Kept here: ``synthetic/<arm>.npy`` and ``cells/<arm>_seed<s>.json`` (a re-run reuses them;
            a folder of other settings is refused).

    Returns:
        ``{"settings", "arms": {arm: {"drift", "auc", "f1", "auc_per_seed", "gain_vs_real"[, "gain_vs_shipped"]}}}``,
        also written to ``folder/result.json``.
    """
    bad = [name for name in generators if not name.isidentifier() or name == "real"]
    if bad:
        raise ValueError(f"generator arm names must be identifiers other than 'real', got {bad}")
    settings = json.loads(json.dumps(cfg.to_dict()))
    folder = Path(folder)
    claim_experiment(folder, "adapted_downstream", {"settings": settings},
                     entries=("synthetic", "cells", "result.json"), overwrite=overwrite)
    log = print if progress else (lambda *a: None)
    n = cfg.real_per_class
    real = render([cfg.source] * n + [cfg.target] * n, list(range(n)) * 2, split="shifted").images
    real_y = np.array([1] * n + [0] * n)
    test, test_y, test_label = _test_set(cfg.downstream())
    arms = {"real": (real, real_y, None)}
    k = cfg.synthetic_per_class
    for name, (lens, drift) in generators.items():
        drift = _drift(drift)
        made = _stored_synthetic(folder / "synthetic" / f"{name}.npy", lens, drift, cfg)  # (2, K, H, W, 3)
        arms[name] = (np.concatenate([real, made[0], made[1]]), np.concatenate([real_y, [1] * k, [0] * k]), drift.to_dict())
    per_seed: dict[str, list[dict]] = {}
    for arm, (x, y, _) in arms.items():
        per_seed[arm] = []
        for seed in cfg.train_seeds:
            per_seed[arm].append(cached_json(folder / "cells" / f"{arm}_seed{seed}.json", lambda x=x, y=y, seed=seed:
                                             _train_and_test(x, y, seed, cfg.downstream(), test, test_y, test_label),
                                             timed=False))
        log(f"adapted downstream {arm}: AUC {np.mean([c['auc'] for c in per_seed[arm]]):.3f}")
    auc = {arm: np.array([c["auc"] for c in cells]) for arm, cells in per_seed.items()}
    result: dict = {"settings": settings, "arms": {}}
    for arm, (_, _, drift) in arms.items():
        entry = {"drift": drift, "auc": estimate(auc[arm]).to_dict(),
                 "f1": estimate([c["f1"] for c in per_seed[arm]]).to_dict(), "auc_per_seed": auc[arm].tolist()}
        if arm != "real":
            entry["gain_vs_real"] = estimate(auc[arm] - auc["real"]).to_dict()
        if arm not in ("real", "shipped") and "shipped" in auc:
            entry["gain_vs_shipped"] = estimate(auc[arm] - auc["shipped"]).to_dict()
        result["arms"][arm] = entry
    write_atomic(folder / "result.json", json.dumps(result, indent=1).encode())
    return result


def _stored_synthetic(path: Path, lens: Lens, drift: LatentDrift, cfg: AdaptedDownstreamConfig) -> np.ndarray:
    """An arm's images: made once and kept at `path` with a sealed record beside it (``.json``: the
    generator's weights, its drift and the images' digest); reused only for the same generator."""
    made_by = {"model_fingerprint": lens.fingerprint, "drift": drift.to_dict()}
    record_path = path.with_suffix(".json")
    fix = f"delete {path.name} and {record_path.name}, and the arm's cells, to make them again"
    if path.is_file() or record_path.is_file():
        record = read_record(record_path, what="the synthetic arm's record", fix=fix)
        if {k: record.get(k) for k in made_by} != json.loads(json.dumps(made_by)):
            raise FolderClaimError(f"{path} was made by another generator or drift than the arm {path.stem!r} has "
                                   f"now; give this generator another arm name, or pass a new folder (nothing was "
                                   f"changed)")
        try:
            images = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DamagedError(f"{path} is missing or unreadable ({type(err).__name__}: {err}); {fix}") from None
        if record.get("images_digest") != digest({}, {"images": images}):
            raise DamagedError(f"{path} fails its digest (it changed after dit-lens wrote it); {fix}")
        return images
    images = np.ascontiguousarray(_synthetic(lens, drift, cfg), dtype=np.float32)
    buffer = io.BytesIO()
    np.save(buffer, images, allow_pickle=False)
    write_atomic(path, buffer.getvalue())
    write_record(record_path, {**made_by, "images_digest": digest({}, {"images": images})})
    return images
