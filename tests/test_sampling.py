"""dit_lens.sampling: the one decode against the pipeline's own, and the differentiable loop's step index
through checkpointed recomputation."""

import numpy as np
import torch

from dit_lens.sampling import DifferentiableSampler, decode, decode_images, frozen
from dit_lens.trace.runner import initial_noise

PROMPT = "a polyp"


def test_decode_is_the_pipelines_decode(tiny_lens):
    def run(output_type):
        return tiny_lens.pipeline(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                                  output_type=output_type, return_dict=False, **tiny_lens.pipeline_kwargs)[0]

    latents, images = run("latent"), run("np")
    np.testing.assert_array_equal(decode(tiny_lens, latents, batch_size=1), images)
    differentiable = decode_images(tiny_lens, latents.clone().requires_grad_(True))
    assert differentiable.requires_grad
    np.testing.assert_array_equal(differentiable.detach().permute(0, 2, 3, 1).numpy(), images)


def test_a_recomputed_call_knows_its_step(tiny_lens):
    """Checkpointed calls run again in the backward pass, last step first: each must see its own step."""
    steps, seen = 3, []
    sampler = DifferentiableSampler(tiny_lens, PROMPT, steps, guidance_scale=4.5, checkpoint=True)

    def hook(_module, inputs, _output):
        seen.append((sampler.step, torch.is_grad_enabled(), inputs[0].detach().clone()))

    z = initial_noise(tiny_lens, [0]).requires_grad_(True)
    handle = tiny_lens.pipeline.transformer.transformer_blocks[0].register_forward_hook(hook)
    try:
        with frozen([tiny_lens.pipeline.transformer, tiny_lens.pipeline.vae]):
            images = sampler.images(z, [0])
            torch.autograd.grad(images.mean(), z)
    finally:
        handle.remove()
    assert [step for step, _, _ in seen] == [0, 1, 2, 2, 1, 0]  # the forward pass, then its recomputation
    first = {step: hidden for step, _, hidden in seen[:steps]}
    for step, _, hidden in seen[steps:]:
        torch.testing.assert_close(hidden, first[step], rtol=0, atol=0)
