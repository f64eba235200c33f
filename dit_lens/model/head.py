"""The denoiser's output head, applied to any block's hidden states: what the model would output if it
stopped there.

Every supported DiT ends the same way: a final norm modulated by the step's timestep embedding, a linear
projection to latent patches, and the patches laid back out as a latent grid. Families differ only in
where the embedding comes from and how the norm is modulated, so each is one `Head` entry in `HEADS`:

- PixArt: ``norm_out`` (a plain LayerNorm), then shift and scale from ``scale_shift_table`` plus the
  embedded timestep of ``adaln_single``;
- SANA: ``norm_out(h, embedded timestep, scale_shift_table)`` (its ``SanaModulatedNorm``), the embedding
  from ``time_embed``;
- SD3 and Flux: ``norm_out(h, temb)`` (``AdaLayerNormContinuous``), ``temb`` from ``time_text_embed``
  (timestep and pooled text; Flux's also the embedded guidance scale). Flux's tokens are packed 2×2
  latent patches, unpacked as its pipeline unpacks them.

`HeadInputs` keeps, with torch forward hooks on the denoiser, what the head needs at each call: the
timestep embedding and the latents the call was given. (Latents become images with
`dit_lens.sampling.images.decode`, which reads `Head.shifted`.)

Examples:
    >>> import torch
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> head = head_of(lens)
    >>> head.embedding, head.modulation
    ('adaln_single', 'table')
    >>> with HeadInputs(lens) as inputs, torch.no_grad():  # one call of the denoiser, as a pipeline makes it
    ...     out = lens.pipeline.transformer(torch.zeros(1, 4, 8, 8), encoder_hidden_states=torch.zeros(1, 3, 32),
    ...         timestep=torch.tensor([500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ...         return_dict=False)[0]
    >>> inputs.embedding.shape, inputs.latents.shape  # (rows, C), (rows, C, h, w)
    (torch.Size([1, 16]), torch.Size([1, 4, 8, 8]))
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from .lens import Lens

__all__ = ["HEADS", "Head", "HeadInputs", "apply_head", "head_of", "loop_latents", "unpatchify"]


@dataclass(frozen=True)
class Head:
    """How one denoiser class turns its last hidden states into its output.

    Attributes:
        embedding: The denoiser's module whose output conditions the final norm.
        index: Which element of that module's tuple output is the embedding (``None``: the output itself).
        modulation: ``"table"`` (PixArt: ``norm_out(h)``, then ``h·(1 + scale) + shift`` from
            ``scale_shift_table + embedding``), ``"modulated"`` (SANA: ``norm_out(h, embedding,
            scale_shift_table)``) or ``"adaptive"`` (SD3, Flux: ``norm_out(h, embedding)``).
        shifted: The pipeline decodes ``latents / scaling_factor + shift_factor`` (SD3, Flux), not only
            ``latents / scaling_factor``.
    """

    embedding: str
    index: int | None
    modulation: str
    shifted: bool = False

    def __post_init__(self) -> None:
        if self.modulation not in ("table", "modulated", "adaptive"):
            raise ValueError(f"Head.modulation must be 'table', 'modulated' or 'adaptive', got {self.modulation!r}")


#: Denoiser class name -> its output head (the names of `dit_lens.model.sites.FAMILIES`).
HEADS: Mapping[str, Head] = MappingProxyType({
    "PixArtTransformer2DModel": Head("adaln_single", 1, "table"),
    "SanaTransformer2DModel": Head("time_embed", 1, "modulated"),
    "SD3Transformer2DModel": Head("time_text_embed", None, "adaptive", shifted=True),
    "FluxTransformer2DModel": Head("time_text_embed", None, "adaptive", shifted=True),
})


def head_of(lens: Lens) -> Head:
    """The `Head` of the lens's denoiser.

    Raises:
        ValueError: the family has no entry in `HEADS`.
    """
    name = lens.family.name
    if name not in HEADS:
        raise ValueError(f"no output head is known for {name}; add a Head entry to dit_lens.model.head.HEADS")
    return HEADS[name]


def apply_head(lens: Lens, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """The denoiser's own output for image-token hidden states `hidden` ``(rows, tokens, C)`` under the
    timestep `embedding` of the same call: final norm and modulation, output projection and unpatchify.

    Returns:
        ``(rows, out_channels, h, w)`` on the latent grid (Flux's packed tokens unpacked), in the
        denoiser's dtype; at the last block, the denoiser's output itself.
    """
    head, denoiser, family = head_of(lens), lens.denoiser, lens.family
    if head.modulation == "table":
        table = denoiser.scale_shift_table  # (2, C)
        shift, scale = (table[None] + embedding[:, None].to(table.device)).chunk(2, dim=1)  # (rows, 1, C) each
        h = denoiser.norm_out(hidden)
        h = h * (1 + scale.to(h.device)) + shift.to(h.device)
    elif head.modulation == "modulated":
        h = denoiser.norm_out(hidden, embedding, denoiser.scale_shift_table)
    else:
        h = denoiser.norm_out(hidden, embedding)
    patches = denoiser.proj_out(h)  # (rows, tokens, p·p·out_channels)
    if family.pack > 1:  # Flux: tokens are packed latent patches
        return family.unpack_latents(patches, lens.token_grid)
    return unpatchify(patches, lens.token_grid, int(denoiser.config.patch_size))


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Tokens of ``patch × patch`` latent patches ``(rows, h·w, p·p·C)`` on a `grid` of ``(h, w)`` tokens
    as the latent grid ``(rows, C, h·p, w·p)`` (diffusers' ``nhwpqc -> nchpwq``)."""
    rows, (h, w) = patches.shape[0], grid
    x = patches.reshape(rows, h, w, patch, patch, -1)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(rows, -1, h * patch, w * patch)


def loop_latents(lens: Lens, model_input: torch.Tensor) -> torch.Tensor:
    """The latents ``(rows, C, h, w)`` of a denoiser input as the pipeline's loop passes it (Flux's packed
    tokens unpacked)."""
    if lens.family.pack > 1:
        return lens.family.unpack_latents(model_input, lens.token_grid)
    return model_input


class HeadInputs:
    """While open, keep what the head needs from each call of the denoiser: `embedding` (the step's
    timestep embedding ``(rows, D)``) and `latents` (the call's input ``(rows, C, h, w)``), each the latest
    call's, and `calls`, how many calls it has seen. `after` (if given) is called as ``after(output)`` with
    each call's output ``(rows, C, h, w)``.

    The hooks are plain torch hooks on the denoiser and its embedding module, removed on exit (also when
    the body raises).
    """

    def __init__(self, lens: Lens, after: Callable[[torch.Tensor], None] | None = None) -> None:
        self.lens, self.after = lens, after
        self.head = head_of(lens)
        self.embedding: torch.Tensor | None = None
        self.latents: torch.Tensor | None = None
        self.calls = 0  # calls of the denoiser seen so far
        self._handles: list = []

    def __enter__(self) -> "HeadInputs":
        denoiser = self.lens.denoiser
        index = self.head.index

        def before(_module: Any, args: tuple, kwargs: dict) -> None:
            model_input = args[0] if args else kwargs["hidden_states"]
            self.calls += 1
            self.latents = loop_latents(self.lens, model_input)

        def embedded(_module: Any, _inputs: Any, output: Any) -> None:
            self.embedding = output if index is None else output[index]

        def done(_module: Any, _inputs: Any, output: Any) -> None:
            if self.after is not None:
                sample = output[0] if isinstance(output, tuple) else output.sample
                self.after(loop_latents(self.lens, sample))

        try:
            self._handles.append(denoiser.register_forward_pre_hook(before, with_kwargs=True))
            self._handles.append(getattr(denoiser, self.head.embedding).register_forward_hook(embedded))
            self._handles.append(denoiser.register_forward_hook(done))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

