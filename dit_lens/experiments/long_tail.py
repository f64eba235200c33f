"""The long tail: how often a class the fine-tuning data barely shows is generated, before and after
initial-noise optimisation (seed 003's second abstract at this scale).

A LoRA is fine-tuned (`dit_lens.finetune`) on the world's shifted split with ``per_class`` images of
every class but `label`, which gets ``count``. For each guidance scale, the class's canonical prompt is
generated from fresh seeds; the oracle reads each image, and the seeds' noise is optimised
(`dit_lens.optimize_noise`) for each objective:

- ``class_probability``: the oracle's log-probability of the class, stopping a seed at p ≥ `target`.
  The judge that is optimised is the judge that reads the result, so its rate says the optimisation
  works on the real run, not that a second reader would agree;
- ``attention_concentration``: the class word's cross-attention concentration in the first quarter of
  the run. It never sees the oracle, so the oracle reading its images is an independent judge.

Reported per guidance scale and objective: the rate the class is read before (each seed's own noise)
and after (its optimised noise), with Wilson intervals, the paired change, how far the noise moved and
how Gaussian it stayed (`OptimizedNoise.report`), and the time; the shipped model's rate beside them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..interventions.generate import generate
from ..optimize import attention_concentration, class_probability, optimize_noise
from ..metrics import estimate, proportion
from ..storage import write_atomic
from ..training.trainer import finetune, read_record
from ..world.data import world_split
from ..world.judges import load_oracle
from ..world.procedural import LABELS, caption
from .folders import cached_json, claim_experiment

__all__ = ["LongTailConfig", "OBJECTIVES", "run_long_tail"]

OBJECTIVES = ("class_probability", "attention_concentration")


@dataclass(frozen=True)
class LongTailConfig:
    """One long-tail study.

    Attributes:
        label: The rare class; `count` training images of it, `per_class` of every other class.
        steps, rank, seed: The LoRA's fine-tuning settings.
        seeds, seed_base: Generated images per cell and their first seed (fresh: not used elsewhere).
        guidance_scales: Classifier-free guidance scales to measure at (a class is missed more at low ones).
        objectives: Among `OBJECTIVES`.
        iterations, lr, max_angle: `optimize_noise`'s.
        target: The probability at which ``class_probability`` stops a seed.
        num_inference_steps: Steps of every run.
    """

    label: str = "esophagitis"
    count: int = 3
    per_class: int = 20
    steps: int = 600
    rank: int = 8
    seed: int = 0
    seeds: int = 64
    seed_base: int = 100_000
    guidance_scales: tuple[float, ...] = (4.5, 1.0)
    objectives: tuple[str, ...] = OBJECTIVES
    iterations: int = 20
    lr: float = 0.05
    max_angle: float = 0.25
    target: float = 0.9
    num_inference_steps: int = 20

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"LongTailConfig.label {self.label!r} is not a world class; choose one of {list(LABELS)}")
        if not 1 <= self.count <= self.per_class:
            raise ValueError(f"LongTailConfig.count must be between 1 and per_class ({self.per_class}), got {self.count}")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives:
            raise ValueError(f"LongTailConfig.objectives must be among {list(OBJECTIVES)}, got {list(self.objectives)}")
        if not self.guidance_scales or self.seeds < 1:
            raise ValueError("LongTailConfig needs at least one guidance scale and one seed")
        if not 0 < self.target < 1:
            raise ValueError(f"LongTailConfig.target is a probability in (0, 1), got {self.target}")

    def to_dict(self) -> dict:
        return asdict(self)


def _objective(name: str, cfg: LongTailConfig, oracle: Any) -> tuple[Any, float | None]:
    if name == "class_probability":
        return class_probability(oracle, cfg.label), math.log(cfg.target)
    return attention_concentration(cfg.label), None


def _read(oracle: Any, images: np.ndarray, label: str) -> np.ndarray:
    return oracle(images).argmax(1) == list(oracle.labels).index(label)  # (seeds,) bool


def run_long_tail(cfg: LongTailConfig, folder: str | Path, *, source: str = "embedded", progress: bool = True,
                  overwrite: bool = False) -> dict:
    """Fine-tune the long-tail LoRA, then measure every (guidance scale, objective) cell.

    The adapter and every cell are kept in `folder` (``adapter/``, ``cells/``); a re-run reuses them.
    The folder is claimed for the settings and the base model's weights (`claim_experiment`); with
    `overwrite`, a long-tail folder of other settings is replaced (only what dit-lens wrote there).
    Returns (and writes to ``folder/result.json``) the settings, the adapter's record and the cells.
    """
    from ..model.lens import load

    settings = json.loads(json.dumps(cfg.to_dict()))
    oracle, base = load_oracle(), load(source)
    folder = Path(folder)
    claim_experiment(folder, "long_tail", {"settings": settings, "model_fingerprint": base.fingerprint},
                     entries=("adapter", "cells", "result.json"), overwrite=overwrite)
    log = print if progress else (lambda *a: None)
    data = world_split("shifted", per_class=cfg.per_class, counts={cfg.label: cfg.count})
    adapter = finetune(base, data, folder / "adapter", method="lora", rank=cfg.rank, steps=cfg.steps, seed=cfg.seed,
                       progress=progress)
    lens = load(source, lora=adapter)
    prompt, seeds = caption(cfg.label), [cfg.seed_base + i for i in range(cfg.seeds)]
    record = read_record(adapter)
    result: dict = {"settings": settings, "prompt": prompt, "seeds": [seeds[0], seeds[-1]],
                    "adapter": {"path": str(adapter), "train_seconds": record.get("train_seconds"),
                                "per_caption": record.get("data", {}).get("per_caption")}, "cells": []}
    for g in cfg.guidance_scales:
        def shipped(g=g) -> dict:
            out = generate(base, prompt, seeds=seeds, num_inference_steps=cfg.num_inference_steps, guidance_scale=g,
                           progress=False)
            return {"read": _read(oracle, out["image"].sel(prompt=prompt, branch="original").values, cfg.label).tolist()}

        base_cell = cached_json(folder / "cells" / f"shipped_g{g:g}.json", shipped)
        for name in cfg.objectives:
            def cell(g=g, name=name) -> dict:
                objective, target = _objective(name, cfg, oracle)
                start = time.perf_counter()
                z = optimize_noise(lens, prompt, seeds=seeds, objective=objective, iterations=cfg.iterations,
                                   lr=cfg.lr, max_angle=cfg.max_angle, target=target,
                                   num_inference_steps=cfg.num_inference_steps, guidance_scale=g, progress=progress)
                seconds = time.perf_counter() - start
                out = generate(lens, prompt, seeds=seeds, edits=[z], num_inference_steps=cfg.num_inference_steps,
                               guidance_scale=g, progress=False)
                image = out["image"].sel(prompt=prompt)
                report = z.report()
                return {"before": _read(oracle, image.sel(branch="original").values, cfg.label).tolist(),
                        "after": _read(oracle, image.sel(branch="edited").values, cfg.label).tolist(),
                        "optimise_seconds": round(seconds, 1), "objective": z.objective,
                        "objective_before": report["before"].values.tolist(),
                        "objective_after": report["after"].values.tolist(),
                        **{k: report[k].values.tolist() for k in ("cosine", "norm_ratio", "ks_pvalue", "best_iteration")}}

            measured = cached_json(folder / "cells" / f"{name}_g{g:g}.json", cell)
            before, after = np.array(measured["before"]), np.array(measured["after"])
            moved = np.array(measured["best_iteration"]) > 0
            entry = {"guidance_scale": g, "objective": name, "shipped": proportion(base_cell["read"]).to_dict(),
                     "before": proportion(before).to_dict(), "after": proportion(after).to_dict(),
                     "change": estimate(after.astype(float) - before.astype(float)).to_dict(),
                     "moved": int(moved.sum()), "cosine_min": float(np.min(measured["cosine"])),
                     "norm_ratio_range": [float(np.min(measured["norm_ratio"])), float(np.max(measured["norm_ratio"]))],
                     "ks_pvalue_min": float(np.min(measured["ks_pvalue"])),
                     "optimise_seconds": measured["optimise_seconds"], "n": len(before)}
            result["cells"].append(entry)
            log(f"long tail g {g:g} {name}: {cfg.label} read {entry['before']['value']:.3f} -> "
                f"{entry['after']['value']:.3f} (shipped {entry['shipped']['value']:.3f}), n {len(before)}")
    write_atomic(folder / "result.json", json.dumps(result, indent=1).encode())
    return result
