"""What the pipeline builders of every family share: a spec's shape checks and sizes, seeded weight
initialisation, and the KL autoencoder PixArt and SD3 both use.

Examples:
    >>> import torch
    >>> with seeded(0):
    ...     a = torch.randn(2)
    >>> with seeded(0):
    ...     b = torch.randn(2)
    >>> bool((a == b).all())
    True
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict
from typing import Iterator

import torch

__all__ = ["SpecShape", "clip_encoder", "kl_vae", "seeded", "t5_encoder"]


class SpecShape:
    """Sizes shared by the builder specs (frozen dataclasses with ``num_heads``, ``head_dim``,
    ``sample_size``, ``patch_size`` and ``vae_channels``)."""

    num_heads: int
    head_dim: int
    sample_size: int
    patch_size: int
    vae_channels: tuple[int, ...]

    def check_positive(self, *names: str) -> None:
        """Refuse sizes below 1 and a sample size that is not a multiple of the patch size."""
        label = type(self).__name__
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{label}.{name} must be >= 1, got {getattr(self, name)}")
        if self.sample_size % self.patch_size:
            raise ValueError(f"{label}.sample_size ({self.sample_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def image_size(self) -> int:
        return self.sample_size * 2 ** (len(self.vae_channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]  (subclasses are dataclasses)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw weights from `seed`, leaving torch's global generator as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def kl_vae(channels: tuple[int, ...], latent_channels: int, image_size: int, **config):
    """A KL autoencoder with one block per entry of `channels` (scale factor ``2 ** (len - 1)``)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        latent_channels=latent_channels,
        norm_num_groups=min(8, *channels),
        layers_per_block=1,
        sample_size=image_size,
        **config,
    )


def clip_encoder(tokenizer, width: int, *, projection: bool = False):
    """A two-layer CLIP text encoder of `width` channels over `tokenizer`'s vocabulary (77 positions), with a
    projection of its pooled output (SD3's) or without (Flux's)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **({"projection_dim": width} if projection else {}))
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_encoder(width: int):
    """A one-layer T5 encoder of `width` channels over ByT5's byte vocabulary."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=width, d_ff=2 * width, d_kv=width // 2, num_layers=1, num_heads=2,
                                   vocab_size=384))
