"""`train_sae`: a TopK sparse autoencoder trained on a capture store's tokens, streamed chunk by chunk.

The store is a token-level capture (``dit_lens.capture(..., reduce=None)``): ``site (prompt, seed, step,
layer, token, channel)``, one chunk per (prompt, seed, step, layer). Training never holds the store: it reads
one (prompt, seed) cell at a time (its chosen steps and layers), gathers a bounded buffer of cells
(``buffer_tokens``), shuffles the buffer's tokens and trains on full batches from it (the few tokens that do
not fill a last batch are left out). The order is a pure function of ``seed``: epoch e visits the training
cells in a permutation drawn from (seed, e), and buffer g of that epoch is shuffled with (seed, e, g). So a
checkpoint after buffer g, with the model, the optimiser and the dead-feature counters, lets a killed run
resume to the same SAE, bit for bit, as one never stopped.

The model and its losses are sparsify's (`SparseCoder`: the TopK encoder, FVU, and the AuxK loss that gives
dead features a gradient); the loop is sparsify's recipe on a store instead of a language model: decoder
bias set to the first batch's mean, Adam with its learning rate ``2e-4 / sqrt(features / 2**14)``, linear
warm-up and decay, gradients parallel to the unit-norm decoder rows removed and the rows renormalised after
each step.

Seeds are never mixed: the last ``held_out`` share of the store's seeds is not trained on; the SAE's `fvu`,
dead rate (features never active on those tokens) and dense rate (active on more than 10% of them) are
measured there.

Examples:
    >>> import tempfile
    >>> from dit_lens import load, capture
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> folder = tempfile.mkdtemp()
    >>> _ = capture(lens, ["a polyp", "normal mucosa"], seeds=[0, 1, 2, 3], num_inference_steps=2, reduce=None,
    ...             store=folder + "/tokens.zarr")
    >>> sae = train_sae(folder + "/tokens.zarr", k=4, expansion=2, tokens=4096, batch_size=64,
    ...                 out=folder + "/sae", progress=False)
    >>> sae.num_features, sae.site, sae.layers, 0 <= sae.fvu < 1
    (32, 'attn2', (0, 1), True)
    >>> sae.store["held_out_seeds"]
    [3]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..storage import DamagedError, claim, exclusive, load_torch, save_torch
from ..storage.cache import cache_root, content_key
from ..trace.store import open_finished
from ..validate import check_int, is_int
from .sae import SAE, SAE_FILE, SAE_KIND, load_sae, require_sparsify, write_sae

__all__ = ["CHECKPOINT", "DENSE", "TokenSource", "read_cell", "train_sae"]

#: The checkpoint file in an SAE folder while it trains.
CHECKPOINT = "checkpoint.pt"
#: A feature is dense when active on more than this share of tokens.
DENSE = 0.1
_KINDS = ("topk",)


@dataclass(frozen=True)
class TokenSource:
    """A token-level capture store opened for reading, with the steps and layers to read."""

    path: Path
    site: str
    array: Any  # the zarr array (prompt, seed, step, layer, token, channel)
    attrs: dict
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: tuple[int, ...]
    layers: tuple[int, ...]
    step_index: tuple[int, ...]
    layer_index: tuple[int, ...]

    @property
    def width(self) -> int:
        return int(self.array.shape[-1])

    @property
    def cell_tokens(self) -> int:
        """Tokens in one (prompt, seed) cell at the chosen steps and layers."""
        return len(self.step_index) * len(self.layer_index) * int(self.array.shape[-2])


def read_cell(source: TokenSource, cell: tuple[int, int]) -> np.ndarray:
    """The tokens ``(steps × layers × tokens, C)`` of one (prompt index, seed index) cell: its chunks only."""
    i, j = cell
    block = source.array.get_orthogonal_selection(
        (i, j, list(source.step_index), list(source.layer_index), slice(None), slice(None)))  # (S, L, T, C)
    return np.asarray(block, dtype=np.float32).reshape(-1, source.width)


def open_tokens(store: Any, site: str | None = None, layers: Any = None, steps: Any = None) -> TokenSource:
    """Open a token-level capture store (a path, or the Dataset `capture` returned) for `train_sae`, checked."""
    import xarray as xr
    import zarr

    if isinstance(store, xr.Dataset):
        source = store.encoding.get("source")
        if source is None:
            raise ValueError("this Dataset is not backed by a capture store; pass the store's path (capture's "
                             "store= argument)")
        store = source
    path = Path(store).expanduser()
    ds = open_finished(path, make="make one with dit_lens.capture(..., reduce=None, store=...)")
    sites = [name for name in ds.data_vars if name != "done"]
    site = sites[0] if site is None and len(sites) == 1 else site
    if site not in sites:
        raise ValueError(f"unknown site={site!r}: the store at {path} holds {sites}; pass one of them")
    dims = ds[site].dims
    if "token" not in dims:
        raise ValueError(f"the store at {path} holds {site} averaged over image tokens (reduce="
                         f"{ds.attrs.get('capture_reduce', 'mean')!r}, dims {dims}); an SAE trains on single tokens: "
                         f"capture again with dit_lens.capture(..., reduce=None)")
    if dims != ("prompt", "seed", "step", "layer", "token", "channel"):
        raise ValueError(f"the store's {site} has dims {dims}; train_sae reads (prompt, seed, step, layer, token, "
                         f"channel): capture one guidance branch (branch='cond' or 'uncond') with reduce=None")
    have_steps, have_layers = [int(s) for s in ds["step"].values], [int(x) for x in ds["layer"].values]
    chosen_steps = _choose("steps", steps, have_steps)
    chosen_layers = _choose("layers", layers, have_layers)
    array = zarr.open_group(str(path), mode="r")[site]
    return TokenSource(path, site, array, dict(ds.attrs), tuple(str(p) for p in ds["prompt"].values),
                       tuple(int(s) for s in ds["seed"].values), chosen_steps, chosen_layers,
                       tuple(have_steps.index(s) for s in chosen_steps),
                       tuple(have_layers.index(x) for x in chosen_layers))


def _choose(name: str, value: Any, have: list[int]) -> tuple[int, ...]:
    if value is None:
        return tuple(have)
    values = (value,) if is_int(value) else tuple(value)
    if not values or not all(is_int(v) for v in values):
        raise ValueError(f"{name} must be a list of indices of the store (or None for all), got {value!r}")
    unknown = sorted({int(v) for v in values} - set(have))
    if unknown:
        raise ValueError(f"{name} {unknown} are not in the store, which holds {name} {have}; pass some of those")
    return tuple(sorted({int(v) for v in values}))


def train_sae(store: Any, *, site: str | None = None, layers: Any = None, steps: Any = None, kind: str = "topk",
              k: int = 32, expansion: int = 4, tokens: int = 2**18, batch_size: int = 1024, lr: float | None = None,
              seed: int = 0, held_out: float = 0.25, buffer_tokens: int = 2**15, auxk_alpha: float = 1 / 32,
              dead_after: int = 2**15, checkpoint_every: int = 4, out: str | Path | None = None, resume: bool = True,
              overwrite: bool = False, progress: bool = True) -> SAE:
    """Train a TopK sparse autoencoder on a token-level capture store, streamed (see the module's docs).

    Args:
        store: A store made by ``dit_lens.capture(..., reduce=None)`` (its path, or the Dataset capture returned).
        site: The store's site (default: the one it holds).
        layers: Blocks of the store to train on, pooled into one SAE (default: all).
        steps: Denoising steps of the store to train on (default: all).
        kind: ``"topk"`` (z = TopK(ReLU(W_enc(x − b_dec) + b_enc))).
        k: Active features per token.
        expansion: Features per channel (features = expansion × C).
        tokens: Training tokens (steps of `batch_size`; the store is cycled through as often as needed).
        batch_size: Tokens per optimiser step.
        lr: Adam's learning rate (default sparsify's ``2e-4 / sqrt(features / 2**14)``).
        seed: Initialisation and data order.
        held_out: Share of the store's seeds (its last ones) kept out of training to measure the SAE on.
        buffer_tokens: Tokens gathered and shuffled at once (the memory bound; at least one cell is read).
        auxk_alpha: Weight of sparsify's AuxK loss on features inactive for `dead_after` tokens.
        dead_after: Training tokens without firing after which a feature counts as dead for AuxK.
        checkpoint_every: Buffers between checkpoints.
        out: The SAE's folder (claimed through `dit_lens.storage`). Default: under the cache
            (``cache/saes/<key>``), keyed by the store's content and every setting.
        resume: Reuse a finished SAE or continue from a checkpoint in `out`; False starts again.
        overwrite: Replace an SAE folder made for other settings.
        progress: Show a progress bar over optimiser steps.

    Returns:
        The `SAE`, saved in `out`, with `fvu`, `dead_rate` and `dense_rate` measured on the held-out seeds.

    Raises:
        ValueError: a store without tokens (``reduce='mean'``), an unknown site, layer or step, an incomplete
            store, ``k`` above the number of features, or another bad setting.
    """
    require_sparsify()
    source = open_tokens(store, site, layers, steps)
    if kind not in _KINDS:
        raise ValueError(f"unknown kind={kind!r}; the SAEs dit-lens trains are {list(_KINDS)}")
    k, expansion = check_int(k, "k", minimum=1), check_int(expansion, "expansion", minimum=1)
    if k > expansion * source.width:
        raise ValueError(f"k={k} is more than the SAE's {expansion * source.width} features (expansion {expansion} × "
                         f"{source.width} channels); lower k or raise expansion")
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    tokens = check_int(tokens, "tokens", minimum=batch_size)
    seeds = source.seeds
    if not (isinstance(held_out, float) and 0 < held_out < 1):
        raise ValueError(f"held_out must be a share of the seeds in (0, 1), e.g. 0.25, got {held_out!r}")
    n_held = max(1, int(round(held_out * len(seeds))))
    if len(seeds) - n_held < 1:
        raise ValueError(f"the store holds {len(seeds)} seed(s); an SAE needs seeds to train on and held-out seeds to "
                         f"be measured on: capture at least 2 seeds")
    features = expansion * source.width
    training_tokens = len(source.prompts) * (len(seeds) - n_held) * source.cell_tokens
    if training_tokens < batch_size:
        raise ValueError(f"the store holds {training_tokens} training tokens (prompts × training seeds × steps × "
                         f"layers × image tokens), fewer than one batch of {batch_size}; lower batch_size or capture "
                         f"more")
    buffer_tokens = check_int(buffer_tokens, "buffer_tokens", minimum=1)
    per_buffer = max(1, buffer_tokens // source.cell_tokens)
    if per_buffer * source.cell_tokens < batch_size:
        raise ValueError(f"a buffer of buffer_tokens={buffer_tokens} holds {per_buffer}"
                         f" cell(s) of {source.cell_tokens} tokens, less than one batch of {batch_size}; raise "
                         f"buffer_tokens or lower batch_size")
    settings = {"kind": kind, "k": k, "expansion": expansion, "tokens": tokens, "batch_size": batch_size,
                "lr": float(lr) if lr is not None else 2e-4 / math.sqrt(features / 2**14),
                "seed": check_int(seed, "seed"),
                "held_out": held_out, "buffer_tokens": buffer_tokens,
                "auxk_alpha": float(auxk_alpha), "dead_after": check_int(dead_after, "dead_after", minimum=1),
                "sparsify_version": require_sparsify().__version__}
    attrs = source.attrs
    provenance = {"capture_key": attrs.get("capture_key"), "path": str(source.path), "prompts": list(source.prompts),
                  "train_seeds": list(seeds[:-n_held]), "held_out_seeds": list(seeds[-n_held:]),
                  "num_inference_steps": attrs.get("capture_num_inference_steps"),
                  "guidance_scale": attrs.get("capture_guidance_scale"), "branch": attrs.get("capture_branch"),
                  **{key: attrs.get(key) for key in ("model_source", "model_class", "denoiser_class", "lora")}}
    blank = SAE.new(d_in=source.width, k=k, expansion=expansion, seed=settings["seed"], kind=kind, site=source.site,
                    layers=source.layers, steps=source.steps, model_fingerprint=str(attrs.get("model_fingerprint")),
                    store=provenance, settings=settings)
    folder = Path(out) if out is not None else cache_root() / "saes" / content_key(blank.identity())
    with exclusive(folder):
        claimed = claim(folder, SAE_KIND, identity=blank.identity(), overwrite=overwrite, what="SAE folder")
        if resume and (folder / SAE_FILE).is_file():
            return load_sae(folder)
        claimed.record(CHECKPOINT)
        sae = _train(blank, source, folder / CHECKPOINT, resume, int(check_int(checkpoint_every, "checkpoint_every",
                                                                                 minimum=1)), progress)
        sae = _measured(sae, source, [(i, j) for i in range(len(source.prompts))
                                      for j in range(len(seeds) - n_held, len(seeds))])
        write_sae(sae, claimed)
        (folder / CHECKPOINT).unlink(missing_ok=True)
    return sae.at(folder)


def _groups(source: TokenSource, cells: list[tuple[int, int]], settings: dict) -> int:
    """Cells per buffer: as many as `buffer_tokens` holds (at least one)."""
    return max(1, settings["buffer_tokens"] // source.cell_tokens)


def stream(source: TokenSource, cells: list[tuple[int, int]], settings: dict, epoch: int,
           group: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(epoch, buffer, tokens of the buffer shuffled)`` from buffer `group` of `epoch` on, for ever."""
    per = _groups(source, cells, settings)
    while True:
        order = np.random.default_rng([settings["seed"], epoch]).permutation(len(cells))
        chunks = [order[s : s + per] for s in range(0, len(order), per)]
        for g in range(group, len(chunks)):
            x = np.concatenate([read_cell(source, cells[c]) for c in chunks[g]])  # (buffer tokens, C)
            x = x[np.random.default_rng([settings["seed"], epoch, g]).permutation(len(x))]
            yield epoch, g, x
            del x
        epoch, group = epoch + 1, 0


def _step(coder: Any, optimizer: Any, x: torch.Tensor, lr: float, dead: torch.Tensor, auxk_alpha: float) -> Any:
    """One optimiser step of sparsify's recipe; returns its forward output."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    out = coder(x, dead_mask=dead)
    (out.fvu + auxk_alpha * out.auxk_loss).backward()
    coder.remove_gradient_parallel_to_decoder_directions()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    coder.set_decoder_norm_to_unit_norm()
    return out


def _train(sae: SAE, source: TokenSource, checkpoint: Path, resume: bool, every: int, progress: bool) -> SAE:
    settings = sae.settings
    n_train = len(sae.store["train_seeds"])
    cells = [(i, j) for i in range(len(source.prompts)) for j in range(n_train)]
    coder = sae.coder
    for p in coder.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(coder.parameters(), lr=settings["lr"])
    total, batch = settings["tokens"] // settings["batch_size"], settings["batch_size"]
    warmup = max(1, min(1000, total // 10))
    since_fired = torch.zeros(sae.num_features, dtype=torch.long)
    step, epoch, group = 0, 0, 0
    if resume and checkpoint.is_file():
        state = load_torch(checkpoint, what="the SAE checkpoint", fix="delete it to train from the start")
        if state.get("identity") != sae.identity():
            raise DamagedError(f"the checkpoint {checkpoint} was made for other settings; delete it to train anew")
        coder.load_state_dict(state["coder"])
        optimizer.load_state_dict(state["optimizer"])
        since_fired, step, epoch, group = state["since_fired"], state["step"], state["epoch"], state["group"]
    bar = tqdm(total=total, initial=step, unit="step", desc="train SAE", disable=not progress)
    data = stream(source, cells, settings, epoch, group)
    buffers = 0
    with bar:
        while step < total:
            epoch, g, x = next(data)
            for start in range(0, len(x) - batch + 1, batch):
                if step >= total:
                    break
                xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch]))  # (batch, C)
                if step == 0:
                    with torch.no_grad():
                        coder.b_dec.data = xb.mean(0)
                lr = settings["lr"] * min(1.0, (step + 1) / warmup) * (total - step) / total
                out = _step(coder, optimizer, xb, lr, since_fired > settings["dead_after"], settings["auxk_alpha"])
                since_fired += batch
                since_fired[out.latent_indices.flatten().unique()] = 0
                step += 1
                bar.update(1)
            buffers += 1
            if step < total and buffers % every == 0:
                save_torch(checkpoint, {"identity": sae.identity(), "coder": coder.state_dict(),
                                        "optimizer": optimizer.state_dict(), "since_fired": since_fired, "step": step,
                                        "epoch": epoch if g + 1 < _count(source, cells, settings) else epoch + 1,
                                        "group": g + 1 if g + 1 < _count(source, cells, settings) else 0})
    for p in coder.parameters():
        p.requires_grad_(False)
    coder.eval()
    return sae


def _count(source: TokenSource, cells: list, settings: dict) -> int:
    """Buffers per epoch."""
    return -(-len(cells) // _groups(source, cells, settings))


def _measured(sae: SAE, source: TokenSource, cells: list[tuple[int, int]]) -> SAE:
    """`sae` with its quality on `cells` (held-out seeds), read one cell at a time."""
    from dataclasses import replace

    sq_err, sum_sq, n = 0.0, 0.0, 0
    sum_x = np.zeros(source.width)
    fired = torch.zeros(sae.num_features, dtype=torch.long)
    for cell in cells:
        x = torch.from_numpy(read_cell(source, cell))  # (tokens, C)
        z = sae.encode(x)
        x_hat = sae.decode(z)
        sq_err += float(((x - x_hat).double() ** 2).sum())
        sum_sq += float((x.double() ** 2).sum())
        sum_x += x.double().sum(0).numpy()
        n += len(x)
        fired += (z > 0).sum(0)
    variance = sum_sq - float((sum_x**2).sum()) / n
    rate = fired.double() / n
    quality = {"fvu": sq_err / variance, "dead_rate": float((fired == 0).double().mean()),
               "dense_rate": float((rate > DENSE).double().mean()), "tokens": n, "dense_threshold": DENSE,
               "cells": len(cells)}
    return replace(sae, quality=quality)
