"""Build genuine diffusers Stable Diffusion 3 pipelines (`StableDiffusion3Pipeline`) of any size, with
seeded weights.

SD3's denoiser (`SD3Transformer2DModel`, an MMDiT) has no separate cross-attention: each block runs one
*joint* attention over the image tokens and the text tokens together, and returns both streams. dit-lens
takes the image stream of that attention's output as the text-conditioning site ``attn2``
(`Family.outputs` says which element of the tuple it is). SD3 samples by flow matching. Tests build tiny ones; a user's SD3
folder loads through the same path.

Examples:
    >>> pipe = build_sd3(SD3Spec(num_layers=2), seed=0)
    >>> type(pipe).__name__, type(pipe.transformer).__name__, len(pipe.transformer.transformer_blocks)
    ('StableDiffusion3Pipeline', 'SD3Transformer2DModel', 2)
"""

from __future__ import annotations

from dataclasses import dataclass

from .parts import SpecShape, clip_encoder, kl_vae, seeded, t5_encoder

__all__ = ["SD3Spec", "build_sd3"]


@dataclass(frozen=True)
class SD3Spec(SpecShape):
    """Shape of an SD3 pipeline. Defaults describe a tiny model for tests.

    Attributes:
        num_layers: Joint transformer blocks (L).
        num_heads: Attention heads per block.
        head_dim: Channels per head; the width C is ``num_heads * head_dim``.
        sample_size: Latent side length; images are ``sample_size * vae_scale`` pixels square.
        patch_size: Latent patch side; image tokens N = ``(sample_size / patch_size) ** 2``.
        latent_channels: VAE latent channels.
        vae_channels: VAE ``block_out_channels``; the scale factor is ``2 ** (len - 1)``.
        clip_dim: Hidden size of each of the two CLIP text encoders.
        t5_dim: Hidden size of the T5 text encoder (the transformer's ``joint_attention_dim``).
        flow_shift: The flow-matching sampler's timestep shift.
    """

    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 8
    sample_size: int = 8
    patch_size: int = 2
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (8, 16)
    clip_dim: int = 16
    t5_dim: int = 32
    flow_shift: float = 3.0

    def __post_init__(self) -> None:
        self.check_positive("num_layers", "num_heads", "head_dim", "sample_size", "patch_size", "clip_dim", "t5_dim")
        if 2 * self.clip_dim > self.t5_dim:
            raise ValueError(f"SD3Spec.t5_dim ({self.t5_dim}) must be at least the two CLIP widths together "
                             f"({2 * self.clip_dim}): SD3 pads the CLIP embeddings to the T5 width")



def clip_tokenizer():
    """A byte-level CLIP tokenizer without merges: one token per byte (a word's last byte marks its end),
    the same pre-tokenisation and specials as CLIP's, needing no vocabulary files."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"{c}</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_sd3(spec: SD3Spec, *, seed: int = 0):
    """A `StableDiffusion3Pipeline` of shape `spec` with weights drawn from `seed`, in eval mode: two CLIP
    text encoders with projection (byte-level tokenizers, `clip_tokenizer`) and a T5 encoder (``ByT5Tokenizer``),
    as SD3 has."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import ByT5Tokenizer

    tokenizer = clip_tokenizer()
    with seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=spec.sample_size,
            patch_size=spec.patch_size,
            in_channels=spec.latent_channels,
            out_channels=spec.latent_channels,
            num_layers=spec.num_layers,
            attention_head_dim=spec.head_dim,
            num_attention_heads=spec.num_heads,
            joint_attention_dim=spec.t5_dim,
            caption_projection_dim=spec.width,
            pooled_projection_dim=2 * spec.clip_dim,
            pos_embed_max_size=spec.sample_size // spec.patch_size,
        )
        text_encoder = clip_encoder(tokenizer, spec.clip_dim, projection=True)
        text_encoder_2 = clip_encoder(tokenizer, spec.clip_dim, projection=True)
        text_encoder_3 = t5_encoder(spec.t5_dim)
        vae = kl_vae(spec.vae_channels, spec.latent_channels, spec.image_size, use_quant_conv=False,
                     use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)  # SD3's: shifted too
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=spec.flow_shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=ByT5Tokenizer(),
    )
    for module in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        module.eval().requires_grad_(False)
    return pipeline
