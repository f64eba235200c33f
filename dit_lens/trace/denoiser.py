"""`Denoiser`: calls of the pipeline's transformer as its own loop makes them, outside that loop.

Loops the pipeline has no place for (DDIM inversion, h-Edit's two-timestep step, a latent correction's
gradient pass) call the denoiser directly with the pipeline's own prompt embeddings, masks and
micro-conditions. Calls go through the nnsight envoy of the denoiser, so one made *during* a traced run
is invisible to it (nnsight stands the trace down for the call: no hook fires and no step is counted)
and one made outside a run is an ordinary module call.

Examples:
    >>> import torch
    >>> from dit_lens import PixArtSpec, build_pixart, load
    >>> lens = load(build_pixart(PixArtSpec(num_layers=1)))
    >>> den = Denoiser(lens, ["a polyp"])
    >>> den.raw(torch.zeros(2, 4, 2, 2), 500, [0, None]).shape  # prompt 0 and the empty prompt
    torch.Size([2, 4, 2, 2])
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["Denoiser"]


class Denoiser:
    """The pipeline's transformer under given prompts.

    Args:
        lens: A `dit_lens.Lens` of a PixArt, SANA or SD3 pipeline.
        prompts: The prompts whose embeddings calls use (indices into them pick a row's prompt).
    """

    def __init__(self, lens: Any, prompts: Sequence[str]) -> None:
        pipe = lens.pipeline
        if not hasattr(pipe, "encode_prompt") or not hasattr(pipe, "transformer"):
            raise ValueError(f"calling the denoiser directly needs a pipeline with `encode_prompt` and a `transformer`; "
                             f"{type(pipe).__name__} has not")
        self.lens, self.pipe = lens, pipe
        kwargs = lens.pipeline_kwargs
        import inspect

        accepted = inspect.signature(pipe.encode_prompt).parameters
        text = {k: v for k, v in kwargs.items() if k in accepted and k not in ("height", "width")}
        if "clean_caption" in accepted:
            text.setdefault("clean_caption", False)
        with torch.no_grad():
            if "prompt_3" in accepted:  # SD3: three text encoders; a pooled CLIP embedding instead of a mask
                embeds, null, pooled, null_pooled = pipe.encode_prompt(
                    list(prompts), None, None, do_classifier_free_guidance=True, negative_prompt="",
                    device=lens.device, **text)
                per_row = {"pooled_projections": (pooled, null_pooled[:1])}
            else:
                embeds, mask, null, null_mask = pipe.encode_prompt(
                    list(prompts), do_classifier_free_guidance=True, negative_prompt="", device=lens.device, **text)
                per_row = {"encoder_attention_mask": (mask, null_mask[:1])}  # (prompts, text tokens)
        self.embeds, self.null = embeds, null[:1]  # (prompts, text tokens, D), (1, text tokens, D)
        self.per_row = per_row  # what else the transformer takes per row: name -> (per prompt, empty prompt)
        self.height, self.width = kwargs["height"], kwargs["width"]
        self.learned_sigma = pipe.transformer.config.out_channels // 2 == pipe.vae.config.latent_channels
        self._module = getattr(lens.model, lens.family.denoiser)  # the envoy: unseen by a running trace

    def call(self, latents: torch.Tensor, timestep: Any, which: Sequence[int | None]) -> torch.Tensor:
        """The prediction for each row of `latents` ``(rows, C, H, W)`` under prompt ``which[i]`` (an index
        into the prompts, or None for the empty prompt), differentiable when grad is enabled."""
        def rows_of(per_prompt: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
            return torch.cat([empty if k is None else per_prompt[k : k + 1] for k in which])

        embeds = rows_of(self.embeds, self.null)
        extra = {name: rows_of(*values) for name, values in self.per_row.items()}
        rows, config = latents.shape[0], self.pipe.transformer.config
        if self.lens.family.name == "PixArtTransformer2DModel":
            extra["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
            if config.sample_size == 128:  # PixArt's micro-conditions, as its pipeline adds them
                extra["added_cond_kwargs"] = {
                    "resolution": torch.tensor([[self.height, self.width]] * rows, dtype=embeds.dtype),
                    "aspect_ratio": torch.tensor([[self.height / self.width]] * rows, dtype=embeds.dtype)}
            t = torch.full((rows,), int(timestep), dtype=torch.long, device=latents.device)
        else:  # SANA, SD3: the scheduler's (float) timestep, scaled as the pipeline scales it
            t = torch.full((rows,), float(timestep), device=latents.device) * getattr(config, "timestep_scale", 1.0)
        out = self._module(latents.to(embeds.dtype), encoder_hidden_states=embeds, timestep=t, return_dict=False,
                           **extra)[0]
        return out.chunk(2, dim=1)[0] if self.learned_sigma else out  # (rows, C, H, W)

    @torch.no_grad()
    def raw(self, latents: torch.Tensor, timestep: Any, which: Sequence[int | None]) -> torch.Tensor:
        """`call` without gradients: the transformer's prediction (ε, v or x₀, as trained)."""
        return self.call(latents, timestep, which)
