"""Attention weights as a site: a processor that computes them explicitly and passes them through a
named submodule, so the nnsight loop that reads and edits site outputs reads and edits them too.

Fused attention (``scaled_dot_product_attention``) never materialises ``softmax(q·kᵀ·scale + mask)``.
`WeightsProcessor` computes those weights ``(rows, heads, queries, keys)``, sends them through its
child module ``weights`` (an identity: what nnsight sees as the site ``"attn2.weights"``) and then:

- when nothing replaced them, returns the fused result, bit-for-bit what diffusers' default
  processor returns (reading weights never changes an image);
- when a hook replaced them, recomputes the rows whose weights changed as ``weights · v`` and keeps
  the fused result for every other row (the untouched branch of a pair stays bit-identical).

`exposed_weights` installs it, through diffusers' own ``set_attn_processor``, on exactly the
attention modules a run needs, and puts every original processor back when the run ends or raises.
Modules not named keep their fused processor.

Examples:
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> with exposed_weights(lens, [("attn2", 1)]):
    ...     type(lens.blocks[1].attn2.processor).__name__, type(lens.blocks[0].attn2.processor).__name__
    ('WeightsProcessor', 'AttnProcessor2_0')
    >>> type(lens.blocks[1].attn2.processor).__name__  # put back
    'AttnProcessor2_0'
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F

from ..model.lens import Lens

__all__ = ["AttentionWeights", "FluxWeightsProcessor", "JointWeightsProcessor", "WeightsProcessor", "exposed_weights", "processor_key"]


class AttentionWeights(torch.nn.Module):
    """Identity over the softmax weights ``(rows, heads, queries, keys)``: the hookable site."""

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        return weights


class WeightsProcessor(torch.nn.Module):
    """A diffusers attention processor whose softmax weights pass through ``self.weights``.

    Mirrors diffusers' default ``AttnProcessor2_0`` step for step (spatial and group norms, the
    q/k norms, the mask, the output projection, residual and rescaling) so an untouched call returns
    the same tensor bit-for-bit.
    """

    def __init__(self) -> None:
        super().__init__()
        self.weights = AttentionWeights()

    def forward(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                **_: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, keys = context.shape[0], context.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value, head_dim = _split_heads(attn, batch, query, key, value)

        scores = (query @ key.transpose(-1, -2)).mul_(attn.scale)  # (rows, heads, queries, keys)
        if attention_mask is not None:
            scores.add_(attention_mask)
        probs = scores.softmax(dim=-1).to(value.dtype)
        seen = self.weights(probs)  # the site: nnsight reads or replaces it here

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)  # (rows, heads, queries, head_dim)
        changed = _changed_rows(seen, probs)
        if changed is not None:
            out = out.clone()
            out[changed] = seen[changed].to(value.dtype) @ value[changed]
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if four_d:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs: Any):
        # diffusers calls processors positionally as processor(attn, hidden_states, ...)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


class JointWeightsProcessor(torch.nn.Module):
    """Joint attention (SD3's MMDiT: image and text tokens in one softmax) whose *image-query × text-key*
    block of softmax weights ``(rows, heads, image tokens, text tokens)`` passes through ``self.weights``.

    Mirrors diffusers' ``JointAttnProcessor2_0`` step for step, so an untouched call returns the same
    tensors bit-for-bit. Only the image queries' weights are computed (the text queries' are not
    exposed). When a hook replaced the block, the image-query rows whose weights changed are recomputed
    as ``[image-key weights, new text-key weights] · v``; every other row keeps the fused result.
    """

    def __init__(self) -> None:
        super().__init__()
        self.weights = AttentionWeights()

    def forward(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        batch, images = hidden_states.shape[0], hidden_states.shape[1]
        query, key, value, head_dim = _split_heads(attn, batch, attn.to_q(hidden_states), attn.to_k(hidden_states),
                                                   attn.to_v(hidden_states))
        if encoder_hidden_states is not None:
            text = [proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
                    for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
            if attn.norm_added_q is not None:
                text[0] = attn.norm_added_q(text[0])
            if attn.norm_added_k is not None:
                text[1] = attn.norm_added_k(text[1])
            query, key, value = (torch.cat([x, t], dim=2) for x, t in zip((query, key, value), text))
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)  # (rows, heads, N+M, d)
        if encoder_hidden_states is not None:
            probs = (query[:, :, :images] @ key.transpose(-1, -2)).mul_(attn.scale).softmax(dim=-1).to(value.dtype)
            block = probs[:, :, :, images:]  # (rows, heads, image queries, text keys)
            seen = self.weights(block)  # the site: nnsight reads or replaces it here
            changed = _changed_rows(seen, block)
            if changed is not None:
                full = torch.cat([probs[changed][..., :images], seen[changed].to(value.dtype)], dim=-1)
                out = out.clone()
                out[changed, :, :images] = full @ value[changed]
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :images], hidden_states[:, images:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


class FluxWeightsProcessor(torch.nn.Module):
    """Flux's attention (rotary, text tokens *first*) whose image-query × text-key block of softmax weights
    ``(rows, heads, image tokens, text tokens)`` passes through ``self.weights``.

    Mirrors diffusers' ``FluxAttnProcessor`` step for step, so an untouched call returns the same tensors
    bit-for-bit. Double-stream blocks pass the text stream in (its length is the text-token count);
    single-stream blocks attend over one sequence ``[text; image]``, whose first `text` tokens are text
    (`exposed_weights` sets it). Replaced weights are handled as in `JointWeightsProcessor`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.weights = AttentionWeights()
        self.text = 0  # text tokens at the head of a single-stream sequence

    def forward(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, **kwargs: Any) -> Any:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, text_query, text_key, text_value = _get_qkv_projections(attn, hidden_states,
                                                                                   encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))  # (rows, S, heads, d)
        query, key = attn.norm_q(query), attn.norm_k(key)
        text = self.text
        if attn.added_kv_proj_dim is not None:
            text_query, text_key, text_value = (x.unflatten(-1, (-1, attn.head_dim))
                                                for x in (text_query, text_key, text_value))
            text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
            query, key, value = (torch.cat([t, x], dim=1) for t, x in ((text_query, query), (text_key, key),
                                                                         (text_value, value)))
            text = encoder_hidden_states.shape[1]
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask)  # (rows, S, heads, d)

        q, k, v = (x.transpose(1, 2) for x in (query[:, text:], key, value))  # (rows, heads, ·, d)
        scores = (q @ k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)  # image queries × every key
        if attention_mask is not None:
            mask = attention_mask[..., text:, :] if attention_mask.shape[-2] > 1 else attention_mask
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = scores.softmax(dim=-1).to(value.dtype)
        block = probs[..., :text]  # (rows, heads, image queries, text keys)
        seen = self.weights(block)  # the site: nnsight reads or replaces it here
        changed = _changed_rows(seen, block)
        if changed is not None:
            full = torch.cat([seen[changed].to(value.dtype), probs[changed][..., text:]], dim=-1)
            out = out.clone()
            out[changed, text:] = (full @ v[changed]).transpose(1, 2).to(out.dtype)
        hidden_states = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states[:, :text], hidden_states[:, text:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, **kwargs: Any):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                **kwargs)


def _changed_rows(seen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
    """The rows ``(rows,)`` of `weights` a hook replaced (`seen` is what came back from the weights site), or None
    where nothing changed; a replacement of another shape is refused."""
    if seen is weights:
        return None
    if seen.shape != weights.shape:
        raise ValueError(f"replaced attention weights must keep their shape {tuple(weights.shape)}, "
                         f"got {tuple(seen.shape)}")
    changed = (seen != weights).flatten(1).any(1)
    return changed if bool(changed.any()) else None


def _split_heads(attn: Any, batch: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple:
    """``(rows, tokens, heads·d)`` projections as ``(rows, heads, tokens, d)``, with the module's q/k norms
    (as diffusers' processors apply them), and the head size d."""
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, head_dim


_KINDS = {"cross": WeightsProcessor, "joint": JointWeightsProcessor, "flux": FluxWeightsProcessor}

#: One processor per attention module for the module's lifetime, so the nnsight envoy that mirrors
#: ``attn.processor.weights`` stays valid across runs.
_PROCESSORS: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def processor_key(lens: Lens, site: str, layer: int) -> str:
    """The key of `site`'s processor in ``denoiser.attn_processors``."""
    path = lens.family.site_path(site, layer, lens.split)[len(lens.family.denoiser) + 1:]
    return f"{path}.processor"


@contextmanager
def exposed_weights(lens: Lens, points: Iterable[tuple[str, int]]) -> Iterator[None]:
    """Install `WeightsProcessor` on the attention modules ``(site, layer)`` for the duration.

    Args:
        lens: A `dit_lens.Lens`.
        points: ``(attention site, layer)`` pairs, e.g. ``[("attn2", 3)]``.
    """
    points = sorted(set(points))
    if not points:
        yield
        return
    for site, layer in points:
        if site not in lens.part(layer).attention_sites:
            raise ValueError(f"{site!r} is not an attention site of {lens.family.name}'s block {layer}; attention "
                             f"weights exist for {list(lens.part(layer).attention_sites)}")
    denoiser = lens.denoiser
    original = dict(denoiser.attn_processors)
    wanted = dict(original)
    for site, layer in points:
        key = processor_key(lens, site, layer)
        if key not in original:
            raise ValueError(f"no attention processor {key!r} in {type(denoiser).__name__}")
        module = lens.site_module(site, layer)
        kind = _KINDS[lens.family.processor]
        wanted[key] = processor = _PROCESSORS.setdefault(module, kind())
        if isinstance(processor, FluxWeightsProcessor):
            processor.text = lens.text_tokens()
    denoiser.set_attn_processor(wanted)  # diffusers consumes the dict it is given
    try:
        yield
    finally:
        denoiser.set_attn_processor(dict(original))
