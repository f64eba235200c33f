"""Hand-written raw torch-hook references, independent of dit-lens' nnsight plumbing."""

import numpy as np
import torch


def steered_plain_call(lens, prompt, seed, T, guidance, edits):
    """The plain pipeline call with raw forward hooks editing attn2 outputs.

    `edits` is a list of (vector (step, layer, C) numpy, alpha, layers, renormalize) applied in order.
    Returns (image (H, W, 3), gates {(k, step, layer): (tokens,) of the conditional row}).
    """
    pipe = lens.pipeline
    state = {"t": -1}
    gates = {}
    handles = [pipe.transformer.register_forward_pre_hook(lambda m, a: state.__setitem__("t", state["t"] + 1))]

    def make(layer):
        def hook(module, args, output):
            out = output
            for k, (vec, alpha, layers, renorm) in enumerate(edits):
                if layer not in layers:
                    continue
                t = state["t"]
                v = torch.from_numpy(np.ascontiguousarray(vec[min(t, vec.shape[0] - 1), layer]))
                dots = torch.einsum("bnc,c->bn", out, v).clamp(min=0)
                gates[(k, t, layer)] = dots[-1].clone()
                new = out - alpha * dots[..., None] * v
                if renorm:
                    new = new / new.norm(dim=-1, keepdim=True) * out.norm(dim=-1, keepdim=True)
                out = new
            return out

        return hook

    for layer in range(lens.num_layers):
        handles.append(pipe.transformer.transformer_blocks[layer].attn2.register_forward_hook(make(layer)))
    try:
        image = lens.plain(prompt, seed=seed, num_inference_steps=T, guidance_scale=guidance)
    finally:
        for h in handles:
            h.remove()
    return image, gates


def attn2_token_means(lens, prompt, seed, T, guidance):
    """(step, layer, C) mean over tokens of attn2's output, conditional half, via raw hooks."""
    pipe = lens.pipeline
    state = {"t": -1}
    out = np.zeros((T, lens.num_layers, lens.width))
    handles = [pipe.transformer.register_forward_pre_hook(lambda m, a: state.__setitem__("t", state["t"] + 1))]

    def make(layer):
        def hook(module, args, output):
            out[state["t"], layer] = output[-1].mean(0).double().numpy()

        return hook

    for layer in range(lens.num_layers):
        handles.append(pipe.transformer.transformer_blocks[layer].attn2.register_forward_hook(make(layer)))
    try:
        lens.plain(prompt, seed=seed, num_inference_steps=T, guidance_scale=guidance)
    finally:
        for h in handles:
            h.remove()
    return out
