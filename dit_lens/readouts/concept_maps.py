"""`concept_maps`: where each concept is in the image, read from the attention *outputs* (ConceptAttention) or
from the cross-attention weights, for generated runs and for given images.

``kind="output"`` (ConceptAttention, Helbling et al. 2025): at each layer, the map of concept c over the image
tokens is ``softmax_c ⟨o_x, o_c⟩``, o_x an image token's attention output and o_c the concept's own output in
the same space (after the attention's output projection). Each concept is encoded alone by the pipeline's text
encoders, as the pipeline encodes a prompt, then enters the blocks as the prompt does; a concept of several
tokens pools all of them: the mean of their outputs (of their keys, for ``"prototype"`` and ``"key"``), so the
mean of their similarities before the softmax.

- Joint-attention families (SD3, Flux double-stream blocks): the concept tokens form a stream of their own
  through the text stream's weights (adaLN, q/k/v, output projection, feed-forward), reset at every step. Their
  queries attend to the image tokens and to each other; nothing attends to them, so the run is unchanged. Flux
  gives its text tokens position 0 (identity rotation), so the concept tokens are not rotated either.
- Cross-attention families (PixArt, SANA) have no text-stream queries, and their image tokens' attention outputs
  are built from text values only. The nearest equivalent, ``output_space="prototype"`` (the default): the
  concept attends to the image tokens through the only projections that pair text with image, the
  cross-attention's image queries and the concept's keys: with a_c(x) = softmax over image tokens x of
  ``q_x · k_c`` (scaled, mean over heads), o_c = Σ_x a_c(x)·o_x, the image outputs the concept draws from
  (ConceptAttention's o_c = Σ_x softmax(q_c · k_x)·v_x with the roles of query and key mirrored). Two alternatives
  are measured beside it (`studies/segmentation.py`): ``"value"``, o_c = ``to_out(to_v(e_c))``, the concept's
  value vector through the output projection (an image token's output is a weighted mean of such vectors, so
  ⟨o_x, o_c⟩ asks how much of the concept it took in), and ``"key"``, the logits ``q_x · k_c`` themselves
  softmaxed over the concepts (cross-attention restricted to the concepts). e_c: the concept's tokens as the
  cross-attention sees its keys (caption projection; SANA's caption norm).

``kind="cross_attention"``: the word maps of `dit_lens.readouts.attention_maps` (the concepts must be words of
the prompt). Given images (``images`` an ``(n, H, W, 3)`` array in [0, 1]) are encoded by the pipeline's VAE,
noised to each of `noise_levels` with one noise field drawn from `seeds[0]` (the same for every image), and
read from one conditional denoiser call per level (all images in one batch); the ``step`` dimension then
indexes the noise levels.

Examples:
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> ds = concept_maps(lens, prompt="a red polyp", concepts=["polyp", "red"], seeds=[0],
    ...                   num_inference_steps=2, progress=False)
    >>> ds["map"].dims, ds["map"].shape
    (('item', 'step', 'layer', 'concept', 'row', 'col'), (1, 2, 2, 2, 4, 4))
    >>> float(ds["map"].sum("concept").min()) > 0.999  # softmax over the concepts
    True
    >>> ds["pooled"].dims
    ('item', 'concept', 'row', 'col')
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from tqdm.auto import tqdm

from ..model.lens import Lens
from ..model.tokens import max_tokens, prompt_text, word_tokens
from ..sampling import Denoiser, check_images, encode
from ..trace.attention import exposed_weights
from ..trace.attrs import typed
from ..trace.capture import DEFAULT_BATCH
from ..trace.runner import Hook, check_seeds, scheduler_timesteps, traced_generate
from ..validate import check_guidance
from .attention_maps import _check_steps, attention_maps

__all__ = ["KINDS", "MAP_DIMS", "SPACES", "concept_maps", "noised"]

KINDS = ("output", "cross_attention")
#: What a cross-attention family's concept output is (`concept_maps`' ``output_space``).
SPACES = ("value", "key", "prototype")
MAP_DIMS = ("item", "step", "layer", "concept", "row", "col")
#: Given images per denoiser call.
GIVEN_BATCH = 16


def concept_maps(lens: Lens, images: Any = None, *, prompt: str, concepts: Sequence[str], seeds: Sequence[int] = (0,),
                 layers: Sequence[int] | None = None, steps: Sequence[int] | None = None, kind: str = "output",
                 noise_levels: Sequence[float] = (0.5,), num_inference_steps: int = 20, guidance_scale: float = 4.5,
                 output_space: str = "prototype", progress: bool = True) -> xr.Dataset:
    """Maps of each concept over the image tokens, per item, step (or noise level), layer.

    Args:
        lens: A `dit_lens.Lens`.
        images: ``None`` (generate ``prompt`` with each of `seeds`) or images ``(n, H, W, 3)`` in [0, 1] to read.
        prompt: The prompt of the runs (of the denoiser call, for given images).
        concepts: Concept words or phrases (unique, non-empty); with ``kind="cross_attention"`` words of `prompt`.
        seeds: Generator seeds of the runs; for given images, ``seeds[0]`` draws the noise.
        layers: Block indices (default: every block that has the read; SD3's last block and Flux's
            single-stream blocks have no text-stream output for ``kind="output"``).
        steps: Denoising steps to read (default all; generated runs only: the run always makes all of them).
        kind: ``"output"`` or ``"cross_attention"``.
        noise_levels: For given images, levels in (0, 1]: the fraction of the training timesteps (ε/v models) or
            the flow noise σ (flow models).
        num_inference_steps: Denoising steps of generated runs.
        guidance_scale: Guidance of generated runs (maps read from the conditional half); Flux's embedded scale.
        output_space: Cross-attention families, ``kind="output"``: ``"prototype"`` (o_c: the image outputs the
            concept attends to), ``"value"`` (o_c = to_out(to_v(e_c))) or ``"key"`` (logits q_x · k_c); see the
            module docstring. Joint-attention families have their concept stream and take only the default.
        progress: Show a progress bar.

    Returns:
        Dataset with ``map (item, step, layer, concept, row, col)`` float32 (softmax over concepts for
        ``"output"``; softmax weights summed over the word's tokens for ``"cross_attention"``), ``pooled (item,
        concept, row, col)`` (the mean of ``map`` over step and layer) and ``image (item, y, x, rgb)``; attrs hold
        provenance, every setting and the seeds.

    Raises:
        ValueError: a bad argument: an empty or repeated concept, one the tokenizer makes no token of, images of
            the wrong shape or range, layers or steps out of range.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if output_space not in SPACES:
        raise ValueError(f"output_space must be one of {SPACES}, got {output_space!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    concepts = _check_concepts(concepts)
    seeds = check_seeds(seeds)
    guidance_scale = check_guidance(guidance_scale)
    joint = lens.family.processor != "cross"
    if joint and output_space != "prototype":
        raise ValueError(f"output_space applies to cross-attention families; {lens.family.label or lens.family.name} "
                         f"reads its concepts' own outputs through the text stream (leave output_space out)")
    layers = _check_layers(lens, layers, kind, joint)
    given = images is not None
    if given:
        images = check_images(images, lens)
        levels = _check_levels(noise_levels)
        if steps is not None:
            raise ValueError("steps apply to generated runs; for given images choose noise_levels=[...]")
        recorded = list(range(len(levels)))
    else:
        recorded = _check_steps(steps, num_inference_steps)
    tokens = _concept_tokens(lens, prompt if kind == "cross_attention" else None, concepts)

    if kind == "cross_attention" and not given:
        words = attention_maps(lens, [prompt], seeds=seeds, words=concepts, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, layers=layers, steps=recorded, progress=progress)
        values = words["attention"].isel(prompt=0).values  # (seed, step, layer, word, row, col)
        made = words["image"].isel(prompt=0).values
    else:
        reader = _Reader(lens, kind, concepts, tokens, prompt, layers, output_space, joint)
        if given:
            latents = encode(lens, images)  # (n, C, h, w)
            draw = torch.Generator("cpu").manual_seed(seeds[0])  # one noise field for every image, so that
            noise = torch.randn((1, *latents.shape[1:]), generator=draw).to(latents).expand_as(latents)  # no map
            # depends on the other images of the batch
            chunks = [slice(i, i + GIVEN_BATCH) for i in range(0, len(images), GIVEN_BATCH)]
            values = [reader.given(latents[c], noise[c], levels, guidance_scale)
                      for c in tqdm(chunks, desc=f"concept maps ({kind})", unit="batch", disable=not progress)]
            values, made = np.concatenate(values), images
        else:
            batches = [seeds[i : i + DEFAULT_BATCH] for i in range(0, len(seeds), DEFAULT_BATCH)]
            done = [reader.generated(batch, num_inference_steps, guidance_scale, recorded)
                    for batch in tqdm(batches, desc=f"concept maps ({kind})", unit="batch", disable=not progress)]
            values, made = np.concatenate([d[0] for d in done]), np.concatenate([d[1] for d in done])
        n = len(values)
        values = values.reshape(n, len(recorded), len(layers), len(concepts), *lens.token_grid)
    settings = dict(kind=kind, prompt=prompt, concepts=concepts, seeds=seeds, layers=layers, recorded=recorded,
                    levels=levels if given else None, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, output_space=output_space, tokens=tokens)
    return _dataset(lens, values, made, settings)


class _Reader:
    """The torch hooks that turn one run (or one denoiser call per noise level) into maps ``(step, layer,
    concept, N)``; `visit` receives the site tensor of the conditional rows."""

    def __init__(self, lens, kind, concepts, tokens, prompt, layers, output_space, joint) -> None:
        self.lens, self.kind, self.layers, self.prompt = lens, kind, list(layers), prompt
        self.joint, self.space, self.n = joint, output_space, len(concepts)
        self.layer_index = {layer: j for j, layer in enumerate(self.layers)}
        if kind == "cross_attention":  # (keys, concepts): 1 on each word's tokens of the prompt
            self.words = torch.zeros(max(max(t) for t in tokens) + 1, len(concepts), device=lens.device)
            for c, positions in enumerate(tokens):
                self.words[list(positions), c] = 1.0
            return
        with torch.no_grad():
            embeds = Denoiser(lens, list(concepts)).embeds  # (concepts, text tokens, D): each concept alone
            stream = _text_stream(lens.denoiser, embeds)  # (concepts, text tokens, C): as the blocks see text
        self.stream0 = torch.cat([stream[c, list(t)] for c, t in enumerate(tokens)])[None]  # (1, K, C)
        pool = torch.zeros(len(concepts), self.stream0.shape[1], device=lens.device)  # (concepts, K): mean
        start = 0
        for c, positions in enumerate(tokens):
            pool[c, start : start + len(positions)] = 1.0 / len(positions)
            start += len(positions)
        self.pool = pool
        if not joint:  # static: per layer, each concept's output (value) or key (key) in that attention
            self.static = {layer: self._static(layer) for layer in self.layers}

    def generated(self, seeds, T, guidance_scale, recorded):
        """Maps ``(runs, step, layer, concept, N)`` and images of one traced pipeline call over `seeds`."""
        guided, self.rows = self.lens.guided(guidance_scale), len(seeds)
        buffer = self._buffer(len(recorded))
        state = {"step": -1}
        index = {t: i for i, t in enumerate(recorded)}

        def visit(step, layer, out):
            buffer[:, index[step], self.layer_index[layer]] = self._maps(layer, out[-self.rows :] if guided else out)

        with ExitStack() as stack:  # (word maps of generated runs are attention_maps')
            self._install(stack, state, lambda: state["step"] in index)
            result = traced_generate(self.lens, [self.prompt] * len(seeds), list(seeds), num_inference_steps=T,
                                     guidance_scale=guidance_scale, output_type="np",
                                     hooks=[Hook("attn2", tuple(self.layers), visit, frozenset(recorded))])
        return buffer.cpu().numpy(), np.asarray(result.images, np.float32)

    def given(self, latents, noise, levels, guidance_scale):
        """Maps ``(images, level, layer, concept, N)`` of encoded images `latents` from one conditional denoiser
        call per noise level (every image in it)."""
        lens, self.rows = self.lens, len(latents)
        denoiser = Denoiser(lens, [self.prompt], guidance=guidance_scale)
        buffer = self._buffer(len(levels))
        state = {"step": -1}
        with ExitStack() as stack:
            self._install(stack, state, lambda: True)
            if self.kind == "cross_attention":
                stack.enter_context(exposed_weights(lens, [("attn2", layer) for layer in self.layers]))
            for layer in self.layers:
                module = lens.site_module("attn2", layer)
                if self.kind == "cross_attention":
                    module = module.processor.weights

                def hook(_m, _a, output, layer=layer):
                    out = output
                    if self.kind == "output":
                        out = lens.part(layer).read("attn2", output, lens.text_tokens())
                    buffer[:, state["step"], self.layer_index[layer]] = self._maps(layer, out)

                handle = module.register_forward_hook(hook)
                stack.callback(handle.remove)
            for i, level in enumerate(levels):
                noisy, timestep = noised(lens, latents, noise, level)
                state["step"] = i - 1  # the denoiser's pre-hook counts the call
                denoiser.raw(noisy, timestep, [0] * len(latents))
        return buffer.cpu().numpy()

    def _buffer(self, steps: int) -> torch.Tensor:
        queries = self.lens.token_grid[0] * self.lens.token_grid[1]
        return torch.zeros(self.rows, steps, len(self.layers), self.n, queries,
                           device=self.lens.device)  # (rows, step, layer, concept, N)

    def _install(self, stack: ExitStack, state: dict, active) -> None:
        """Count denoiser calls; keep what the maps need besides the site tensor: the image queries
        (``"key"``) or the concept stream's outputs (joint families)."""
        lens = self.lens
        handle = lens.denoiser.register_forward_pre_hook(lambda *_: state.__setitem__("step", state["step"] + 1))
        stack.callback(handle.remove)
        self.seen = {}
        if self.kind != "output" or (not self.joint and self.space == "value"):
            return
        if not self.joint:
            for layer in self.layers:
                def before(_m, args, kwargs, layer=layer):
                    if active():
                        self.seen[layer] = (args[0] if args else kwargs["hidden_states"])[-self.rows :]

                handle = lens.site_module("attn2", layer).register_forward_pre_hook(before, with_kwargs=True)
                stack.callback(handle.remove)
            return
        stream: dict = {}
        for layer in range(max(self.layers) + 1):
            block = lens.blocks[layer]

            def before_block(_m, _a, kwargs, layer=layer):
                if active():
                    stream.update(temb=kwargs["temb"][-self.rows :], rotary=kwargs.get("image_rotary_emb"),
                                  text=kwargs["encoder_hidden_states"].shape[1])
                    if layer == 0:
                        stream["c"] = self.stream0.expand(self.rows, -1, -1)

            def before_attention(_m, _a, kwargs, layer=layer, block=block):
                if active():
                    self.seen[layer], stream["c"] = _joint_step(block, stream, kwargs["hidden_states"][-self.rows :])

            for module, fn in ((block, before_block), (block.attn, before_attention)):
                handle = module.register_forward_pre_hook(fn, with_kwargs=True)
                stack.callback(handle.remove)

    @torch.no_grad()
    def _static(self, layer: int) -> torch.Tensor:
        """A cross-attention layer's concept outputs ``(concepts, C)`` (``"value"``) or keys ``(concepts, heads,
        d)`` (``"key"``), each the mean over the concept's tokens."""
        attn = self.lens.site_module("attn2", layer)
        context = self.stream0
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if self.space in ("key", "prototype"):
            keys = attn.to_k(context).unflatten(-1, (attn.heads, -1))  # (1, K, heads, d)
            if attn.norm_k is not None:
                keys = attn.norm_k(keys)
            return torch.einsum("ck,khd->chd", self.pool, keys[0].float())
        out = attn.to_out[1](attn.to_out[0](attn.to_v(context)))  # (1, K, C)
        return self.pool @ out[0].float()

    def _maps(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """``(rows, concepts, N)`` maps from the site tensor `out` of the conditional rows."""
        if self.kind == "cross_attention":  # out: softmax weights (rows, heads, N, keys)
            mean = out.float().mean(1)[..., : self.words.shape[0]]  # (rows, N, keys)
            return torch.einsum("rqk,kc->rcq", mean, self.words)
        if self.joint:  # concept outputs (rows, K, C) of this block's concept stream
            concept = torch.einsum("ck,rke->rce", self.pool, self.seen[layer].float())
            logits = torch.einsum("rne,rce->rcn", out.float(), concept)
        elif self.space in ("key", "prototype"):  # mean over heads of q_x · k_c, scaled as the attention scales it
            attn = self.lens.site_module("attn2", layer)
            query = attn.to_q(self.seen[layer]).unflatten(-1, (attn.heads, -1))  # (rows, N, heads, d)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            logits = torch.einsum("rnhd,chd->rcn", query.float(), self.static[layer]) * attn.scale / attn.heads
            if self.space == "prototype":  # the concept's output: the image outputs it is most attended from
                concept = torch.einsum("rcn,rne->rce", logits.softmax(dim=2), out.float())  # (rows, concepts, C)
                logits = torch.einsum("rne,rce->rcn", out.float(), concept)
        else:
            logits = torch.einsum("rne,ce->rcn", out.float(), self.static[layer])
        return logits.softmax(dim=1)


@torch.no_grad()
def _joint_step(block: Any, stream: dict, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One joint block on the concept stream: the concepts' attention outputs ``(rows, K, C)`` after the text
    stream's output projection, and the stream after the block (gated residual, feed-forward), as the block
    moves its text tokens; `image` ``(rows, N, C)`` is the block's normed image input."""
    attn, c = block.attn, stream["c"]
    normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(c, emb=stream["temb"])
    split = lambda x: x.unflatten(-1, (attn.heads, -1))  # (rows, S, heads, d)
    k_x, v_x = split(attn.to_k(image)), split(attn.to_v(image))
    q_c, k_c, v_c = split(attn.add_q_proj(normed)), split(attn.add_k_proj(normed)), split(attn.add_v_proj(normed))
    if attn.norm_k is not None:
        k_x = attn.norm_k(k_x)
    if attn.norm_added_q is not None:
        q_c = attn.norm_added_q(q_c)
    if attn.norm_added_k is not None:
        k_c = attn.norm_added_k(k_c)
    if stream["rotary"] is not None:  # Flux rotates its image tokens (text and concept tokens sit at 0)
        from diffusers.models.embeddings import apply_rotary_emb

        k_x = apply_rotary_emb(k_x, tuple(x[stream["text"] :] for x in stream["rotary"]), sequence_dim=1)
    keys, values = torch.cat([k_x, k_c], dim=1), torch.cat([v_x, v_c], dim=1)  # image keys, then concept keys
    out = F.scaled_dot_product_attention(q_c.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
    out = attn.to_add_out(out.transpose(1, 2).flatten(2).to(c.dtype))  # (rows, K, C)
    c = c + gate_msa.unsqueeze(1) * out
    ff_in = block.norm2_context(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return out, c + gate_mlp.unsqueeze(1) * block.ff_context(ff_in)


def _text_stream(denoiser: Any, embeds: torch.Tensor) -> torch.Tensor:
    """Text-encoder output ``(rows, tokens, D)`` as the blocks receive it ``(rows, tokens, C)``: PixArt's and
    SANA's caption projection (SANA's caption norm), SD3's and Flux's context embedder."""
    for name in ("caption_projection", "context_embedder"):
        module = getattr(denoiser, name, None)
        if module is not None:
            embeds = module(embeds)
            break
    norm = getattr(denoiser, "caption_norm", None)
    return embeds if norm is None else norm(embeds)


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


def _check_concepts(concepts: Any) -> list[str]:
    if isinstance(concepts, str):
        concepts = [concepts]
    concepts = list(concepts)
    if not concepts or not all(isinstance(c, str) and c.strip() for c in concepts):
        raise ValueError(f"concepts must be a non-empty list of non-empty strings, got {concepts!r}")
    if len(set(concepts)) != len(concepts):
        raise ValueError(f"concepts has duplicates: {concepts}; list each concept once (they label the maps)")
    return concepts


def _concept_tokens(lens: Lens, prompt: str | None, concepts: list[str]) -> list[tuple[int, ...]]:
    """Each concept's text-token positions: in the prompt (word maps), or in the concept's own encoding."""
    if prompt is not None:
        found = word_tokens(lens, prompt, concepts)
        return [found[c] for c in concepts]
    out, keep = [], max_tokens(lens)
    for concept in concepts:
        count = len(lens.pipeline.tokenizer(prompt_text(lens, concept)).input_ids)
        if keep is not None and count > keep:
            raise ValueError(f"concept {concept[:40]!r}… makes {count} tokens, more than the {keep} the text encoder "
                             f"keeps; use a shorter word or phrase")
        try:
            positions = word_tokens(lens, concept, [concept])[concept]
        except ValueError as err:
            raise ValueError(f"concept {concept!r} gives no token of the pipeline's tokenizer ({err}); use a "
                             f"word or phrase the tokenizer keeps") from None
        out.append(positions)
    return out


def _check_layers(lens: Lens, layers: Any, kind: str, joint: bool) -> list[int]:
    """The blocks to read; for joint families' output maps, only blocks with a text-stream output."""
    def usable(layer: int) -> bool:
        block = lens.blocks[layer]
        return not joint or kind != "output" or (hasattr(block, "ff_context") and block.ff_context is not None
                                                 and not getattr(block, "context_pre_only", False))
    if layers is None:
        return [layer for layer in range(lens.num_layers) if usable(layer)]
    if isinstance(layers, (int, np.integer)):
        raise ValueError(f"layers must be a list of block indices; pass layers=[{layers}]")
    layers = list(layers)
    if not layers or not all(isinstance(l, (int, np.integer)) for l in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be a non-empty list of distinct block indices, got {layers!r}")
    outside = [int(l) for l in layers if not 0 <= l < lens.num_layers]
    if outside:
        raise ValueError(f"layers {outside} out of range: the model has blocks 0..{lens.num_layers - 1}")
    bad = [int(l) for l in layers if not usable(l)]
    if bad:
        raise ValueError(f"blocks {bad} of {lens.family.label or lens.family.name} have no text-stream output "
                         f"(the last joint block, or a single-stream one) for kind='output'; leave them out")
    return sorted(int(l) for l in layers)


def _check_levels(levels: Any) -> list[float]:
    if isinstance(levels, (int, float)):
        levels = [levels]
    levels = [float(x) for x in levels]
    if not levels or not all(0 < x <= 1 for x in levels) or len(set(levels)) != len(levels):
        raise ValueError(f"noise_levels must be distinct values in (0, 1], got {levels!r}")
    return levels


def _dataset(lens: Lens, values: np.ndarray, made: np.ndarray, settings: dict) -> xr.Dataset:
    rows, cols = lens.token_grid
    given = settings["levels"] is not None
    recorded = settings["recorded"]
    coords: dict = {"item": np.arange(values.shape[0]), "step": np.array(recorded, np.int64),
                    "layer": np.array(settings["layers"], np.int64), "concept": list(settings["concepts"]),
                    "row": np.arange(rows), "col": np.arange(cols)}
    if given:
        coords["noise_level"] = ("step", np.array(settings["levels"], np.float64))
    else:
        coords["seed"] = ("item", np.array(settings["seeds"], np.int64))
        T = settings["num_inference_steps"]
        coords["timestep"] = ("step", scheduler_timesteps(lens, T).astype(np.float64)[np.array(recorded)])
    ds = xr.Dataset({"map": (MAP_DIMS, values.astype(np.float32)),
                     "image": (("item", "y", "x", "rgb"), made.astype(np.float32))}, coords=coords)
    ds["pooled"] = ds["map"].mean(("step", "layer"))
    ds["pooled"].attrs["description"] = "mean of the per-cell maps over the chosen steps (noise levels) and layers"
    ds["map"].attrs["description"] = ("softmax over the concepts of <image token's attention output, concept's output>"
                                      if settings["kind"] == "output" else
                                      "cross-attention weights (mean over heads) summed over each word's tokens")
    ds.attrs.update(lens.provenance())
    ds.attrs.update(readout="concept_maps", kind=settings["kind"], prompt=settings["prompt"],
                    concepts=typed(settings["concepts"]), seeds=typed(settings["seeds"]),
                    maps_of="given images" if given else "generated runs", num_inference_steps=int(settings["num_inference_steps"]),
                    guidance_scale=float(settings["guidance_scale"]), token_grid=[rows, cols],
                    output_space=("" if settings["kind"] != "output" else "concept stream" if lens.family.processor
                                  != "cross" else settings["output_space"]),
                    concept_tokens=typed({c: list(t) for c, t in zip(settings["concepts"], settings["tokens"])}))
    if given:
        ds.attrs["noise_levels"] = typed(settings["levels"])
    return ds
