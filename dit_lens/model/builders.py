"""Build genuine diffusers PixArt pipelines from an architecture description, with seeded weights.

These are real `PixArtAlphaPipeline` / `PixArtSigmaPipeline` objects (the same classes that load a
published checkpoint), only sized by the caller and initialised from a seed. Tests use tiny ones,
benchmarks use the published PixArt-alpha transformer shape, and the embedded world trains one.

Examples:
    >>> pipe = build_pixart(PixArtSpec(num_layers=2), seed=0)
    >>> type(pipe).__name__, len(pipe.transformer.transformer_blocks)
    ('PixArtAlphaPipeline', 2)
    >>> pipe.transformer.training
    False
"""

from __future__ import annotations

from dataclasses import dataclass

from .parts import SpecShape, kl_vae, seeded

__all__ = ["PixArtSpec", "PIXART_ALPHA_512", "build_pixart"]


@dataclass(frozen=True)
class PixArtSpec(SpecShape):
    """Shape of a PixArt pipeline. Defaults describe a tiny model for tests.

    Attributes:
        num_layers: Transformer blocks (L).
        num_heads: Attention heads per block.
        head_dim: Channels per head; the width C is ``num_heads * head_dim``.
        sample_size: Latent side length; images are ``sample_size * vae_scale`` pixels square.
        patch_size: Latent patch side; tokens N = ``(sample_size / patch_size) ** 2``.
        latent_channels: VAE latent channels.
        vae_channels: VAE ``block_out_channels``; the VAE scale factor is ``2 ** (len - 1)``.
        text_dim: T5 ``d_model`` (= the transformer's ``caption_channels``).
        text_layers: T5 encoder layers.
        text_heads: T5 attention heads.
        prediction_type: Scheduler parameterisation, ``"epsilon"`` or ``"v_prediction"``.
        sigma: Build a `PixArtSigmaPipeline` instead of a `PixArtAlphaPipeline`.
    """

    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 8
    sample_size: int = 8
    patch_size: int = 2
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (8, 16)
    text_dim: int = 32
    text_layers: int = 1
    text_heads: int = 2
    prediction_type: str = "epsilon"
    sigma: bool = False

    def __post_init__(self) -> None:
        self.check_positive("num_layers", "num_heads", "head_dim", "sample_size", "patch_size", "text_dim")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"PixArtSpec.prediction_type must be 'epsilon' or 'v_prediction', "
                f"got {self.prediction_type!r}"
            )

    @classmethod
    def from_dict(cls, data: dict) -> "PixArtSpec":
        data = dict(data)
        data["vae_channels"] = tuple(data["vae_channels"])
        return cls(**data)


#: The published PixArt-XL-2-512x512 transformer (28 blocks, width 1152, 1024 tokens at 512 px).
#: The text encoder and VAE are kept small: their size does not change what dit-lens hooks.
PIXART_ALPHA_512 = PixArtSpec(
    num_layers=28,
    num_heads=16,
    head_dim=72,
    sample_size=64,
    patch_size=2,
    vae_channels=(32, 32, 64, 64),
    text_dim=4096,
    text_layers=1,
    text_heads=8,
)


def build_pixart(spec: PixArtSpec, *, seed: int = 0):
    """A PixArt pipeline of shape `spec` with weights drawn from `seed`, in eval mode.

    The tokenizer is the byte-level ``ByT5Tokenizer``, which needs no vocabulary files.
    """
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    with seeded(seed):
        transformer = PixArtTransformer2DModel(
            sample_size=spec.sample_size,
            num_layers=spec.num_layers,
            attention_head_dim=spec.head_dim,
            num_attention_heads=spec.num_heads,
            in_channels=spec.latent_channels,
            out_channels=2 * spec.latent_channels,
            patch_size=spec.patch_size,
            cross_attention_dim=spec.width,
            caption_channels=spec.text_dim,
            norm_type="ada_norm_single",
            num_embeds_ada_norm=1000,
            interpolation_scale=max(spec.sample_size // 64, 1),
        )
        vae = kl_vae(spec.vae_channels, spec.latent_channels, spec.image_size)
        text_encoder = T5EncoderModel(
            T5Config(
                d_model=spec.text_dim,
                d_ff=2 * spec.text_dim,
                d_kv=spec.text_dim // spec.text_heads,
                num_layers=spec.text_layers,
                num_heads=spec.text_heads,
                vocab_size=384,  # ByT5: 256 bytes + 3 specials + 125 sentinels
            )
        )
    scheduler = DPMSolverMultistepScheduler(prediction_type=spec.prediction_type)
    pipeline_cls = PixArtSigmaPipeline if spec.sigma else PixArtAlphaPipeline
    pipeline = pipeline_cls(
        tokenizer=ByT5Tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    for module in (transformer, vae, text_encoder):
        module.eval().requires_grad_(False)
    return pipeline
