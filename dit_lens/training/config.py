"""The settings of a fine-tune (`FinetuneConfig`): a frozen value, validated on creation and recorded in
``finetune.json``. Kept apart from the trainer so that reading them (the command line's flags and
defaults) loads no model code."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..validate import is_int, is_real

__all__ = ["DEFAULT_LR", "METHODS", "TEXT_ENCODER_TARGETS", "FinetuneConfig"]

METHODS = ("lora", "attn2", "full")
#: The text encoder layers a LoRA adapts (T5: attention q, k, v, o and feed-forward wi, wo).
TEXT_ENCODER_TARGETS = r".*\.(q|k|v|o|wi|wi_0|wi_1|wo)"
DEFAULT_LR = {"lora": 1e-3, "attn2": 1e-3, "full": 1e-4}


@dataclass(frozen=True)
class FinetuneConfig:
    """The settings of one fine-tune (all recorded in ``finetune.json``).

    Attributes:
        method: ``"lora"`` (LoRA on every block), ``"attn2"`` (LoRA on cross-attention) or ``"full"``.
        rank: LoRA rank r (``lora_alpha`` = r, so the update's scale does not change with r).
        steps: Optimiser steps.
        lr: AdamW learning rate after `warmup` linear steps (None: 1e-3 for LoRA, 1e-4 for full).
        batch_size: Images per step.
        drift: Latent Drifting δ of the forward process (0 = off).
        text_encoder: Also adapt the text encoder.
        seed: Seeds the LoRA initialisation and every random draw of training.
        caption_dropout: Share of captions replaced by the empty prompt, so guidance keeps working.
        warmup: Linear warm-up steps.
        checkpoint_every: Steps between checkpoints.
        validate_every: Steps between measurements of the loss on the validation images, when given.
        mixed_precision: ``None``, ``"bf16"`` or ``"fp16"`` (autocast of the forward pass; fp16 with a
            gradient scaler, on CUDA only).
    """

    method: str = "lora"
    rank: int = 8
    steps: int = 600
    lr: float | None = None
    batch_size: int = 8
    drift: float = 0.0
    text_encoder: bool = False
    seed: int = 0
    caption_dropout: float = 0.1
    warmup: int = 20
    checkpoint_every: int = 100
    validate_every: int = 50
    mixed_precision: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        for name, low in (("rank", 1), ("steps", 1), ("batch_size", 1), ("warmup", 0), ("checkpoint_every", 1),
                          ("validate_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
            object.__setattr__(self, name, int(value))
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be a whole number in [0, 2**63), got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        lr = DEFAULT_LR[self.method] if self.lr is None else self.lr
        if not is_real(lr) or not math.isfinite(float(lr)) or float(lr) <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        object.__setattr__(self, "lr", float(lr))
        if not is_real(self.drift) or not math.isfinite(float(self.drift)):
            raise ValueError(f"drift must be a finite number such as 0.05, got {self.drift!r}")
        object.__setattr__(self, "drift", float(self.drift))
        if not is_real(self.caption_dropout) or not 0 <= float(self.caption_dropout) < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout!r}")
        object.__setattr__(self, "caption_dropout", float(self.caption_dropout))
        if not isinstance(self.text_encoder, (bool, np.bool_)):
            raise ValueError(f"text_encoder must be True or False, got {self.text_encoder!r}")
        object.__setattr__(self, "text_encoder", bool(self.text_encoder))
        if self.mixed_precision not in (None, "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be None, 'bf16' or 'fp16', got {self.mixed_precision!r}")

    def to_dict(self) -> dict:
        return asdict(self)
