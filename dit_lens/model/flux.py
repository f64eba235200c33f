"""Build genuine diffusers Flux pipelines (`FluxPipeline`) of any size, with seeded weights.

Flux's denoiser (`FluxTransformer2DModel`) runs two lists of blocks: *double-stream* blocks
(``transformer_blocks``), each a joint attention over the text and image tokens that returns both streams
as SD3's do, then *single-stream* blocks (``single_transformer_blocks``) over one sequence
``[text tokens; image tokens]``. dit-lens numbers them as one stack of layers, double-stream first
(`Family.single`). Flux is guidance-distilled (the guidance scale is an input of the transformer, no
unconditional batch), packs 2×2 latent patches into one token, and samples by flow matching. Tests build
tiny ones; a user's Flux folder loads through the same path.

Examples:
    >>> pipe = build_flux(FluxSpec(num_layers=1, num_single_layers=2), seed=0)
    >>> type(pipe).__name__, len(pipe.transformer.transformer_blocks), len(pipe.transformer.single_transformer_blocks)
    ('FluxPipeline', 1, 2)
"""

from __future__ import annotations

from dataclasses import dataclass

from .parts import SpecShape, clip_encoder, kl_vae, seeded, t5_encoder

__all__ = ["FluxSpec", "build_flux"]


@dataclass(frozen=True)
class FluxSpec(SpecShape):
    """Shape of a Flux pipeline. Defaults describe a tiny model for tests.

    Attributes:
        num_layers: Double-stream blocks (they come first in dit-lens' layer numbering).
        num_single_layers: Single-stream blocks (layers ``num_layers`` … ``num_layers + num_single_layers - 1``).
        num_heads: Attention heads per block.
        head_dim: Channels per head; the width C is ``num_heads * head_dim``. Flux's rotary embedding
            splits it into three axes (`rope_axes`), which must add up to it.
        sample_size: Latent side length (even: latents are packed in 2×2 patches, so image tokens
            N = ``(sample_size / 2) ** 2``); images are ``sample_size * vae_scale`` pixels square.
        latent_channels: VAE latent channels (the transformer sees ``4 *`` that per packed token).
        vae_channels: VAE ``block_out_channels``; the scale factor is ``2 ** (len - 1)``.
        clip_dim: Hidden size of the CLIP text encoder (its pooled output conditions every block).
        t5_dim: Hidden size of the T5 text encoder (the transformer's ``joint_attention_dim``).
        guidance_embeds: A guidance-distilled model (Flux-dev): the guidance scale is embedded.
    """

    num_layers: int = 1
    num_single_layers: int = 2
    num_heads: int = 2
    head_dim: int = 8
    sample_size: int = 8
    patch_size: int = 2  # the pipeline's 2×2 packing (the transformer's own patch size is 1)
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (8, 16)
    clip_dim: int = 16
    t5_dim: int = 32
    guidance_embeds: bool = True

    def __post_init__(self) -> None:
        self.check_positive("num_layers", "num_heads", "head_dim", "sample_size", "clip_dim", "t5_dim")
        if self.num_single_layers < 0:
            raise ValueError(f"FluxSpec.num_single_layers must be >= 0, got {self.num_single_layers}")
        if self.patch_size != 2:
            raise ValueError(f"FluxSpec.patch_size is Flux's 2×2 latent packing and must be 2, got {self.patch_size}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"FluxSpec.head_dim must be even and at least 6 (three rotary axes of even size), "
                             f"got {self.head_dim}")

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """The rotary embedding's three axis sizes (text position, row, column), even, adding up to ``head_dim``."""
        side = (self.head_dim // 3) // 2 * 2
        return (self.head_dim - 2 * side, side, side)


def build_flux(spec: FluxSpec, *, seed: int = 0):
    """A `FluxPipeline` of shape `spec` with weights drawn from `seed`, in eval mode: a CLIP text encoder
    (byte-level tokenizer, `dit_lens.model.sd3.clip_tokenizer`) whose pooled output conditions the blocks,
    and a T5 encoder (``ByT5Tokenizer``) whose tokens are the text the image attends to, as Flux has."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import ByT5Tokenizer

    from .sd3 import clip_tokenizer

    tokenizer = clip_tokenizer()
    with seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * spec.latent_channels,
            num_layers=spec.num_layers,
            num_single_layers=spec.num_single_layers,
            attention_head_dim=spec.head_dim,
            num_attention_heads=spec.num_heads,
            joint_attention_dim=spec.t5_dim,
            pooled_projection_dim=spec.clip_dim,
            guidance_embeds=spec.guidance_embeds,
            axes_dims_rope=spec.rope_axes,
        )
        text_encoder = clip_encoder(tokenizer, spec.clip_dim)
        text_encoder_2 = t5_encoder(spec.t5_dim)
        # Flux's autoencoder: no quant convs, shifted and scaled latents; its sample_size is the image side
        # dit-lens generates at by default (Flux's transformer config has none)
        vae = kl_vae(spec.vae_channels, spec.latent_channels, spec.image_size, use_quant_conv=False,
                     use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    pipeline = FluxPipeline(
        transformer=transformer,
        # Flux's sampler: resolution-dependent timestep shift
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=ByT5Tokenizer(),
    )
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    return pipeline
