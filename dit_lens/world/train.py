"""Training of the embedded world's pipeline: a small VAE, then a PixArt-alpha transformer on its latents.

One generic loop (`fit`: AdamW, linear warm-up then cosine decay, optional EMA, progress lines) trains
every network of the world, the judges included. The diffusion model follows what measured best on
this CPU: a 4× latent space (64 px → 16×16×4, patch 2 → 64 tokens), v-prediction, EMA weights and a
decaying learning rate.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["StageConfig", "world_spec", "fit", "train_vae", "train_transformer", "text_table"]


@dataclass(frozen=True)
class StageConfig:
    """Optimisation settings of one training stage.

    Attributes:
        steps: Optimiser steps.
        batch_size: Samples per step.
        lr: Peak learning rate (after `warmup` linear steps, cosine-decayed to 5% at the end).
        warmup: Warm-up steps.
        seed: Seeds the batch order and the noise.
        ema: EMA decay of the returned weights (None: the last weights).
        weight_decay: AdamW weight decay.
    """

    steps: int
    batch_size: int
    lr: float
    warmup: int = 100
    seed: int = 0
    ema: float | None = None
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"StageConfig needs steps >= 1, batch_size >= 1 and lr > 0, got {self}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"StageConfig.ema must be in (0, 1) or None, got {self.ema}")

    def to_dict(self) -> dict:
        return asdict(self)


def fit(
    net: torch.nn.Module,
    cfg: StageConfig,
    loss_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    n: int,
    *,
    log: Callable[[str], None] = print,
    name: str = "stage",
    params=None,
) -> torch.nn.Module:
    """Minimise ``loss_fn(batch_indices, generator)`` over `n` samples; returns the (EMA) network in eval mode.

    The generator is a CPU one whatever the device, so batch order and noise are the same draws on
    every device (`rand`/`randn` move them where the data is).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    params = [p for p in (params if params is not None else net.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def schedule(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    ema = copy.deepcopy(net).requires_grad_(False) if cfg.ema else None
    net.train()
    start, running = time.perf_counter(), None
    every = max(1, cfg.steps // 20)
    for step in range(cfg.steps):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
        loss = loss_fn(idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            decay = min(cfg.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), net.parameters()):
                    e.lerp_(p, 1 - decay)
                for e, b in zip(ema.buffers(), net.buffers()):
                    e.copy_(b)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            elapsed = time.perf_counter() - start
            log(f"[{name}] step {step + 1}/{cfg.steps} loss {running:.4f} "
                f"({elapsed:.0f} s, ~{elapsed / (step + 1) * (cfg.steps - step - 1):.0f} s left)")
    out = ema if ema is not None else net
    return out.eval()


def randn(shape, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal draws from the CPU generator `gen`, on the device and dtype of `like`."""
    return torch.randn(tuple(shape), generator=gen).to(device=like.device, dtype=like.dtype)


def rand(shape, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) draws from the CPU generator `gen`, on the device and dtype of `like`."""
    return torch.rand(tuple(shape), generator=gen).to(device=like.device, dtype=like.dtype)


def world_spec():
    """The shipped pipeline's shape: 12 blocks of width 128 over 64 latent tokens, 64 px images."""
    from ..model.builders import PixArtSpec

    return PixArtSpec(num_layers=12, num_heads=4, head_dim=32, sample_size=16, patch_size=2,
                      latent_channels=4, vae_channels=(16, 32, 32), text_dim=64, text_layers=2,
                      text_heads=4, prediction_type="v_prediction")


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2 - 1  # (N, 3, H, W)


def train_vae(vae, images: np.ndarray, cfg: StageConfig, *, kl_weight: float = 1e-4, log=print):
    """Train `vae` (an `AutoencoderKL`, on any device) to reconstruct `images`; sets its ``scaling_factor``."""
    x = _to_tensor(images).to(vae.device)

    def loss(idx, gen):
        batch = x[idx]
        post = vae.encode(batch).latent_dist
        z = post.mean + post.std * randn(post.mean.shape, gen, batch)
        rec = vae.decode(z).sample
        kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).mean()
        return F.mse_loss(rec, batch) + F.l1_loss(rec, batch) + kl_weight * kl

    trained = fit(vae, cfg, loss, len(x), log=log, name="vae")
    vae.load_state_dict(trained.state_dict())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mean = torch.cat([vae.encode(x[i : i + 256]).latent_dist.mean for i in range(0, min(len(x), 2048), 256)])
    vae.register_to_config(scaling_factor=float(1 / mean.std()))
    return vae


def text_table(pipeline, captions: list[str], length: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings and masks exactly as the pipeline computes them, padded to `length` tokens;
    index 0 is the empty prompt."""
    with torch.no_grad():
        embeds, masks = [], []
        for text in [""] + list(captions):
            e, m, _, _ = pipeline.encode_prompt(text, do_classifier_free_guidance=False, clean_caption=False,
                                                max_sequence_length=length)
            embeds.append(e[0])
            masks.append(m[0])
    return torch.stack(embeds), torch.stack(masks)  # (K, seq, D), (K, seq)


def train_transformer(pipeline, latents_mean, latents_std, caption_ids, captions, cfg: StageConfig,
                      *, dropout: float = 0.1, train_text_encoder: bool = False, log=print):
    """Train ``pipeline.transformer`` on VAE latents with v-prediction (on the pipeline's device).

    Args:
        latents_mean, latents_std: ``(N, 4, h, w)`` posterior of each training image (unscaled).
        caption_ids: ``(N, K)`` indices into `captions` (K phrasings per image, one drawn per step).
        captions: caption strings; the empty prompt (``""``) is added for guidance dropout.
        train_text_encoder: Train ``pipeline.text_encoder`` jointly (prompts are encoded by the
            pipeline's own ``encode_prompt`` at every step); otherwise it stays frozen.
    """
    from diffusers import DDPMScheduler

    transformer, text_encoder = pipeline.transformer, pipeline.text_encoder
    device = transformer.device
    latents_mean, latents_std = latents_mean.to(device), latents_std.to(device)
    caption_ids = caption_ids.to(device)
    transformer.requires_grad_(True)
    text_encoder.requires_grad_(train_text_encoder)
    table = [""] + list(captions)
    # Prompts are padded only to the longest caption: the masked padding changes no embedding of a
    # real token (T5 and the cross-attention both mask it), so sampling with the pipeline's default
    # length of 120 sees exactly what training saw, and a step costs about 25% less.
    length = min(120, max(len(pipeline.tokenizer(text).input_ids) for text in table))
    embeds, masks = (None, None) if train_text_encoder else text_table(pipeline, captions, length)  # frozen: once
    sched_cfg = pipeline.scheduler.config
    noise_sched = DDPMScheduler(num_train_timesteps=sched_cfg.num_train_timesteps, beta_start=sched_cfg.beta_start,
                                beta_end=sched_cfg.beta_end, beta_schedule=sched_cfg.beta_schedule,
                                prediction_type="v_prediction")
    scale = pipeline.vae.config.scaling_factor
    channels = latents_mean.shape[1]
    no_extra = {"resolution": None, "aspect_ratio": None}

    def encode(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and masks of table rows `text` (b,): the table, or the live encoder."""
        if not train_text_encoder:
            return embeds[text], masks[text]
        rows, inverse = torch.unique(text, return_inverse=True)
        e, m, _, _ = pipeline.encode_prompt([table[int(r)] for r in rows], do_classifier_free_guidance=False,
                                            clean_caption=False, device=device, max_sequence_length=length)
        return e[inverse], m[inverse]  # (b, seq, D), (b, seq)

    def loss(idx, gen):
        idx = idx.to(device)
        b = len(idx)
        x0 = (latents_mean[idx] + latents_std[idx] * randn(latents_mean[idx].shape, gen, latents_mean)) * scale
        pick = torch.randint(0, caption_ids.shape[1], (b,), generator=gen).to(device)
        text = caption_ids[idx, pick] + 1  # +1: row 0 of the table is the empty prompt
        text = torch.where(rand((b,), gen, x0) < dropout, torch.zeros_like(text), text)
        noise = randn(x0.shape, gen, x0)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=gen).to(device)
        noisy = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)
        hidden, mask = encode(text)
        pred = transformer(noisy, encoder_hidden_states=hidden, encoder_attention_mask=mask,
                           timestep=t, added_cond_kwargs=no_extra).sample[:, :channels]
        return F.mse_loss(pred, target)

    nets = torch.nn.ModuleDict({"transformer": transformer, "text_encoder": text_encoder})
    trained = fit(nets, cfg, loss, len(latents_mean), log=log, name="transformer")
    nets.load_state_dict(trained.state_dict())
    for net in nets.values():
        net.eval().requires_grad_(False)
    return transformer
