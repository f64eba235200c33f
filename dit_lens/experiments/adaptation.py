"""Adapting the shipped model to the world's shifted split, with and without Latent Drifting (seed 004 at
this scale).

The shipped model plays the pretrained "natural-image" model; the ``"shifted"`` split (other lighting
and texture) plays the new domain. Each adapter is fine-tuned (`dit_lens.finetune`) on ``per_class``
shifted images per class, with a training drift δ_train (0 = plain fine-tuning). Each is then sampled
with inference drifts δ (`dit_lens.LatentDrift`: ``"every"`` step, the seed's reverse process, or the
``"initial"`` noise only) and compared with held-out shifted images by

- the **Fréchet distance on the oracle's penultimate features** (not FID: no Inception weights here;
  `dit_lens.metrics.distribution`), with a bootstrap interval, beside the *floor*: the distance between
  two disjoint sets of real shifted images of the same sizes (what a perfect generator would score);
- **agreement**: how often the oracle reads the prompted class, overall and per class.

δ is picked as the seed does, by the smallest distance over the sweep (on the sweep's seeds and
held-out set), and then measured again on fresh seeds against a second held-out set, so the reported
figure is not the one it was picked on.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..interventions.drift import LatentDrift
from ..interventions.generate import generate
from ..metrics import estimate
from ..metrics.distribution import frechet_difference, frechet_estimate
from ..storage import DamagedError, digest, read_record, write_atomic, write_record
from ..training.trainer import finetune
from ..training.trainer import read_record as read_finetune_record
from ..world.data import world_split
from ..world.judges import load_oracle
from ..world.procedural import LABELS, caption, render
from .folders import claim_experiment

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["AdaptationConfig", "run_adaptation", "FORMS"]

FORMS = ("every", "initial")


@dataclass(frozen=True)
class AdaptationConfig:
    """One adaptation study.

    Attributes:
        schemes: Fine-tuning methods (`dit_lens.finetune`'s ``method``).
        train_drifts: δ_train of each adapter (0 = no drift).
        deltas: Inference drifts swept for every adapter.
        forms: How the inference drift is applied: ``"every"`` step and z_T, or z_T only (``"initial"``).
        per_class: Shifted training images per class (seeds ``train_seed_base …``).
        counts: Fewer training images for some classes (the long tail), e.g. ``{"esophagitis": 3}``.
        steps, rank, lr, seed: Fine-tuning settings (lr None: `finetune`'s default for the scheme).
        sweep_seeds, confirm_seeds: Generated images per class in the sweep and in the confirmation.
        held_out: Real shifted images per class in each held-out set (sweep and confirmation sets are
            disjoint, and disjoint from training).
    """

    schemes: tuple[str, ...] = ("lora", "attn2", "full")
    train_drifts: tuple[float, ...] = (0.0, 0.1)
    deltas: tuple[float, ...] = (-0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2)
    forms: tuple[str, ...] = ("every",)
    per_class: int = 20
    counts: dict = field(default_factory=dict)
    steps: int = 600
    rank: int = 8
    lr: float | None = None
    seed: int = 0
    train_seed_base: int = 0
    sweep_seeds: int = 16
    sweep_seed_base: int = 0
    confirm_seeds: int = 32
    confirm_seed_base: int = 500_000
    held_out: int = 64
    held_out_base: int = 300_000
    num_inference_steps: int = 20
    guidance_scale: float = 4.5

    def __post_init__(self) -> None:
        bad = [f for f in self.forms if f not in FORMS]
        if bad:
            raise ValueError(f"forms must be among {list(FORMS)}, got {bad}")
        if not self.schemes or not self.train_drifts or not self.deltas or not self.forms:
            raise ValueError("give at least one scheme, training drift, inference drift and form")

    def to_dict(self) -> dict:
        return asdict(self)


def _real(cfg: AdaptationConfig, base: int, per_class: int) -> tuple[np.ndarray, list[str]]:
    labels = [label for label in LABELS for _ in range(per_class)]
    seeds = [base + i for _ in LABELS for i in range(per_class)]
    return render(labels, seeds, split="shifted").images, labels


def _generated(lens: Lens, cfg: AdaptationConfig, delta: float, form: str, seeds: list[int]) -> np.ndarray:
    """Images ``(classes · seeds, H, W, 3)`` of every class's canonical prompt, drifted by δ."""
    drift = LatentDrift(delta, steps=(0.0, 1.0) if form == "every" else None)
    edits = [] if drift.is_identity else [drift]
    out = generate(lens, [caption(label) for label in LABELS], seeds=seeds, edits=edits,
                   num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                   batch_size=16, progress=False)
    branch = "edited" if edits else "original"
    return out["image"].sel(branch=branch).values.reshape(-1, *out["image"].shape[-3:])  # (prompt·seed, H, W, 3)


def _measure(oracle: Any, images: np.ndarray, reference: np.ndarray, per_class: int) -> tuple[dict, np.ndarray]:
    """Agreement (overall and per class) and the oracle features of `images` (the distance is taken from
    the features when results are assembled, `_with_distance`)."""
    probs, features = oracle(images), oracle.features(images)
    labels = np.repeat(np.arange(len(LABELS)), per_class)
    agree = probs.argmax(1) == labels
    return ({"agreement": estimate(agree.astype(float)).to_dict(),
             "per_class": {label: float(agree[labels == i].mean()) for i, label in enumerate(LABELS)}}, features)


def _with_distance(cell: dict, path: Path, reference: np.ndarray) -> dict:
    return {**cell, "frechet": frechet_estimate(_features(path), reference).to_dict()}


def _cell(path: Path, reference: np.ndarray, compute) -> dict:
    """The cell at `path` (a sealed record, with its image features beside it in ``.npy``, whose digest
    the record holds), computed if missing, with its distance to `reference`."""
    if path.is_file():
        _features(path)  # checked against the record's digest
        return _with_distance(_record(path), path, reference)
    start = time.perf_counter()
    result, features = compute()
    result["seconds"] = round(time.perf_counter() - start, 1)
    features = np.ascontiguousarray(features, dtype=np.float32)
    buffer = io.BytesIO()
    np.save(buffer, features, allow_pickle=False)
    write_atomic(path.with_suffix(".npy"), buffer.getvalue())
    write_record(path, {**result, "features_digest": digest({}, {"features": features})})
    return _with_distance(_record(path), path, reference)


_FIX = "delete it and its .json/.npy partner to measure the cell again"


def _record(path: Path) -> dict:
    record = read_record(path, what="the adaptation cell", fix=_FIX)
    record.pop("features_digest", None)
    return record


def _features(path: Path) -> np.ndarray:
    """A cell's image features, checked against the digest its record holds."""
    record = read_record(path, what="the adaptation cell", fix=_FIX)
    try:
        features = np.load(path.with_suffix(".npy"), allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DamagedError(f"the cell's features {path.with_suffix('.npy')} are missing or unreadable "
                           f"({type(err).__name__}: {err}); {_FIX}") from None
    if record.get("features_digest") != digest({}, {"features": features}):
        raise DamagedError(f"the cell's features {path.with_suffix('.npy')} fail the digest of {path.name} (they "
                           f"changed after dit-lens wrote them); {_FIX}")
    return features


def run_adaptation(cfg: AdaptationConfig, folder: str | Path, *, source: str = "embedded",
                   progress: bool = True, overwrite: bool = False) -> dict:
    """Fine-tune every adapter, sweep the inference drift, pick δ and confirm it on fresh seeds.

    Every adapter and every measured cell is kept in `folder` (``adapters/``, ``cells/``); a re-run
    reuses them. The folder is claimed for the settings and the base model's weights
    (`claim_experiment`); with `overwrite`, an adaptation folder of other settings is replaced (only
    what dit-lens wrote there). Returns (and writes to ``folder/result.json``) the settings, the
    real-vs-real floors, the base model's cells, every sweep cell and the picked δ of each adapter with
    its confirmation.
    """
    from ..model.lens import load

    base = load(source)
    folder = Path(folder)
    claim_experiment(folder, "adaptation", {"settings": cfg.to_dict(), "model_fingerprint": base.fingerprint},
                     entries=("adapters", "cells", "result.json"), overwrite=overwrite)
    oracle = load_oracle()
    log = print if progress else (lambda *a: None)
    sweep_ref, _ = _real(cfg, cfg.held_out_base, cfg.held_out)
    confirm_ref, _ = _real(cfg, cfg.held_out_base + 100_000, cfg.held_out)
    sweep_ref, confirm_ref = oracle.features(sweep_ref), oracle.features(confirm_ref)
    sweep_seeds = [cfg.sweep_seed_base + i for i in range(cfg.sweep_seeds)]
    confirm_seeds = [cfg.confirm_seed_base + i for i in range(cfg.confirm_seeds)]

    def floor(n: int, base: int, reference: np.ndarray) -> tuple[dict, np.ndarray]:
        images, _ = _real(cfg, base, n)
        return _measure(oracle, images, reference, n)

    result: dict = {"settings": cfg.to_dict(), "floor": {
        "sweep": _cell(folder / "cells" / "floor_sweep.json", sweep_ref, lambda: floor(cfg.sweep_seeds, 700_000, sweep_ref)),
        "confirm": _cell(folder / "cells" / "floor_confirm.json", confirm_ref,
                         lambda: floor(cfg.confirm_seeds, 800_000, confirm_ref))}}
    result["base"] = {"sweep": _cell(folder / "cells" / "base_sweep.json", sweep_ref, lambda: _measure(
        oracle, _generated(base, cfg, 0.0, "every", sweep_seeds), sweep_ref, cfg.sweep_seeds)),
        "confirm": _cell(folder / "cells" / "base_confirm.json", confirm_ref, lambda: _measure(
            oracle, _generated(base, cfg, 0.0, "every", confirm_seeds), confirm_ref, cfg.confirm_seeds))}
    data = world_split("shifted", per_class=cfg.per_class, seed_base=cfg.train_seed_base, counts=cfg.counts)
    result["adapters"], confirmed = [], {}
    cells, base_confirm = folder / "cells", folder / "cells" / "base_confirm.json"
    for scheme in cfg.schemes:
        for train_drift in cfg.train_drifts:
            name = f"{scheme}_d{train_drift:g}"
            log(f"adaptation: {name}")
            adapter = finetune(base, data, folder / "adapters" / name, method=scheme, rank=cfg.rank,
                               steps=cfg.steps, lr=cfg.lr, drift=train_drift, seed=cfg.seed, progress=progress)
            lens = load(source, lora=adapter)
            train_seconds = read_finetune_record(adapter)["train_seconds"]
            sweep = []
            for form in cfg.forms:
                for delta in cfg.deltas:
                    if delta == 0 and form != cfg.forms[0]:
                        continue  # delta = 0 is the same run in every form
                    cell = _cell(folder / "cells" / f"{name}_{form}_{delta:g}.json", sweep_ref, lambda: _measure(
                        oracle, _generated(lens, cfg, delta, form, sweep_seeds), sweep_ref, cfg.sweep_seeds))
                    sweep.append({"form": form, "delta": delta, **cell})
                    log(f"  {form} delta {delta:+g}: Frechet {cell['frechet']['value']:.2f}, "
                        f"agreement {cell['agreement']['value']:.3f}")
            best = min(sweep, key=lambda c: c["frechet"]["value"])
            picks = {"picked": (best["form"], best["delta"]), "no_drift": (cfg.forms[0], 0.0)}
            paths = {k: cells / f"{name}_confirm_{form}_{delta:g}.json" for k, (form, delta) in picks.items()}
            confirm = {k: _cell(paths[k], confirm_ref, lambda fd=picks[k]: _measure(
                oracle, _generated(lens, cfg, fd[1], fd[0], confirm_seeds), confirm_ref, cfg.confirm_seeds))
                for k in picks}
            entry = {"name": name, "scheme": scheme, "train_drift": train_drift, "train_seconds": train_seconds,
                     "sweep": sweep, "picked": {"form": best["form"], "delta": best["delta"]},
                     "confirm_picked": confirm["picked"], "confirm_no_drift": confirm["no_drift"],
                     "vs_base": frechet_difference(_features(paths["no_drift"]), _features(base_confirm),
                                                   confirm_ref).to_dict()}
            if picks["picked"] != picks["no_drift"]:  # the picked sampling drift against none, same adapter
                entry["picked_vs_no_drift"] = frechet_difference(
                    _features(paths["picked"]), _features(paths["no_drift"]), confirm_ref).to_dict()
            result["adapters"].append(entry)
            confirmed[name] = paths
    for scheme in cfg.schemes:  # drift (in training and sampling, as picked) against plain fine-tuning
        plain = confirmed.get(f"{scheme}_d0")
        for train_drift in cfg.train_drifts:
            if train_drift != 0 and plain is not None:
                drifted = confirmed[f"{scheme}_d{train_drift:g}"]
                result.setdefault("drift_vs_plain", {})[f"{scheme}_d{train_drift:g}"] = frechet_difference(
                    _features(drifted["picked"]), _features(plain["no_drift"]), confirm_ref).to_dict()
    write_atomic(folder / "result.json", json.dumps(result, indent=1).encode())
    return result
