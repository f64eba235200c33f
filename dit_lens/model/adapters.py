"""Adapters merged into a pipeline by ``dit_lens.load(..., lora=folder)``, checked before they are used.

An adapter folder is either a fine-tune written by `dit_lens.finetune` or a plain peft adapter:

- A dit-lens fine-tune carries its sealed record ``finetune.json``, which lists a digest of every
  file dit-lens wrote there (adapter weights *and* ``adapter_config.json``, or the full weights),
  the base model's fingerprint and its architecture. Every file is checked against its digest, the
  architecture must be the pipeline's ("this adapter is for another model"), and the base fingerprint
  must be the pipeline's unless ``allow_other_base=True``.
- A plain peft folder (``adapter_config.json`` and ``adapter_model.safetensors``, as
  ``peft_model.save_pretrained`` writes) is merged as it is; it carries no digest.

Adapters are read only from local files: a folder whose weights are missing is refused here, before
peft could take its path for a model hub's name.

Examples:
    >>> import tempfile
    >>> from dit_lens.model.builders import PixArtSpec, build_pixart
    >>> from dit_lens.model.sites import family_of
    >>> pipe = build_pixart(PixArtSpec(num_layers=2))
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "adapter_config.json").write_text("{}")
    >>> merge_adapter(pipe, family_of(pipe), folder)
    Traceback (most recent call last):
    ...
    dit_lens.storage.records.MissingError: .../adapter_model.safetensors does not exist: the adapter folder ...
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..storage import MARKER, DamagedError, MissingError, check_files, digest, read_record
from .sites import Family

__all__ = ["RECORD", "architecture", "merge_adapter", "peft_quietly", "read_finetune"]

#: The sealed record of a finished dit-lens fine-tune.
RECORD = "finetune.json"
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def architecture(pipeline: Any, family: Family) -> dict:
    """What an adapter must fit: the denoiser's class and a digest of the names and shapes of the
    denoiser's and the text encoder's weights (not their values)."""
    shapes = {name: {k: list(v.shape) for k, v in module.state_dict().items()}
              for name in (family.denoiser, "text_encoder")
              if isinstance(module := getattr(pipeline, name, None), torch.nn.Module)}
    return {"denoiser_class": type(getattr(pipeline, family.denoiser)).__name__, "shapes": digest(shapes)}


def read_finetune(folder: str | Path) -> dict:
    """The sealed record of a finished fine-tune folder, after checking every file it lists.

    Raises:
        MissingError: the folder holds no record (not a finished dit-lens fine-tune).
        DamagedError: the record is unreadable or edited, or a file it lists is missing or changed.
    """
    folder = Path(folder)
    fix = f"delete {folder} and run the same fine-tune again (nothing was loaded)"
    record = read_record(folder / RECORD, what="fine-tune record", fix=fix)
    files = record.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise DamagedError(f"fine-tune record {folder / RECORD} lists no digests of its adapter files (it was "
                           f"written by an older dit-lens, or edited); {fix}")
    check_files(folder, files, record=RECORD, fix=fix, what="fine-tune folder")
    return record


def merge_adapter(pipeline: Any, family: Family, path: str | Path, *, allow_other_base: bool = False) -> Path:
    """Merge the adapter folder `path` into `pipeline` (checked as the module docstring says).

    Raises:
        FileNotFoundError: `path` is not a local folder, or a file the adapter needs is missing.
        DamagedError: a dit-lens fine-tune whose record or files are damaged.
        ValueError: the adapter is for another model, or (without `allow_other_base`) was trained on
            another base model of the same architecture.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such LoRA adapter folder: {path}; lora= takes a local folder (dit-lens never "
                                f"fetches adapters from a model hub)")
    if not path.is_dir():
        raise ValueError(f"lora={str(path)!r} is a file; pass the adapter's folder")
    if (path / RECORD).exists() or (path / MARKER).exists():
        if not (path / RECORD).exists():
            raise MissingError(f"{path} is not a finished dit-lens fine-tune (it has dit-lens's marker but no "
                               f"{RECORD}); if it is an unfinished one, run the same fine-tune again to finish it")
        record = read_finetune(path)
        _check_base(pipeline, family, path, record, allow_other_base)
        full = record.get("config", {}).get("method") == "full"
    else:
        peft_folder = (path / "adapter_config.json").is_file()
        full = not peft_folder and (path / family.denoiser / "config.json").is_file()
        if not full and not peft_folder:
            raise ValueError(f"{path} is not a peft adapter folder (no adapter_config.json) nor a dit-lens fine-tune "
                             f"(no {RECORD}); save one with `peft_model.save_pretrained(...)` or `dit_lens.finetune`")
    if full:
        _replace(pipeline, family.denoiser, path / family.denoiser)
        if (path / "text_encoder" / "config.json").is_file():
            _replace(pipeline, "text_encoder", path / "text_encoder")
        return path
    for name, folder in ((family.denoiser, path), ("text_encoder", path / "text_encoder")):
        if name == "text_encoder" and not (folder / "adapter_config.json").is_file():
            continue
        _merge_peft(pipeline, name, folder)
    return path


def _check_base(pipeline: Any, family: Family, path: Path, record: dict, allow_other_base: bool) -> None:
    base = record.get("base") if isinstance(record.get("base"), dict) else {}
    made_for, here = base.get("architecture") or {}, architecture(pipeline, family)
    if made_for != here:
        was = f"{made_for.get('denoiser_class', 'unknown')} with {base.get('num_layers', '?')} layers of width " \
              f"{base.get('width', '?')}"
        now = here["denoiser_class"] + (" of another size" if made_for.get("denoiser_class") == here["denoiser_class"]
                                        else "")
        raise ValueError(f"this adapter is for another model ({path} was trained on a {was}; this pipeline's "
                         f"denoiser is a {now}); load it onto the model it was made for ({base.get('source', '?')})")
    if allow_other_base:
        return
    from .fingerprint import fingerprint

    mine = fingerprint(pipeline)
    if base.get("fingerprint") != mine:
        raise ValueError(f"{path} was trained on another base model of this architecture (fingerprint "
                         f"{str(base.get('fingerprint'))[:12]} in its {RECORD}, this model's is {mine[:12]}); load it "
                         f"onto the model it was made for ({base.get('source', '?')}), or pass allow_other_base=True "
                         f"to apply it to this one anyway")


def _merge_peft(pipeline: Any, name: str, folder: Path) -> None:
    config = folder / "adapter_config.json"
    read_record(config, what="peft adapter config", unsealed=True,
                fix="save the adapter again with `peft_model.save_pretrained(...)`")
    if not any((folder / w).is_file() for w in _WEIGHTS):
        raise MissingError(f"{folder / _WEIGHTS[0]} does not exist: the adapter folder {folder} has a config but no "
                           f"weights; copy the adapter's weights there (dit-lens never fetches them from a model hub)")
    from peft import PeftModel

    module = getattr(pipeline, name)
    try:
        with peft_quietly():
            merged = PeftModel.from_pretrained(module, str(folder)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as err:
        first = " ".join(str(err).split())[:200]
        raise ValueError(f"this adapter is for another model: {folder} does not fit this pipeline's {name} "
                         f"({type(module).__name__}): {first}") from None
    setattr(pipeline, name, merged)
    pipeline.register_modules(**{name: merged})


@contextmanager
def peft_quietly() -> Iterator[None]:
    """Silence the deprecation warning peft triggers in transformers when it wraps a text encoder
    (third-party noise, not a behaviour of dit-lens)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _replace(pipeline: Any, name: str, folder: Path) -> None:
    """Swap the pipeline component `name` for the same class loaded from `folder`, on its device and dtype."""
    old = getattr(pipeline, name)
    first = next(old.parameters())
    new = type(old).from_pretrained(folder)
    if _shapes(new) != _shapes(old):
        raise ValueError(f"this adapter is for another model: the weights in {folder} are a {type(new).__name__} of "
                         f"another size than this pipeline's {name}; load them onto the model they were made for")
    new = new.to(device=first.device, dtype=first.dtype)
    setattr(pipeline, name, new)
    pipeline.register_modules(**{name: new})


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}
