"""What one training step feeds the denoiser: encoded images, tokenised captions, the conditions some
denoisers add, and the (drifted) noisy input with its regression target."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

__all__ = ["added_conditions", "drifted_training_pair", "encode_images", "tokenize"]


def drifted_training_pair(scheduler: Any, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                          drift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The model input x_t and the regression target of one training batch under Latent Drifting.

    The noise is drifted, ε' = ε + δ: x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε', and the target is ε' (ε-prediction),
    v = √ᾱ_t·ε' − √(1 − ᾱ_t)·x_0 (v-prediction) or x_0 (sample prediction), as `scheduler`'s
    ``prediction_type`` says. δ = 0 is the plain denoising loss.
    """
    noise = eps + drift if drift else eps
    noisy = scheduler.add_noise(x0, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noisy, noise
    if kind == "v_prediction":
        return noisy, scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return noisy, x0
    raise ValueError(f"cannot fine-tune a scheduler with prediction_type {kind!r}; expected epsilon, "
                     "v_prediction or sample")


def encode_images(vae: Any, images: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std ``(N, C, h, w)`` of `images` ``(N, H, W, 3)`` in [0, 1]."""
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), 64):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + 64])).permute(0, 3, 1, 2) * 2 - 1  # (b, 3, H, W)
            post = vae.encode(x.to(device=vae.device, dtype=vae.dtype)).latent_dist
            means.append(post.mean.float().to(device))
            stds.append(post.std.float().to(device))
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer: Any, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and masks ``(K, L)`` as the PixArt pipeline makes them, padded to the longest text (the
    masked padding changes no embedding of a real token) and at most 120 tokens."""
    length = min(120, max(len(tokenizer(t).input_ids) for t in texts))
    tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                       return_tensors="pt")
    return tokens.input_ids.to(device), tokens.attention_mask.to(device)


def added_conditions(transformer: Any, side: int) -> Callable[[int], dict]:
    """``added_cond_kwargs`` for a batch: resolution and aspect ratio where the denoiser uses them
    (PixArt-alpha 1024 px), as its pipeline passes them; None otherwise."""
    base = transformer.get_base_model() if hasattr(transformer, "get_base_model") else transformer
    if not getattr(base, "use_additional_conditions", False):
        return lambda b: {"resolution": None, "aspect_ratio": None}
    device = next(base.parameters()).device
    return lambda b: {"resolution": torch.tensor([[side, side]], dtype=torch.float32, device=device).repeat(b, 1),
                      "aspect_ratio": torch.tensor([[1.0]], dtype=torch.float32, device=device).repeat(b, 1)}
