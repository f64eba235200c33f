"""A fine-tune's folder: its record (``finetune.json``), its checkpoint, and what may be written there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .data import TrainingImages, read_image_folder

__all__ = ["CHECKPOINT", "RECORD", "base_model", "claim_folder", "read_record", "training_images"]

RECORD, CHECKPOINT = "finetune.json", "checkpoint.pt"


def read_record(folder: str | Path) -> dict:
    """The ``finetune.json`` of a fine-tune's folder."""
    path = Path(folder) / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {RECORD}: it is not a finished dit-lens fine-tune")
    return json.loads(path.read_text())


def training_images(data: TrainingImages | str | Path, side: int, what: str) -> TrainingImages:
    if not isinstance(data, TrainingImages):
        data = read_image_folder(data, size=side)
    if data.images.shape[1:3] != (side, side):
        raise ValueError(f"the {what} images are {data.images.shape[1]}x{data.images.shape[2]} px but the model "
                         f"makes {side}x{side}; read them with read_image_folder(path, size={side})")
    return data


def base_model(lens: Any) -> dict:
    """The base model a fine-tune starts from (a resumed run must start from the same one)."""
    prov = lens.provenance()
    return {"source": str(lens.source), "fingerprint": prov["model_fingerprint"], "lora": prov["lora"],
            "dit_lens": prov["dit_lens_version"]}


def claim_folder(out: Path, identity: dict) -> str:
    """``"new"``, ``"resume"`` or ``"finished"``; refuses a folder holding anything else."""
    if (out / RECORD).is_file():
        record = json.loads((out / RECORD).read_text())
        if {k: record.get(k) for k in ("config", "base", "validation_data")} == \
                {"config": identity["config"], "base": identity["base"], "validation_data": identity["validation"]} and \
                record.get("data", {}).get("digest") == identity["data"]:
            return "finished"
        raise FileExistsError(f"{out} holds a finished fine-tune with other settings or data; pick a new folder")
    if (out / CHECKPOINT).is_file():
        meta = torch.load(out / CHECKPOINT, weights_only=False, map_location="cpu")["identity"]
        if meta != identity:
            raise FileExistsError(f"{out} holds an unfinished fine-tune with other settings or data; resume it with "
                                  f"those settings, or pick a new folder")
        return "resume"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; fine-tune into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    return "new"


