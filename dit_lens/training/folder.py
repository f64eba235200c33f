"""A fine-tune's folder: claimed through `dit_lens.storage`, its sealed record (``finetune.json``) and
its checkpoint.

The folder is claimed with ``claim(out, "finetune", identity=...)``, the identity being values only:
the settings, the digests of the training and validation data and the base model's fingerprint
(which covers an adapter merged into it), never how a path was spelled. The folder's lock is held
for the whole fine-tune (`holding`), so a second fine-tune into the same folder waits for the first
when it is the same one (and then finds it finished), and is refused at once when it is another.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..model.adapters import RECORD, architecture, read_finetune
from ..storage import (MARKER, Claim, DamagedError, FolderClaimError, MissingError, claim, differences, exclusive,
                       read_record as read_sealed, try_exclusive)
from .data import TrainingImages, read_image_folder

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["CHECKPOINT", "RECORD", "base_model", "claim_run", "holding", "read_record", "release_new",
           "training_images", "use_line"]

CHECKPOINT = "checkpoint.pt"
KIND = "finetune"


def read_record(folder: str | Path) -> dict:
    """The ``finetune.json`` of a finished fine-tune's folder, checked against its digest and the
    digests of the files it lists."""
    folder = Path(folder)
    if not (folder / RECORD).is_file():
        raise MissingError(f"{folder} holds no {RECORD}: it is not a finished dit-lens fine-tune; run the "
                           f"fine-tune (again) to finish it")
    return read_finetune(folder)


def training_images(data: TrainingImages | str | Path, side: int, what: str) -> TrainingImages:
    if not isinstance(data, TrainingImages):
        data = read_image_folder(data, size=side)
    if data.images.shape[1:3] != (side, side):
        raise ValueError(f"the {what} images are {data.images.shape[1]}x{data.images.shape[2]} px but the model "
                         f"makes {side}x{side}; read them with read_image_folder(path, size={side})")
    return data


def base_model(lens: Lens) -> dict:
    """The base model a fine-tune starts from, as recorded: where it came from (for people), its
    fingerprint (what identifies it), the adapter merged into it, and its architecture (what an
    adapter made from it fits)."""
    prov = lens.provenance()
    return {"source": str(lens.source), "fingerprint": prov["model_fingerprint"], "lora": prov["lora"],
            "dit_lens": prov["dit_lens_version"], "num_layers": prov["num_layers"], "width": prov["width"],
            "architecture": architecture(lens.pipeline, lens.family)}


@contextlib.contextmanager
def holding(out: Path, identity: dict) -> Iterator[None]:
    """Hold `out`'s lock for the ``with`` body. While another process holds it, a fine-tune with
    other settings is refused at once (naming what differs); the same one waits for it."""
    lock = try_exclusive(out)
    if lock is not None:
        try:
            yield
        finally:
            lock.release()
        return
    _refuse_other(out, identity, busy=True)
    with exclusive(out):
        yield


def _refuse_other(out: Path, identity: dict, *, busy: bool = False) -> None:
    if not (out / MARKER).is_file():
        return
    try:
        found = read_sealed(out / MARKER, what="the marker of")
    except (DamagedError, MissingError):
        return  # claim() says what is wrong with it
    if found.get("kind") != KIND or found.get("identity") == identity:
        return
    diffs = "; ".join(f"{key}: {_short(old)} there, {_short(new)} now"
                      for key, old, new in differences(found.get("identity"), identity)[:6])
    doing = "is being written by another fine-tune" if busy else "holds a dit-lens fine-tune"
    raise FolderClaimError(f"--out {out} {doing} with other settings or data ({diffs}); fine-tune into a new "
                           f"folder, or run it again with those settings to resume or reuse it (nothing was changed)")


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def claim_run(out: Path, identity: dict) -> tuple[Claim, str]:
    """Claim `out` (holding its lock) for the fine-tune of `identity`: ``(claim, state)`` with state
    ``"new"``, ``"resume"`` (a checkpoint of this run is there) or ``"finished"`` (its record and
    every file it lists checked)."""
    _refuse_other(out, identity)
    folder = claim(out, KIND, identity=identity, what="--out")
    if (out / RECORD).is_file():
        read_record(out)
        return folder, "finished"
    return folder, "resume" if (out / CHECKPOINT).is_file() else "new"


def release_new(folder: Claim, existed: bool) -> None:
    """Give back a folder claimed for a run that wrote nothing (its marker removed; the folder too if
    this run made it), so it can be used for other settings."""
    if any((folder.path / name).exists() for name in folder.files):
        return
    (folder.path / MARKER).unlink(missing_ok=True)
    if not existed and folder.path.is_dir() and not any(folder.path.iterdir()):
        folder.path.rmdir()


def place(folder: Claim, built: Path) -> list[str]:
    """Move what was saved into `built` (a temporary folder inside the claimed one) into place, each
    entry recorded first; an entry of an earlier unfinished save of this run is replaced."""
    names = sorted(p.name for p in built.iterdir())
    folder.record(*names)
    for name in names:
        target = folder.path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # recorded by this run before it was written: dit-lens's own
        (built / name).replace(target)
    built.rmdir()
    return names


def use_line(folder: Path, source: str, drift: float) -> str:
    """How to load the fine-tune in `folder` (where it is now) onto `source`."""
    line = f"dit_lens.load({source!r}, lora={str(folder)!r})"
    return line + (f", sampling with dit_lens.LatentDrift({drift}, steps=None) (z_T only, as it was trained)" if drift else "")
