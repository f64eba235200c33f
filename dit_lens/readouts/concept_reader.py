"""How `dit_lens.concept_maps` reads one run: the torch hooks that turn a traced pipeline call (or one
denoiser call per noise level of given images) into concept maps ``(step, layer, concept, N)``.

- Word maps: the cross-attention softmax weights (mean over heads) summed over each concept's tokens.
- Output-space maps, joint families (SD3, Flux): the concept tokens run as their own stream through each
  block's text-stream weights (`joint_step`), attending to the image tokens and to each other; nothing
  attends to them, so the run is unchanged. The map is the softmax over concepts of ⟨o_x, o_c⟩.
- Output-space maps, cross-attention families (PixArt, SANA): ``"prototype"`` (the image outputs each concept
  is most attended from), ``"value"`` (the concept's value through the output projection) or ``"key"``
  (q_x·k_c softmaxed over the concepts); see the concept-maps guide for their measured effect.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..sampling import Denoiser, noised
from ..trace.attention import exposed_weights
from ..trace.runner import Hook, traced_generate

__all__ = ["Reader", "joint_step", "text_stream"]


class Reader:
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
            stream = text_stream(lens.denoiser, embeds)  # (concepts, text tokens, C): as the blocks see text
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
                    self.seen[layer], stream["c"] = joint_step(block, stream, kwargs["hidden_states"][-self.rows :])

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
def joint_step(block: Any, stream: dict, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def text_stream(denoiser: Any, embeds: torch.Tensor) -> torch.Tensor:
    """Text-encoder output ``(rows, tokens, D)`` as the blocks receive it ``(rows, tokens, C)``: PixArt's and
    SANA's caption projection (SANA's caption norm), SD3's and Flux's context embedder."""
    for name in ("caption_projection", "context_embedder"):
        module = getattr(denoiser, name, None)
        if module is not None:
            embeds = module(embeds)
            break
    norm = getattr(denoiser, "caption_norm", None)
    return embeds if norm is None else norm(embeds)
