"""Images in and out of the latent space as the pipeline moves them: `check_images`, `encode`, `noised`, `noise_field`
and `check_levels` (given images at noise levels, for readouts), and the one decode every loop shares.

`decode_images` is the pipeline's VAE decode and postprocess in torch, differentiable in the latents (the
differentiable loop of `dit_lens.sampling.loop` and initial-noise optimisation differentiate it); `decode`
runs it without gradients, a batch at a time, and returns numpy images as the pipeline's ``output_type="np"``
does (inversion, the x₀ lens, patching). Latents are unscaled by the VAE's ``scaling_factor`` and, where the
pipeline shifts them (SD3, Flux: `dit_lens.model.head.Head.shifted`), shifted by its ``shift_factor``.

Examples:
    >>> import numpy as np, torch
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=1)))
    >>> check_images(np.zeros((16, 16, 3), np.float32), lens).shape  # one image becomes a batch of one
    (1, 16, 16, 3)
    >>> latents = encode(lens, np.full((1, 16, 16, 3), 0.5, np.float32))
    >>> images = decode(lens, latents)  # (n, H, W, 3) float32 in [0, 1]
    >>> images.shape, images.dtype.name
    ((1, 16, 16, 3), 'float32')
    >>> bool(np.array_equal(images, decode_images(lens, latents).permute(0, 2, 3, 1).numpy()))  # the same decode
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..model.head import head_of
from ..model.lens import Lens
from ..validate import as_array

__all__ = ["check_images", "decode", "decode_images", "encode"]


def check_images(images: Any, lens: Lens) -> np.ndarray:
    """Images as float32 ``(n, H, W, 3)`` in [0, 1] at the model's size; clear errors otherwise.

    Accepts a numpy array, a torch tensor or an xarray DataArray (``(..., y, x, rgb)``), float in [0, 1]
    or uint8 in 0–255, one image ``(H, W, 3)`` or a batch.
    """
    images = as_array(images)  # an xarray DataArray (e.g. generate()'s image) or a tensor
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a numpy array, torch tensor or xarray DataArray of shape (n, H, W, 3), "
                        f"got {type(images).__name__}")
    height, width = lens.pipeline_kwargs["height"], lens.pipeline_kwargs["width"]
    if images.ndim == 3 and images.shape[-1] == 3:
        images = images[None]
    if images.ndim in (3, 4) and images.shape[-1] == 4:
        raise ValueError(f"images of shape {images.shape} have 4 channels (RGBA?): drop the alpha channel, "
                         f"e.g. images[..., :3]")
    if images.ndim in (3, 4) and images.shape[-3] == 3 and images.shape[-1] != 3:
        raise ValueError(f"images of shape {images.shape} look channels-first: the model takes channels last "
                         f"(n, H, W, 3); transpose them, e.g. np.moveaxis(images, -3, -1)")
    if images.ndim == 2 or (images.ndim == 3 and images.shape[-1] != 3) or (images.ndim == 4 and images.shape[-1] == 1):
        raise ValueError(f"images of shape {images.shape} look grayscale: the model takes RGB (n, H, W, 3); "
                         f"repeat the channel, e.g. np.repeat(gray[..., None], 3, axis=-1)")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (n, H, W, 3) or one (H, W, 3), channels last, got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch: give at least one image")
    if images.shape[1:3] != (height, width):
        raise ValueError(f"images are {images.shape[1]}×{images.shape[2]} but the model makes {height}×{width}; "
                         f"resize them (e.g. PIL.Image.resize) before editing")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if images.dtype.kind != "f":
        raise ValueError(f"images have dtype {images.dtype}: give float images in [0, 1] or uint8 in 0-255")
    if not np.isfinite(images).all():
        raise ValueError("images hold NaN or inf values")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        hint = " (they look like 0-255 values: divide by 255)" if high > 1.0 and high <= 255.0 and low >= 0.0 else \
            " (they look like [-1, 1] values: map them with (x + 1) / 2)" if low >= -1.0 else ""
        raise ValueError(f"float images must lie in [0, 1], got values in [{low:g}, {high:g}]{hint}")
    return images.astype(np.float32)


@torch.no_grad()
def encode(lens: Lens, images: np.ndarray, batch_size: int = 16) -> torch.Tensor:
    """Latents ``(n, C, h, w)`` of images ``(n, H, W, 3)`` in [0, 1]: the VAE posterior mean, shifted and
    scaled so that the pipeline's own decode inverts it."""
    vae = lens.pipeline.vae
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2) * 2 - 1  # (n, 3, H, W) in [-1, 1]
    x = x.to(device=vae.device, dtype=vae.dtype)
    means = []
    for i in range(0, len(x), batch_size):
        encoded = vae.encode(x[i : i + batch_size])
        # a KL autoencoder's posterior mean, or a deterministic one's latent (SANA's DC-AE)
        means.append(encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latent)
    shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD3's VAE shifts as well as scales
    return (torch.cat(means) - shift) * vae.config.scaling_factor


def decode_images(lens: Lens, latents: torch.Tensor) -> torch.Tensor:
    """Images ``(n, 3, H, W)`` in [0, 1] of latents ``(n, C, h, w)``, decoded by the pipeline's VAE and image
    processor as the pipeline decodes its final latents; differentiable in `latents` where grad is enabled.

    Raises:
        ValueError: the pipeline has no VAE.
    """
    pipe = lens.pipeline
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise ValueError(f"decoding latents needs the pipeline's VAE; this {type(pipe).__name__} has none "
                         f"(vae=None): load the pipeline with its VAE")
    shift = (vae.config.get("shift_factor") or 0.0) if head_of(lens).shifted else 0.0
    latents = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
    decoded = vae.decode(latents, return_dict=False)[0]  # (n, 3, H, W) in [-1, 1]
    return pipe.image_processor.postprocess(decoded, output_type="pt")


@torch.no_grad()
def decode(lens: Lens, latents: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """Images ``(n, H, W, 3)`` float32 in [0, 1] of latents ``(n, C, h, w)``: `decode_images` without
    gradients, `batch_size` latents at a time, as numpy (the pipeline's ``output_type="np"``).

    Raises:
        ValueError: the pipeline has no VAE.
    """
    images = [decode_images(lens, latents[start : start + batch_size]).permute(0, 2, 3, 1).float().cpu().numpy()
              for start in range(0, latents.shape[0], batch_size)]
    return np.concatenate(images) if images else np.zeros((0, 0, 0, 3), np.float32)


def noised(lens: Lens, latents: torch.Tensor, noise: torch.Tensor, level: float) -> tuple[torch.Tensor, Any]:
    """The latents at noise `level` and the timestep the denoiser takes there: ε/v models at training
    timestep ``round(level · (N − 1))`` (``√ᾱ·z + √(1 − ᾱ)·ε``), flow models at σ = level
    (``(1 − σ)·z + σ·ε``, timestep ``σ · N``)."""
    scheduler = lens.pipeline.scheduler
    steps = scheduler.config.num_train_timesteps
    if lens.family.sampling == "flow":
        return (1 - level) * latents + level * noise, level * steps
    t = int(round(level * (steps - 1)))
    alpha_bar = float(scheduler.alphas_cumprod[t])
    return alpha_bar ** 0.5 * latents + (1 - alpha_bar) ** 0.5 * noise, t


def noise_field(latents: torch.Tensor, seed: int) -> torch.Tensor:
    """One noise field ``(1, C, h, w)`` drawn on the CPU from `seed`, expanded to the batch of `latents`: the same
    for every image, so that no reading of a given image depends on the other images of its batch."""
    draw = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, *latents.shape[1:]), generator=draw).to(latents).expand_as(latents)


def check_levels(levels: Any) -> list[float]:
    """`levels` (one number or several) as distinct noise levels in (0, 1]; ValueError otherwise."""
    if isinstance(levels, (int, float)):
        levels = [levels]
    levels = [float(x) for x in levels]
    if not levels or not all(0 < x <= 1 for x in levels) or len(set(levels)) != len(levels):
        raise ValueError(f"noise_levels must be distinct values in (0, 1] (a fraction of the noise schedule), got "
                         f"{levels!r}")
    return levels
