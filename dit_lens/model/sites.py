"""Site tables: where, in each DiT family, the activations dit-lens reads and edits live.

A *site* is an abstract name for one activation inside a transformer block ("attn2" is the
cross-attention output). Each supported denoiser class maps site names to module paths relative to
the block, so supporting a new DiT family is one `Family` entry in `FAMILIES`, never string hacks
spread through the code.

Examples:
    >>> family = FAMILIES["PixArtTransformer2DModel"]
    >>> family.site_path("attn2", layer=3)
    'transformer.transformer_blocks.3.attn2'
    >>> family.site_path("block", layer=0)
    'transformer.transformer_blocks.0'
    >>> family.site_path("attn2.weights", layer=1)  # softmax weights, through dit-lens' processor
    'transformer.transformer_blocks.1.attn2.processor.weights'
    >>> family.attention_of("attn2.weights"), family.attention_of("ff")
    ('attn2', None)
    >>> family.site_path("attn2.heads", layer=1)  # per-head output: the input of the output projection
    'transformer.transformer_blocks.1.attn2.to_out.0'
    >>> family.heads_of("attn2.heads"), family.heads_of("attn2")
    ('attn2', None)
    >>> flux = FAMILIES["FluxTransformer2DModel"]  # 19 double-stream blocks, then the single-stream ones
    >>> flux.site_path("attn2", layer=20, split=19)
    'transformer.single_transformer_blocks.1.attn'
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["Family", "FAMILIES", "family_of", "site_module", "supported"]


@dataclass(frozen=True)
class Family:
    """How one denoiser class is laid out.

    Attributes:
        name: The denoiser class name (``type(pipeline.transformer).__name__``).
        denoiser: The pipeline component that holds the denoiser.
        blocks: Attribute of the denoiser holding the ``nn.ModuleList`` of transformer blocks.
        sites: Site name -> path of the module *inside one block* whose output is the site
            ("" is the block itself).
        cross_attention_site: The site whose output carries the text conditioning.
        attention_sites: Sites that are diffusers ``Attention`` modules (softmax attention); each also has a
            weights site ``"<site>.weights"``, the softmax attention weights ``(rows, heads, queries, keys)``
            that `dit_lens.trace.attention` exposes while a run reads or edits them, and, where the module
            has its own output projection (`projection`), a heads site ``"<site>.heads"``.
        projection: The module inside an attention site whose *input* is the attention's per-head output,
            concatenated over heads: the heads site ``"<site>.heads"``, ``(rows, tokens, heads · head_dim)``
            like any output site, head h in channels ``h·head_dim … (h+1)·head_dim − 1``, before the heads
            are mixed (image tokens only, for joint attention). ``None``: no such module (Flux's single-stream
            attention, whose heads enter the block's projection together with its MLP), so no heads sites.
            SANA's linear self-attention ``attn1`` is no attention site, so it has none either.
        order: Every site in the order a block runs them (nnsight visits sites in execution
            order; weights and heads sites run inside their attention module, so before its output).
        adapter_targets: Fine-tuning scheme -> the peft ``target_modules`` regex (matched against
            module names inside the denoiser) of the layers a LoRA of that scheme adapts
            (`dit_lens.finetune`; a family without an entry cannot be fine-tuned with that scheme).
        sampling: ``"ddpm"`` (a noise schedule of alphas: DDIM inversion, PnP and h-Edit apply) or
            ``"flow"`` (flow matching, velocity prediction).
        noise_dtype: The dtype the pipeline draws its initial noise in (``None``: the text
            embeddings'; SANA always draws it in float32).
        call_kwargs: Arguments every pipeline call of the family gets besides dit-lens' own.
        outputs: Site -> which element of its module's tuple output is the site, for modules that
            return several streams (SD3's joint attention returns ``(image, text)``, its blocks
            ``(text, image)``); other sites' modules return the tensor itself.
        grid_sites: Sites whose module returns the token grid as an image ``(rows, C, h, w)`` (SANA's
            convolutional feed-forward); they are read and written as ``(rows, tokens, C)`` like the rest.
        processor: Which processor of `dit_lens.trace.attention` exposes the attention weights: ``"cross"``
            (`WeightsProcessor`, diffusers' ``Attention``), ``"joint"`` (SD3's joint attention over image and
            text tokens: the image-query × text-key block of its softmax, `JointWeightsProcessor`) or ``"flux"``
            (Flux's rotary joint attention, text tokens first, `FluxWeightsProcessor`).
        text_segments: The text keys of that attention, in order: ``(tokenizer component, length)``
            per text encoder's run of tokens, the length being the tokenizer's ``"model_max_length"``
            (CLIP's 77) or the pipeline's ``"max_sequence_length"`` (T5, Gemma).
        guidance: ``"cfg"`` (classifier-free guidance above scale 1: an unconditional batch runs first) or
            ``"distilled"`` (the scale is an input of the transformer; every row is conditional, as in Flux).
        pack: Latent patches per side the *pipeline* packs into one token before the transformer (Flux: 2,
            so the token grid is the latent grid halved although the transformer's ``patch_size`` is 1).
        sequence_sites: Sites whose module output is one sequence ``[text tokens; image tokens]`` (Flux's
            single-stream attention); the site is its image tokens, the text tokens are passed on untouched.
        linear_sigmas: The pipeline sets its flow sampler's noise levels to ``linspace(1, 1/T, T)`` (Flux), not
            to the sampler's own default.
        single: The layout of a second list of blocks the denoiser runs after `blocks` (Flux's
            single-stream blocks). dit-lens numbers all blocks as one stack, this family's first: block
            ``len(blocks) + i`` is the second list's block i (`part`). A site may exist in one list only.
        label: What users call the family (in messages and provenance).
    """

    name: str
    denoiser: str
    blocks: str
    sites: Mapping[str, str]
    cross_attention_site: str = "attn2"
    attention_sites: tuple[str, ...] = ()
    projection: str | None = "to_out.0"
    order: tuple[str, ...] = ()
    adapter_targets: Mapping[str, str] = field(default_factory=dict)
    sampling: str = "ddpm"
    noise_dtype: str | None = None
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    outputs: Mapping[str, int] = field(default_factory=dict)
    grid_sites: tuple[str, ...] = ()
    processor: str = "cross"
    text_segments: tuple[tuple[str, str], ...] = (("tokenizer", "max_sequence_length"),)
    guidance: str = "cfg"
    pack: int = 1
    sequence_sites: tuple[str, ...] = ()
    linear_sigmas: bool = False
    single: "Family | None" = None
    label: str = ""

    def __post_init__(self) -> None:
        if self.sampling not in ("ddpm", "flow"):
            raise ValueError(f"Family {self.name}: sampling must be 'ddpm' or 'flow', got {self.sampling!r}")
        if self.guidance not in ("cfg", "distilled"):
            raise ValueError(f"Family {self.name}: guidance must be 'cfg' or 'distilled', got {self.guidance!r}")
        if self.processor not in ("cross", "joint", "flux"):
            raise ValueError(f"Family {self.name}: processor must be 'cross', 'joint' or 'flux', got {self.processor!r}")
        sites = dict(self.sites)
        for site in self.attention_sites:
            inner = sites[site]
            sites[f"{site}.weights"] = f"{inner}.processor.weights" if inner else "processor.weights"
            if self.projection is not None:
                sites[f"{site}.heads"] = f"{inner}.{self.projection}" if inner else self.projection
        object.__setattr__(self, "sites", MappingProxyType(sites))
        if set(self.order) != set(sites):
            raise ValueError(f"Family {self.name}: order must list every site once, got {self.order} for {sorted(sites)}")

    def needs(self, what: str, sampling: str = "ddpm") -> None:
        """Refuse `what` (a method or step, in words) on a family that does not sample by `sampling`."""
        if self.sampling != sampling:
            raise ValueError(f"{what} needs a {'noise-schedule (DDPM/DDIM)' if sampling == 'ddpm' else 'flow-matching'} "
                             f"sampler; {self.label or self.name} samples by "
                             f"{'flow matching' if self.sampling == 'flow' else 'a noise schedule'}, where it does not apply")

    @property
    def cfg(self) -> bool:
        """Whether a guidance scale above 1 runs an unconditional batch (rows: unconditional, then conditional)."""
        return self.guidance == "cfg"

    @property
    def every_site(self) -> tuple[str, ...]:
        """The sites of every block list, this one's first."""
        extra = () if self.single is None else tuple(s for s in self.single.order if s not in self.sites)
        return tuple(self.order) + extra

    def pack_latents(self, latents: Any) -> Any:
        """Latents ``(rows, C, h, w)`` as the pipeline's loop holds them: for a family that packs p×p patches
        (Flux), ``(rows, h/p · w/p, C·p·p)`` as the pipeline packs them; else unchanged."""
        p = self.pack
        if p == 1:
            return latents
        rows, channels, h, w = latents.shape
        patches = latents.reshape(rows, channels, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(rows, (h // p) * (w // p), channels * p * p)

    def unpack_latents(self, latents: Any, grid: tuple[int, int]) -> Any:
        """The inverse of `pack_latents`: ``(rows, C, h, w)`` from the loop's latents on a token `grid`."""
        p = self.pack
        if p == 1:
            return latents
        rows, _, packed = latents.shape
        patches = latents.reshape(rows, grid[0], grid[1], packed // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
        return patches.reshape(rows, packed // (p * p), grid[0] * p, grid[1] * p)

    def part(self, layer: int, split: int) -> tuple["Family", int]:
        """The layout of block `layer` and its index in its own list, on a denoiser whose first list holds
        `split` blocks."""
        if self.single is None or layer < split:
            return self, layer
        return self.single, layer - split

    def read(self, site: str, output: Any, text: int = 0) -> Any:
        """The site's tensor ``(rows, tokens, C)`` in its module's output (`text`: how many text tokens come
        first in a `sequence_sites` output)."""
        index = self.outputs.get(site)
        tensor = output if index is None else output[index]
        if site in self.grid_sites:  # (rows, C, h, w) -> (rows, h·w, C), tokens in row-major order
            tensor = tensor.flatten(2).transpose(1, 2)
        if site in self.sequence_sites:
            tensor = tensor[:, text:]
        return tensor

    def write(self, site: str, output: Any, value: Any, text: int = 0) -> Any:
        """The module's output with the site's tensor replaced by `value` ``(rows, tokens, C)`` (other streams
        and the text tokens of a sequence kept, laid out as the module returns it)."""
        import torch

        index = self.outputs.get(site)
        like = output if index is None else output[index]
        if site in self.grid_sites:
            value = value.transpose(1, 2).reshape(like.shape)
        if site in self.sequence_sites:
            value = torch.cat([like[:, :text], value.to(like.dtype)], dim=1)
        if index is None:
            return value
        return tuple(value if i == index else part for i, part in enumerate(output))

    def attention_of(self, site: str) -> str | None:
        """The attention site whose processor a weights site needs (``None`` for other sites)."""
        if site.endswith(".weights") and site[: -len(".weights")] in self.attention_sites:
            return site[: -len(".weights")]
        return None

    def heads_of(self, site: str) -> str | None:
        """The attention site whose per-head output a heads site is (``None`` for other sites). A heads site is
        read from, and written to, its module's *input*."""
        if site.endswith(".heads") and site in self.sites:
            return site[: -len(".heads")]
        return None

    def rank(self, site: str) -> int:
        """Position of `site` in a block's execution order (of the list that has it)."""
        if site not in self.every_site:
            raise ValueError(f"unknown site {site!r} for {self.name}; choose one of {sorted(self.every_site)}")
        return self.order.index(site) if site in self.sites else self.single.order.index(site)

    def check_site(self, site: str, layer: int, split: int) -> None:
        """Refuse `site` at block `layer` where that block has no such site (a site of the other list)."""
        part, _ = self.part(layer, split)
        if site in part.sites:
            return
        if site not in self.every_site:
            raise ValueError(f"unknown site {site!r} for {self.name}; choose one of {sorted(self.every_site)}")
        other = self.single if part is self else self
        where = f"blocks {split} and on" if other is self.single else f"blocks 0..{split - 1}"
        raise ValueError(f"block {layer} of {self.label or self.name} is one of its {part.blocks}, whose sites are "
                         f"{sorted(part.sites)}; {site!r} exists in its {other.blocks} ({where})")

    def site_path(self, site: str, layer: int, split: int | None = None) -> str:
        """Dotted path, from the pipeline, of `site` in block `layer` (`split`: blocks in the first list,
        needed only for families with a `single` list)."""
        if self.single is not None and split is None:
            raise ValueError(f"{self.name} has two block lists: pass split=len(denoiser.{self.blocks})")
        part, index = self.part(layer, split or 0)
        self.check_site(site, layer, split or 0)
        inner = part.sites[site]
        path = f"{self.denoiser}.{part.blocks}.{index}"
        return f"{path}.{inner}" if inner else path


_PIXART = Family(
    name="PixArtTransformer2DModel",
    label="PixArt-alpha / PixArt-Sigma",
    denoiser="transformer",
    blocks="transformer_blocks",
    sites=MappingProxyType({"attn1": "attn1", "attn2": "attn2", "ff": "ff", "block": ""}),
    attention_sites=("attn1", "attn2"),
    order=("attn1.weights", "attn1.heads", "attn1", "attn2.weights", "attn2.heads", "attn2", "ff", "block"),
    adapter_targets=MappingProxyType({
        # attention, feed-forward and projection layers of every block, the caption projection and the output
        "lora": r".*\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*\.ff\.net\.(0\.proj|2)|proj_out|"
                r"caption_projection\.linear_[12]",
        "attn2": r".*\.attn2\.(to_q|to_k|to_v|to_out\.0)",  # cross-attention only
    }),
)

_SANA = Family(
    name="SanaTransformer2DModel",
    label="SANA",
    denoiser="transformer",
    blocks="transformer_blocks",
    # attn1 is linear attention (ReLU kernels, no softmax weights to expose); the feed-forward is a
    # convolution over the token grid whose output is (rows, C, h, w)
    sites=MappingProxyType({"attn1": "attn1", "attn2": "attn2", "ff": "ff", "block": ""}),
    attention_sites=("attn2",),
    grid_sites=("ff",),
    order=("attn1", "attn2.weights", "attn2.heads", "attn2", "ff", "block"),
    sampling="flow",
    noise_dtype="float32",
    # the prompt as given: SANA's default "complex human instruction" prefix would move every word's
    # text tokens (and is text a user did not write)
    call_kwargs=MappingProxyType({"complex_human_instruction": None}),
)

_SD3 = Family(
    name="SD3Transformer2DModel",
    label="Stable Diffusion 3",
    denoiser="transformer",
    blocks="transformer_blocks",
    # no separate cross-attention: the module `attn` is the joint attention over image and text tokens,
    # and its image stream (element 0 of its output) is where the text conditions the image, so it is
    # the site `attn2` (dit-lens' name for the text-conditioning attention), its image-query × text-key
    # softmax block `attn2.weights`; there is no separate self-attention site. A block returns
    # (text stream, image stream)
    sites=MappingProxyType({"attn2": "attn", "ff": "ff", "block": ""}),
    attention_sites=("attn2",),
    outputs=MappingProxyType({"attn2": 0, "block": 1}),
    order=("attn2.weights", "attn2.heads", "attn2", "ff", "block"),
    sampling="flow",
    processor="joint",
    # CLIP-L and CLIP-G tokens side by side in channels (77 keys), then the T5 tokens
    text_segments=(("tokenizer", "model_max_length"), ("tokenizer_3", "max_sequence_length")),
)

_FLUX_SINGLE = Family(
    name="FluxTransformer2DModel",
    label="Flux single-stream blocks",
    denoiser="transformer",
    blocks="single_transformer_blocks",
    # one sequence [text; image] through one attention and a parallel MLP: the attention module's output is
    # that whole sequence, its image tokens the site attn2 (there is no separate feed-forward output)
    sites=MappingProxyType({"attn2": "attn", "block": ""}),
    attention_sites=("attn2",),
    outputs=MappingProxyType({"block": 1}),
    sequence_sites=("attn2",),
    projection=None,  # the heads go into the block's proj_out together with the MLP's output
    order=("attn2.weights", "attn2", "block"),
)

#: Flux's double-stream blocks are laid out as SD3's (a joint attention `attn` returning (image, text), blocks
#: returning (text, image)); its single-stream blocks follow them (`single`)
_FLUX = replace(
    _SD3,
    name="FluxTransformer2DModel",
    label="Flux",
    processor="flux",
    guidance="distilled",
    pack=2,
    linear_sigmas=True,
    # the image attends to the T5 tokens only (CLIP's pooled output conditions the blocks' modulation)
    text_segments=(("tokenizer_2", "max_sequence_length"),),
    single=_FLUX_SINGLE,
)

#: Denoiser class name -> layout. PixArt-alpha and PixArt-Sigma share one denoiser class.
FAMILIES: Mapping[str, Family] = MappingProxyType({f.name: f for f in (_PIXART, _SANA, _SD3, _FLUX)})


def supported() -> str:
    """The supported denoiser classes, with what users call them, in words."""
    return ", ".join(f"{f.name} ({f.label})" if f.label else f.name for f in FAMILIES.values())


def family_of(pipeline: Any) -> Family:
    """The `Family` of a diffusers pipeline's denoiser.

    Raises:
        TypeError: the pipeline has no denoiser of a supported cross-attention DiT family.
    """
    for component_name in ("transformer", "unet", "prior"):
        denoiser = getattr(pipeline, component_name, None)
        if denoiser is not None:
            break
    else:
        raise TypeError(
            f"{type(pipeline).__name__} has no `transformer` component; dit-lens needs a pipeline "
            f"whose denoiser is a supported DiT: {supported()}"
        )
    name = type(denoiser).__name__
    if name not in FAMILIES:
        raise TypeError(
            f"the denoiser of {type(pipeline).__name__} is a {name}, which is not a supported "
            f"DiT; supported: {supported()}. Add a `Family` entry to "
            f"dit_lens.model.sites.FAMILIES to support it."
        )
    family = FAMILIES[name]
    blocks = getattr(denoiser, family.blocks)
    site = family.sites[family.cross_attention_site]
    if not len(blocks) or any(getattr(b, site, None) is None for b in blocks):
        raise TypeError(
            f"the {name} in this pipeline has no cross-attention ({family.cross_attention_site} is "
            f"missing); dit-lens steers text-conditioned DiTs built with `cross_attention_dim`"
        )
    return family


def site_module(root: Any, family: Family, site: str, layer: int, split: int | None = None) -> Any:
    """Resolve `site` of block `layer` on `root` (a pipeline, or an nnsight model of one; `split` as in
    `Family.site_path`).

    Works on anything that exposes the pipeline's components as attributes, so the same call gives
    the raw ``torch.nn.Module`` on a pipeline and the envoy on an nnsight ``DiffusionModel``.
    """
    node = root
    for part in family.site_path(site, layer, split).split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node
