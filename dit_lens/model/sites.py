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
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
        attention_sites: Sites that are diffusers ``Attention`` modules; each also has a weights
            site ``"<site>.weights"``, the softmax attention weights ``(rows, heads, queries, keys)``
            that `dit_lens.trace.attention` exposes while a run reads or edits them.
        order: Every site in the order a block runs them (nnsight visits sites in execution
            order; a weights site runs inside its attention module, so before its output).
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
        joint: The text-conditioning attention is joint attention over image and text tokens (SD3): its
            weights site is the image-query × text-key block of the joint softmax
            (`dit_lens.trace.attention.JointWeightsProcessor`).
        text_segments: The text keys of that attention, in order: ``(tokenizer component, length)``
            per text encoder's run of tokens, the length being the tokenizer's ``"model_max_length"``
            (CLIP's 77) or the pipeline's ``"max_sequence_length"`` (T5, Gemma).
        label: What users call the family (in messages and provenance).
    """

    name: str
    denoiser: str
    blocks: str
    sites: Mapping[str, str]
    cross_attention_site: str = "attn2"
    attention_sites: tuple[str, ...] = ()
    order: tuple[str, ...] = ()
    adapter_targets: Mapping[str, str] = field(default_factory=dict)
    sampling: str = "ddpm"
    noise_dtype: str | None = None
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    outputs: Mapping[str, int] = field(default_factory=dict)
    grid_sites: tuple[str, ...] = ()
    joint: bool = False
    text_segments: tuple[tuple[str, str], ...] = (("tokenizer", "max_sequence_length"),)
    label: str = ""

    def __post_init__(self) -> None:
        if self.sampling not in ("ddpm", "flow"):
            raise ValueError(f"Family {self.name}: sampling must be 'ddpm' or 'flow', got {self.sampling!r}")
        sites = dict(self.sites)
        for site in self.attention_sites:
            inner = sites[site]
            sites[f"{site}.weights"] = f"{inner}.processor.weights" if inner else "processor.weights"
        object.__setattr__(self, "sites", MappingProxyType(sites))
        if set(self.order) != set(sites):
            raise ValueError(f"Family {self.name}: order must list every site once, got {self.order} for {sorted(sites)}")

    def needs(self, what: str, sampling: str = "ddpm") -> None:
        """Refuse `what` (a method or step, in words) on a family that does not sample by `sampling`."""
        if self.sampling != sampling:
            raise ValueError(f"{what} needs a {'noise-schedule (DDPM/DDIM)' if sampling == 'ddpm' else 'flow-matching'} "
                             f"sampler; {self.label or self.name} samples by "
                             f"{'flow matching' if self.sampling == 'flow' else 'a noise schedule'}, where it does not apply")

    def read(self, site: str, output: Any) -> Any:
        """The site's tensor ``(rows, tokens, C)`` in its module's output."""
        index = self.outputs.get(site)
        tensor = output if index is None else output[index]
        if site in self.grid_sites:  # (rows, C, h, w) -> (rows, h·w, C), tokens in row-major order
            tensor = tensor.flatten(2).transpose(1, 2)
        return tensor

    def write(self, site: str, output: Any, value: Any) -> Any:
        """The module's output with the site's tensor replaced by `value` ``(rows, tokens, C)`` (other streams
        kept, laid out as the module returns it)."""
        index = self.outputs.get(site)
        if site in self.grid_sites:
            like = output if index is None else output[index]
            value = value.transpose(1, 2).reshape(like.shape)
        if index is None:
            return value
        return tuple(value if i == index else part for i, part in enumerate(output))

    def attention_of(self, site: str) -> str | None:
        """The attention site whose processor a weights site needs (``None`` for other sites)."""
        if site.endswith(".weights") and site[: -len(".weights")] in self.attention_sites:
            return site[: -len(".weights")]
        return None

    def rank(self, site: str) -> int:
        """Position of `site` in a block's execution order."""
        if site not in self.sites:
            raise ValueError(f"unknown site {site!r} for {self.name}; choose one of {sorted(self.sites)}")
        return self.order.index(site)

    def site_path(self, site: str, layer: int) -> str:
        """Dotted path, from the pipeline, of `site` in block `layer`."""
        if site not in self.sites:
            raise ValueError(
                f"unknown site {site!r} for {self.name}; choose one of {sorted(self.sites)}"
            )
        inner = self.sites[site]
        path = f"{self.denoiser}.{self.blocks}.{layer}"
        return f"{path}.{inner}" if inner else path


_PIXART = Family(
    name="PixArtTransformer2DModel",
    label="PixArt-alpha / PixArt-Sigma",
    denoiser="transformer",
    blocks="transformer_blocks",
    sites=MappingProxyType({"attn1": "attn1", "attn2": "attn2", "ff": "ff", "block": ""}),
    attention_sites=("attn1", "attn2"),
    order=("attn1.weights", "attn1", "attn2.weights", "attn2", "ff", "block"),
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
    order=("attn1", "attn2.weights", "attn2", "ff", "block"),
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
    order=("attn2.weights", "attn2", "ff", "block"),
    sampling="flow",
    joint=True,
    # CLIP-L and CLIP-G tokens side by side in channels (77 keys), then the T5 tokens
    text_segments=(("tokenizer", "model_max_length"), ("tokenizer_3", "max_sequence_length")),
)

#: Denoiser class name -> layout. PixArt-alpha and PixArt-Sigma share one denoiser class.
FAMILIES: Mapping[str, Family] = MappingProxyType({f.name: f for f in (_PIXART, _SANA, _SD3)})


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


def site_module(root: Any, family: Family, site: str, layer: int) -> Any:
    """Resolve `site` of block `layer` on `root` (a pipeline, or an nnsight model of one).

    Works on anything that exposes the pipeline's components as attributes, so the same call gives
    the raw ``torch.nn.Module`` on a pipeline and the envoy on an nnsight ``DiffusionModel``.
    """
    node = root
    for part in family.site_path(site, layer).split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node
