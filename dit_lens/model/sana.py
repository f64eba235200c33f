"""Build genuine diffusers SANA pipelines (`SanaPipeline`) of any size, with seeded weights.

SANA's denoiser (`SanaTransformer2DModel`) differs from PixArt's where dit-lens looks: its
self-attention is *linear* attention (no softmax weights to read), its cross-attention is ordinary
softmax attention over the text tokens, its feed-forward is a convolution over the token grid, and it
samples by flow matching. Tests build tiny ones; a user's SANA folder loads through the same path.

Examples:
    >>> pipe = build_sana(SanaSpec(num_layers=2), seed=0)
    >>> type(pipe).__name__, type(pipe.transformer).__name__, len(pipe.transformer.transformer_blocks)
    ('SanaPipeline', 'SanaTransformer2DModel', 2)
"""

from __future__ import annotations

from dataclasses import dataclass

from .parts import SpecShape, seeded

__all__ = ["SanaSpec", "build_sana"]


@dataclass(frozen=True)
class SanaSpec(SpecShape):
    """Shape of a SANA pipeline. Defaults describe a tiny model for tests.

    Attributes:
        num_layers: Transformer blocks (L).
        num_heads: Self-attention heads per block (and cross-attention heads).
        head_dim: Channels per head; the width C is ``num_heads * head_dim``.
        sample_size: Latent side length; images are ``sample_size * vae_scale`` pixels square (a
            multiple of 32: `SanaPipeline` refuses other sizes).
        patch_size: Latent patch side; tokens N = ``(sample_size / patch_size) ** 2``.
        latent_channels: Latent channels of the (deep-compression) VAE.
        vae_channels: The VAE's ``block_out_channels``; its scale factor is ``2 ** (len - 1)``.
        text_dim: The Gemma-2 text encoder's hidden size (the transformer's ``caption_channels``).
        text_layers: Text encoder layers.
        flow_shift: The flow-matching sampler's timestep shift.
    """

    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 8
    sample_size: int = 16
    patch_size: int = 2
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (8, 16)
    text_dim: int = 32
    text_layers: int = 1
    flow_shift: float = 3.0

    def __post_init__(self) -> None:
        self.check_positive("num_layers", "num_heads", "head_dim", "sample_size", "patch_size", "text_dim", "text_layers")
        if self.image_size % 32:
            raise ValueError(f"SanaSpec makes {self.image_size}-pixel images, but SanaPipeline needs a multiple of 32; "
                             f"change sample_size or vae_channels")


def build_sana(spec: SanaSpec, *, seed: int = 0):
    """A `SanaPipeline` of shape `spec` with weights drawn from `seed`, in eval mode.

    The tokenizer is the byte-level ``ByT5Tokenizer`` (no vocabulary files); the text encoder is a
    Gemma-2 model of that vocabulary, as SANA's is a Gemma-2.
    """
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import ByT5Tokenizer, Gemma2Config, Gemma2Model

    with seeded(seed):
        transformer = SanaTransformer2DModel(
            in_channels=spec.latent_channels,
            out_channels=spec.latent_channels,
            num_attention_heads=spec.num_heads,
            attention_head_dim=spec.head_dim,
            num_layers=spec.num_layers,
            num_cross_attention_heads=spec.num_heads,
            cross_attention_head_dim=spec.head_dim,
            cross_attention_dim=spec.width,
            caption_channels=spec.text_dim,
            sample_size=spec.sample_size,
            patch_size=spec.patch_size,
        )
        levels = len(spec.vae_channels)
        vae = AutoencoderDC(
            in_channels=3,
            latent_channels=spec.latent_channels,
            attention_head_dim=spec.vae_channels[0],
            encoder_block_types=("ResBlock",) * levels,
            decoder_block_types=("ResBlock",) * levels,
            encoder_block_out_channels=spec.vae_channels,
            decoder_block_out_channels=spec.vae_channels,
            encoder_layers_per_block=(1,) * levels,
            decoder_layers_per_block=(1,) * levels,
            encoder_qkv_multiscales=((),) * levels,
            decoder_qkv_multiscales=((),) * levels,
            scaling_factor=0.41407,
        )
        heads = 2 if spec.text_dim % 2 == 0 else 1
        text_encoder = Gemma2Model(Gemma2Config(
            vocab_size=384,  # ByT5: 256 bytes + 3 specials + 125 sentinels
            hidden_size=spec.text_dim,
            intermediate_size=2 * spec.text_dim,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=heads,
            num_key_value_heads=1,
            head_dim=spec.text_dim // heads,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
        ))
    pipeline = SanaPipeline(
        tokenizer=ByT5Tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=spec.flow_shift),
    )
    for module in (transformer, vae, text_encoder):
        module.eval().requires_grad_(False)
    return pipeline
