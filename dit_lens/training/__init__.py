"""Making adapters: fine-tuning a lens's denoiser on captioned images (`finetune`), the data it reads
(`read_image_folder`, the Hugging Face ``imagefolder`` layout) and writes (`write_image_folder`)."""

from .data import TrainingImages, read_image_folder, write_image_folder
from .finetune import METHODS, FinetuneConfig, finetune, read_record

__all__ = ["METHODS", "FinetuneConfig", "TrainingImages", "finetune", "read_image_folder", "read_record",
           "write_image_folder"]
