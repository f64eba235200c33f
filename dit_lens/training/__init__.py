"""Making adapters: fine-tuning a lens's denoiser on captioned images (`finetune`), the data it reads
(`read_image_folder`, the Hugging Face ``imagefolder`` layout) and writes (`write_image_folder`).

Each name is imported on first use, so the settings (`dit_lens.training.config`) load without torch."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = ["METHODS", "FinetuneConfig", "TrainingImages", "finetune", "read_image_folder", "read_record",
           "write_image_folder"]

_HOME = {"METHODS": "config", "FinetuneConfig": "config", "TrainingImages": "data", "read_image_folder": "data",
         "write_image_folder": "data", "finetune": "trainer", "read_record": "trainer"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'dit_lens.training' has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .config import METHODS, FinetuneConfig
    from .data import TrainingImages, read_image_folder, write_image_folder
    from .trainer import finetune, read_record
