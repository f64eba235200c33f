"""Fine-tune a lens's denoiser on captioned images: LoRA (peft) or full, with optional Latent Drifting.

`finetune` trains a copy of the lens's transformer (the lens itself is not changed) with the
denoising loss of its own scheduler (ε-, v- or sample-prediction, read from the scheduler config;
PixArt's learned-variance channels are dropped), and writes to `out`:

- ``method="lora"``: a peft LoRA adapter on the attention, feed-forward and projection layers of the
  denoiser (`Family.adapter_targets`), ``save_pretrained`` into `out`; ``"attn2"``: LoRA on the
  cross-attention only; ``"full"``: every weight of the denoiser, ``out/transformer``.
- with ``text_encoder=True``: a LoRA on the text encoder's q, k, v, o, wi, wo as well
  (``out/text_encoder``; fully trained for ``"full"``).
- ``finetune.json``: every setting, the data digest, the base model, δ, the loss curve and the time.

`dit_lens.load(source, lora=out)` loads any of them.

**Latent Drifting at training time.** Seed 004 drifts the forward process during fine-tuning but does
not write the training form down. dit-lens drifts the noise: the model is trained on
x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·(ε + δ) with the target taken from the drifted noise ε' = ε + δ (ε' itself
for ε-prediction, v = √ᾱ_t·ε' − √(1 − ᾱ_t)·x_0 for v-prediction). At t = T the marginal is N(δ, I),
the drifted z_T of `dit_lens.LatentDrift`; δ = 0 is the plain loss, bit for bit.

**Determinism and resuming.** Every random draw (batch order, latent samples, caption dropout, noise,
timesteps) comes from one CPU generator seeded by `seed`, and the modules train in eval mode (no
dropout), so a run is bit-for-bit repeatable on CPU. Every ``checkpoint_every`` steps the trainable
weights, the optimiser and the generator are saved to ``out/checkpoint.pt`` (a weights-only torch
file with a digest, `dit_lens.storage.save_torch`); calling `finetune` again with the same settings
and data resumes there and ends with the same weights as an unbroken run.

**The folder.** `out` is claimed through `dit_lens.storage` for the settings, the data's digests and
the base model's fingerprint (values, never paths), and locked for the whole run: the same fine-tune
started twice waits for the first and reuses it, another one is refused, naming what differs. The
sealed ``finetune.json`` is written last and lists a digest of every file written there; a finished
folder is checked against it whenever it is used again (by `finetune` or by `dit_lens.load`).
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..model.adapters import peft_quietly
from ..model.lens import Lens
from ..storage import file_digests
from ..storage import DamagedError, all_finite, load_torch, remove_stale_temporaries, save_torch, temporary_name, \
    write_record
from ..validate import NonFiniteError
from .data import TrainingImages
from .folder import (CHECKPOINT, RECORD, base_model, claim_run, holding, place, read_record, release_new,
                     training_images)
from .config import METHODS, TEXT_ENCODER_TARGETS, FinetuneConfig
from .inputs import added_conditions, drifted_training_pair, encode_images, tokenize

__all__ = ["FinetuneConfig", "finetune", "read_record", "METHODS", "TEXT_ENCODER_TARGETS"]

def finetune(lens: Lens, data: TrainingImages | str | Path, out: str | Path, *, method: str = "lora", rank: int = 8,
             steps: int = 600, lr: float | None = None, batch_size: int = 8, drift: float = 0.0,
             text_encoder: bool = False, seed: int = 0, caption_dropout: float = 0.1, warmup: int = 20,
             checkpoint_every: int = 100, validation: TrainingImages | str | Path | None = None,
             validate_every: int = 50, device: str | None = None, mixed_precision: str | None = None,
             progress: bool = True) -> Path:
    """Fine-tune the denoiser of `lens` on `data` and write the adapter (or weights) to `out`.

    Args:
        lens: From `dit_lens.load`; it is not modified (a copy of its denoiser trains).
        data: `TrainingImages`, or an ``imagefolder`` folder (``metadata.jsonl`` with ``file_name`` and
            ``text``), resized to the lens's image size.
        out: The folder to write; it must be new or empty, or hold an unfinished run of the same
            settings, data and base model (which is resumed) or a finished one (checked against its
            digests and returned as it is). A fine-tune running into it with other settings is refused.
        validation: Held-out images (as `data`): their loss, on the same draws of noise and timesteps
            each time, is measured before training and every `validate_every` steps and recorded
            (``finetune.json``: ``validation``), to see where training starts to overfit.
        device: Where to train (default: the lens's device).
        progress: Show a progress bar with the loss.
        method, rank, steps, lr, batch_size, drift, text_encoder, seed, caption_dropout, warmup,
        checkpoint_every, validate_every, mixed_precision: As `FinetuneConfig`.

    Returns:
        `out`, to pass as ``dit_lens.load(..., lora=out)``.

    Raises:
        dit_lens.storage.FolderClaimError: `out` holds anything else, or a run with other settings or data.
        dit_lens.storage.DamagedError: its record, an adapter file or the checkpoint is damaged.
        dit_lens.validate.NonFiniteError: training diverged (nothing of it is kept but an earlier checkpoint).
    """
    cfg = FinetuneConfig(method=method, rank=rank, steps=steps, lr=lr, batch_size=batch_size, drift=drift,
                         text_encoder=text_encoder, seed=seed, caption_dropout=caption_dropout, warmup=warmup,
                         checkpoint_every=checkpoint_every, validate_every=validate_every,
                         mixed_precision=mixed_precision)
    lens.family.needs("fine-tuning (dit_lens.finetune trains with the noise-schedule loss of its scheduler)")
    side = int(lens.pipeline_kwargs["height"])
    data = training_images(data, side, "training")
    validation = None if validation is None else training_images(validation, side, "validation")
    out = Path(out).expanduser()
    dev = torch.device(device) if device is not None else lens.pipeline.transformer.device
    if cfg.mixed_precision == "fp16" and dev.type != "cuda":
        raise ValueError("mixed_precision='fp16' needs a CUDA device; use 'bf16' (or None) on CPU")
    base = base_model(lens)
    identity = {"config": cfg.to_dict(), "data": data.digest,
                "validation": validation.digest if validation is not None else None,
                "base_fingerprint": base["fingerprint"]}  # covers an adapter merged into the base
    existed = out.exists()
    with holding(out, identity):
        folder, state = claim_run(out, identity)
        if state == "finished":
            return out
        built = temporary_name(out / "adapter")  # saved there, then moved into place
        remove_stale_temporaries(out / "adapter")
        folder.record(CHECKPOINT)
        start = time.perf_counter()
        try:
            trainer = _Trainer(lens, data, cfg, dev, validation=validation)
            trainer.run(out, identity, progress=progress)
        except BaseException:
            release_new(folder, existed)  # a run that wrote nothing leaves the folder as it found it
            raise
        trainer.save(built)
        names = place(folder, built)
        folder.record(RECORD)
        write_record(out / RECORD, {  # the record last: it marks the run finished
            "config": cfg.to_dict(), "base": base, "data": data.summary(), "validation_data": identity["validation"],
            "drift": cfg.drift, "steps_done": cfg.steps, "train_seconds": round(trainer.elapsed, 1),
            "seconds_this_call": round(time.perf_counter() - start, 1), "device": str(dev), "torch": torch.__version__,
            "losses": trainer.curve(), "validation": trainer.validation_curve,
            "sample_with": f"dit_lens.LatentDrift({cfg.drift}, steps=None)" if cfg.drift else None,
            "files": file_digests(out, names)})
        (out / CHECKPOINT).unlink(missing_ok=True)
    return out


class _Trainer:
    """The trainable copies, the encoded data and the loop."""

    def __init__(self, lens: Lens, data: TrainingImages, cfg: FinetuneConfig, device: torch.device, *,
                 validation: TrainingImages | None = None) -> None:
        from diffusers import DDPMScheduler

        self.cfg, self.device, self.lens = cfg, device, lens
        pipe, family = lens.pipeline, lens.family
        transformer = copy.deepcopy(getattr(pipe, family.denoiser)).to("cpu")
        text_encoder = copy.deepcopy(pipe.text_encoder).to("cpu") if cfg.text_encoder else pipe.text_encoder
        with torch.random.fork_rng(devices=[]):  # peft draws the LoRA A matrices from the global CPU generator
            torch.manual_seed(cfg.seed)
            transformer, text_encoder = self._adapt(transformer, text_encoder, family)
        self.transformer = transformer.to(device)
        self.text_encoder = text_encoder.to(device) if cfg.text_encoder else text_encoder
        self.params = {f"transformer.{n}": p for n, p in self.transformer.named_parameters() if p.requires_grad}
        if cfg.text_encoder:
            self.params.update({f"text_encoder.{n}": p for n, p in self.text_encoder.named_parameters()
                                if p.requires_grad})
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=cfg.lr,
                                     weight_decay=1e-2 if cfg.method == "full" else 0.0)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None
        self.noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
        self.channels = int(self.transformer.config.in_channels)
        self.scale = float(pipe.vae.config.scaling_factor)
        texts = set(data.texts) | (set(validation.texts) if validation is not None else set())
        self.table = [""] + sorted(texts)  # row 0: the empty prompt, for caption dropout
        self.train_set = self._set(pipe, data)
        self.validation_set = self._set(pipe, validation) if validation is not None else None
        self.validation_curve: list[list[float]] = []
        self.tokens = tokenize(pipe.tokenizer, self.table, device)
        self.frozen_text = None if cfg.text_encoder else self._encode_text(torch.arange(len(self.table)))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.losses, self.elapsed, self.saved = 0, [], 0.0, 0
        self.extra = added_conditions(self.transformer, self.train_set[0].shape[-1] * pipe.vae_scale_factor)

    def _set(self, pipe: Any, data: TrainingImages) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posterior mean and std ``(N, C, h, w)`` of the images, and each one's caption row ``(N,)``."""
        mean, std = encode_images(pipe.vae, data.images, self.device)
        return mean, std, torch.tensor([self.table.index(t) for t in data.texts])

    def _adapt(self, transformer: Any, text_encoder: Any, family: Any) -> tuple[Any, Any]:
        from peft import LoraConfig, get_peft_model

        cfg = self.cfg
        transformer.eval().requires_grad_(cfg.method == "full")
        text_encoder.eval().requires_grad_(cfg.text_encoder and cfg.method == "full")
        if cfg.method == "full":
            return transformer, text_encoder
        targets = family.adapter_targets.get(cfg.method)
        if targets is None:
            raise ValueError(f"{family.name} has no {cfg.method!r} adapter targets; add them to its Family")
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=targets, lora_dropout=0.0)
        transformer = get_peft_model(transformer, lora)
        if cfg.text_encoder:
            with peft_quietly():
                text_encoder = get_peft_model(text_encoder, LoraConfig(
                    r=cfg.rank, lora_alpha=cfg.rank, target_modules=TEXT_ENCODER_TARGETS, lora_dropout=0.0))
        return transformer.eval(), text_encoder.eval()

    def _encode_text(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokens[0][rows], self.tokens[1][rows]
        where = next(self.text_encoder.parameters()).device  # frozen: the lens's own encoder, wherever it is
        with nullcontext() if self.cfg.text_encoder else torch.no_grad():
            hidden = self.text_encoder(ids.to(where), attention_mask=mask.to(where))[0]  # (b, seq, D)
        return hidden.to(self.device), mask  # (b, seq, D), (b, seq)

    def _draw(self, shape: tuple, kind: str = "normal", *, gen: torch.Generator) -> torch.Tensor:
        draw = torch.randn if kind == "normal" else torch.rand
        return draw(shape, generator=gen).to(self.device)

    def validate(self, batches: int = 16) -> None:
        """Record the mean loss on the validation images at this step: the same draws every time (a
        generator seeded anew), captions kept, no gradients."""
        if self.validation_set is None:
            return
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        with torch.no_grad():
            value = sum(float(self.loss(self.validation_set, gen, dropout=0.0)) for _ in range(batches)) / batches
        self.validation_curve.append([self.step, round(value, 6)])

    def loss(self, images: tuple | None = None, gen: torch.Generator | None = None,
             dropout: float | None = None) -> torch.Tensor:
        """The loss of one batch drawn from `images` (default: the training set) with `gen`."""
        cfg = self.cfg
        mean, std, text_of = images if images is not None else self.train_set
        gen = gen if gen is not None else self.gen
        idx = torch.randint(0, len(mean), (min(cfg.batch_size, len(mean)),), generator=gen)
        b = len(idx)
        x0 = (mean[idx] + std[idx] * self._draw(mean[idx].shape, gen=gen)) * self.scale
        dropout = cfg.caption_dropout if dropout is None else dropout
        text = torch.where(self._draw((b,), "uniform", gen=gen).cpu() < dropout, 0, text_of[idx])
        eps = self._draw(x0.shape, gen=gen)
        t = torch.randint(0, self.noise_sched.config.num_train_timesteps, (b,), generator=gen).to(self.device)
        noisy, target = drifted_training_pair(self.noise_sched, x0, eps, t, cfg.drift)
        if self.frozen_text is not None:
            hidden, mask = self.frozen_text[0][text], self.frozen_text[1][text]
        else:
            hidden, mask = self._encode_text(text)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        with torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext():
            pred = self.transformer(noisy, encoder_hidden_states=hidden, encoder_attention_mask=mask, timestep=t,
                                    added_cond_kwargs=self.extra(b)).sample[:, : self.channels]
        return F.mse_loss(pred.float(), target)

    def run(self, out: Path, identity: dict, *, progress: bool) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if (out / CHECKPOINT).is_file():
            self._restore(out / CHECKPOINT, identity)
        params = list(self.params.values())
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"finetune {cfg.method}", unit="step", disable=not progress)
        clock, running = time.perf_counter(), None
        if self.step == 0:
            self.validate()
        while self.step < cfg.steps:
            for group in self.opt.param_groups:
                group["lr"] = cfg.lr * min(1.0, (self.step + 1) / max(1, cfg.warmup))
            loss = self.loss()
            if not torch.isfinite(loss):
                raise self.diverged(out, f"the loss is {loss.item()} at step {self.step + 1}")
            self.opt.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.opt)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.scaler.step(self.opt) if self.scaler is not None else self.opt.step()
            if self.scaler is not None:
                self.scaler.update()
            self.step += 1
            self.losses.append(float(loss.item()))
            running = self.losses[-1] if running is None else 0.95 * running + 0.05 * self.losses[-1]
            bar.update(1)
            if self.step % cfg.validate_every == 0 or self.step == cfg.steps:
                self.validate()
            bar.set_postfix(loss=f"{running:.4f}", **({"held_out": f"{self.validation_curve[-1][1]:.4f}"}
                                                       if self.validation_curve else {}))
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self.elapsed += time.perf_counter() - clock
                clock = time.perf_counter()
                self._checkpoint(out / CHECKPOINT, identity)
        bar.close()
        self.elapsed += time.perf_counter() - clock
        if not all_finite(list(self.params.values())):
            raise self.diverged(out, f"the weights hold NaN or inf after step {self.step}")

    def diverged(self, out: Path, what: str) -> NonFiniteError:
        """The error of a run whose loss or weights stopped being finite (nothing of it is saved)."""
        cfg = self.cfg
        fix = "lower lr (--lr)" + (" or turn mixed precision off" if cfg.mixed_precision else "")
        if self.saved:
            kept = (f"{out / CHECKPOINT} (step {self.saved}, before it diverged) is kept; fine-tune into a new folder, "
                    f"or delete {out} to use it again")
        else:
            kept = f"no checkpoint was written, so {out} can be used again"
        return NonFiniteError(f"the fine-tune diverged: {what} with lr {cfg.lr:g}; {fix}; {kept}")

    def _checkpoint(self, path: Path, identity: dict) -> None:
        params = {k: p.detach().cpu() for k, p in self.params.items()}
        if not all_finite(params):
            raise self.diverged(path.parent, f"the weights hold NaN or inf at step {self.step}")
        save_torch(path, {"identity": identity, "step": self.step, "losses": self.losses, "seconds": self.elapsed,
                          "validation": self.validation_curve, "params": params,
                          "optimizer": self.opt.state_dict(), "generator": self.gen.get_state()})
        self.saved = self.step

    def _restore(self, path: Path, identity: dict) -> None:
        fix = f"delete {path} to start this fine-tune over (nothing was changed)"
        state = load_torch(path, what="fine-tune checkpoint", fix=fix)
        if not isinstance(state, dict) or state.get("identity") != identity:
            raise DamagedError(f"fine-tune checkpoint {path} is not a checkpoint of this run (its settings, data or "
                               f"base model differ from the folder's); {fix}")
        params = state.get("params")
        if not isinstance(params, dict) or {k: tuple(v.shape) for k, v in params.items()} != \
                {k: tuple(p.shape) for k, p in self.params.items()}:
            raise DamagedError(f"fine-tune checkpoint {path} holds other weights than this run trains; {fix}")
        if not all_finite(params) or not all_finite(state.get("optimizer")) or not all_finite(state.get("losses")):
            raise DamagedError(f"fine-tune checkpoint {path} holds NaN or inf values, so resuming from it cannot "
                               f"work; {fix}")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(params[k])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        self.step, self.losses, self.elapsed = int(state["step"]), list(state["losses"]), float(state["seconds"])
        self.validation_curve = [list(v) for v in state["validation"]]
        self.saved = self.step

    def curve(self, points: int = 50) -> list[list[float]]:
        """The loss averaged over `points` equal stretches of the run: ``[[last step, mean loss], ...]``."""
        losses = np.asarray(self.losses)
        edges = np.linspace(0, len(losses), min(points, len(losses)) + 1).astype(int)
        return [[int(b), round(float(losses[a:b].mean()), 6)] for a, b in zip(edges[:-1], edges[1:])]

    def save(self, out: Path) -> None:
        if self.cfg.method == "full":
            self.transformer.to("cpu").save_pretrained(out / "transformer")
            if self.cfg.text_encoder:
                self.text_encoder.to("cpu").save_pretrained(out / "text_encoder")
            return
        self.transformer.save_pretrained(out)
        if self.cfg.text_encoder:
            self.text_encoder.save_pretrained(out / "text_encoder")
