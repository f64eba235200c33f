"""Hand-written raw torch-hook references, independent of dit-lens' nnsight plumbing."""

import numpy as np
import torch


def steered_plain_call(lens, prompt, seed, T, guidance, edits, callback=None):
    """The plain pipeline call with raw forward hooks editing attn2 outputs.

    `edits` is a list of (vector (step, layer, C) numpy, alpha, layers, renormalize) applied in order;
    `callback(step, t, latents)` is passed to the pipeline.
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
        image = plain_call(lens, prompt, seed, T, guidance, callback)
    finally:
        for h in handles:
            h.remove()
    return image, gates


def plain_call(lens, prompt, seed, T, guidance, callback=None):
    """One image ``(H, W, 3)`` from the unhooked pipeline, with an optional step callback."""
    return lens.pipeline(prompt, generator=lens.generator(seed), num_inference_steps=T, guidance_scale=guidance,
                         output_type="np", callback=callback, **lens.pipeline_kwargs).images[0]


def blend_reference(unsteered, steered, tau):
    """Latent blending written out in numpy: latents (C, H, W) -> blended steered latents."""
    change = np.abs(steered - unsteered).sum(0)  # (H, W)
    height, width = change.shape
    smooth = np.zeros_like(change)
    for y in range(height):
        for x in range(width):
            smooth[y, x] = change[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].mean()
    m = np.clip(smooth / smooth.max() / tau, 0, 1) if smooth.max() > 0 else np.zeros_like(smooth)
    return m * steered + (1 - m) * unsteered


def blended_plain_call(lens, prompt, seed, T, guidance, edit, tau):
    """A blended steered image from two plain calls: record the unsteered latents, then steer with
    raw hooks and blend toward them after every step."""
    recorded = []
    plain_call(lens, prompt, seed, T, guidance, lambda i, t, latents: recorded.append(latents[0].clone().numpy()))

    def blend(i, t, latents):
        latents[0] = torch.from_numpy(blend_reference(recorded[i], latents[0].numpy(), tau))

    image, _ = steered_plain_call(lens, prompt, seed, T, guidance, [edit], callback=blend)
    return image


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
