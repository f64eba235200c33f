"""`Denoiser`: calls of the pipeline's transformer as its own loop makes them, outside that loop, and `mix`,
classifier-free guidance as the pipeline mixes the two halves.

Loops the pipeline has no place for (DDIM inversion, h-Edit's two-timestep step, a latent correction's
gradient pass) call the denoiser directly with the pipeline's own prompt embeddings, masks and
micro-conditions. Calls go through the nnsight envoy of the denoiser, so one made *during* a traced run
is invisible to it (nnsight stands the trace down for the call: no hook fires and no step is counted)
and one made outside a run is an ordinary module call.

Examples:
    >>> import torch
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=1)))
    >>> den = Denoiser(lens, ["a polyp"])
    >>> den.raw(torch.zeros(2, 4, 2, 2), 500, [0, None]).shape  # prompt 0 and the empty prompt
    torch.Size([2, 4, 2, 2])
    >>> mix(torch.zeros(1), torch.ones(1), 4.5)  # the unconditional prediction moved 4.5 times towards the prompt's
    tensor([4.5000])
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..model.lens import Lens

__all__ = ["Denoiser", "mix"]


def mix(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance of scale `scale`: ``uncond + scale · (cond − uncond)``, as the pipelines mix the
    empty prompt's prediction with the prompt's (differentiable)."""
    return uncond + scale * (cond - uncond)


class Denoiser:
    """The pipeline's transformer under given prompts.

    Args:
        lens: A `dit_lens.Lens` of a PixArt, SANA, SD3 or Flux pipeline.
        prompts: The prompts whose embeddings calls use (indices into them pick a row's prompt).
        guidance: The guidance scale a guidance-distilled model (Flux) takes as an input (a call may
            override it); unused by the other families, which guide by mixing two calls.
    """

    def __init__(self, lens: Lens, prompts: Sequence[str], guidance: float | None = None) -> None:
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
        self.guidance = guidance
        self.text_ids = None
        with torch.no_grad():
            if lens.family.pack > 1:  # Flux: T5 tokens to attend to, CLIP's pooled embedding, no mask
                embeds, pooled, self.text_ids = pipe.encode_prompt(list(prompts), None, device=lens.device, **text)
                null, null_pooled, _ = pipe.encode_prompt([""], None, device=lens.device, **text)
                per_row = {"pooled_projections": (pooled, null_pooled)}
            elif "prompt_3" in accepted:  # SD3: three text encoders; a pooled CLIP embedding instead of a mask
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
        out_channels = pipe.transformer.config.out_channels or pipe.transformer.config.in_channels  # Flux: None
        self.learned_sigma = out_channels // lens.family.pack ** 2 == 2 * pipe.vae.config.latent_channels
        self._module = getattr(lens.model, lens.family.denoiser)  # the envoy: unseen by a running trace

    def call(self, latents: torch.Tensor, timestep: Any, which: Sequence[int | None],
             guidance: float | None = None) -> torch.Tensor:
        """The prediction for each row of `latents` ``(rows, C, H, W)`` under prompt ``which[i]`` (an index
        into the prompts, or None for the empty prompt), differentiable when grad is enabled (`guidance`: the
        embedded guidance scale of a guidance-distilled model, default the one given at construction)."""
        def rows_of(per_prompt: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
            return torch.cat([empty if k is None else per_prompt[k : k + 1] for k in which])

        embeds = rows_of(self.embeds, self.null)
        extra = {name: rows_of(*values) for name, values in self.per_row.items()}
        rows, config = latents.shape[0], self.pipe.transformer.config
        if self.lens.family.pack > 1:
            return self._packed(latents, timestep, embeds, extra, self.guidance if guidance is None else guidance)
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

    def _packed(self, latents: torch.Tensor, timestep: Any, embeds: torch.Tensor, extra: dict,
                guidance: float | None) -> torch.Tensor:
        """Flux's call: latents packed into 2×2-patch tokens with their positions, the timestep in [0, 1], the
        guidance scale embedded; the prediction unpacked to ``(rows, C, H, W)``."""
        family, config = self.lens.family, self.pipe.transformer.config
        rows, _, height, width = latents.shape
        grid = (height // family.pack, width // family.pack)
        if config.guidance_embeds and guidance is None:
            raise ValueError(f"{family.label} is guidance-distilled: its denoiser takes the guidance scale as an "
                             f"input; pass guidance= to the Denoiser")
        ids = self.pipe._prepare_latent_image_ids(rows, grid[0], grid[1], latents.device, embeds.dtype)
        t = torch.full((rows,), float(timestep), device=latents.device).to(embeds.dtype) / 1000
        embedded = (torch.full((rows,), float(guidance), device=latents.device, dtype=torch.float32)
                    if config.guidance_embeds else None)
        out = self._module(hidden_states=family.pack_latents(latents.to(embeds.dtype)), timestep=t, guidance=embedded,
                           encoder_hidden_states=embeds, txt_ids=self.text_ids, img_ids=ids, return_dict=False,
                           **extra)[0]
        return family.unpack_latents(out, grid)

    @torch.no_grad()
    def raw(self, latents: torch.Tensor, timestep: Any, which: Sequence[int | None],
            guidance: float | None = None) -> torch.Tensor:
        """`call` without gradients: the transformer's prediction (ε, v or x₀, as trained)."""
        return self.call(latents, timestep, which, guidance)
