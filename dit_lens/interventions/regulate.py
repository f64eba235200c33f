"""Mask-guided attention regulation: put a pathology where you say while the anatomy stays.

`AttentionRegulation` is a set of modules, each of which switches off alone (for the ablation). With
``p`` the partition mask (the anatomy mask, or the region when none is given), ``M`` the anatomy mask,
``m`` the region and ``Ω`` the region blurred by `blur` tokens and divided by its maximum, all at the
token grid, and every reweighted row divided by its new sum so each query's weights stay a
distribution. The first four are the published design (its equations are this library's reading; no
reference code exists):

1. **Self-attention gating** (``attn1.weights``, every step, both guidance halves):
   ``S'[i, j] = S[i, j] · (p_i p_j + (1 − p_i)(1 − p_j))``: tokens inside the partition attend only
   inside it and tokens outside only outside, so structure interacts only within its region.
2. **Anatomy-word gating** (``attn2.weights``, every step, conditional half): for the tokens k of the
   anatomy words, ``A'[q, k] = A[q, k] · M(q)``: queries outside the anatomy stop reading them.
3. **Pathology enhancement** (``attn2.weights``, steps in `enhance_steps`, conditional half): for the
   tokens k of the pathology words, ``A'[q, k] = A[q, k] · (1 + η Ω(q))``, η = `enhance`.
4. **Latent correction** (before each step in `energy_steps`, on the edited branch): with ``A`` the
   cross-attention of the pathology tokens at the current latents z (mean over heads and `layers`,
   conditional prompt),

       L(z) = 1 − mean_k Σ_q A[q, k] Ω(q) / Σ_q A[q, k]     (how much of their attention falls outside Ω)
       z ← z − α_i ∇L / rms(∇L),   α_i = α_max (1 − i / n) for the i-th of the n corrected steps

   The gradient comes from one extra forward pass of the denoiser with gradients, on the edited rows
   only, which the traced run does not see; it reads the model's own (unregulated) attention, so the
   correction moves the latents until the model itself attends inside the region. Dividing by the
   gradient's root mean square makes α a step in units of the initial noise's standard deviation on
   any model (the source design does not say how its gradient is scaled). Its energy before each
   correction is recorded (``energy`` in results).

Modules 1–4 act on single words' tokens. A text encoder that mixes context into every token (T5, and
the embedded world's byte-level encoder) spreads a word's meaning over the whole prompt, so gating or
boosting the word's own tokens moves little; three region modules act on what the whole prompt says:

5. **Conditioning outside** (`condition_outside`, ``attn2`` output, every step): outside the region the
   edited branch's cross-attention output is the original branch's, ``h' = h_o + m (h − h_o)``: in a
   re-prompted pair, the edited branch hears its own prompt only inside the region.
6. **Contrast** (`contrast` c, ``attn2`` output, steps in `enhance_steps`): inside the region what the
   edited prompt changes is amplified, ``h' = h_o + m (1 + c)(h − h_o)``.
7. **Keeping the original outside** (`keep_outside`, latents, the first fraction of the steps): `Confine`.

Defaults are what placed lesions best on the embedded world (RESULTS.md): conditioning outside, contrast 2
and enhancement η = 1.5 in the first μ = 0.4 of the run; self-attention gating and the latent correction
off (on that world each lowered how often the lesion appears at all); anatomy words gated when given.
`AttentionRegulation.published` is modules 1–4 alone at the published settings (μ = 0.4, η = 1.5,
α_max = 0.05). Modules 5–7 need the original branch of the pair, which `generate` and `reprompt` run
beside it.

Examples:
    >>> import numpy as np
    >>> box = np.zeros((64, 64), bool); box[8:32, 8:32] = True
    >>> reg = AttentionRegulation(region=box, pathology_words=["polyps"])
    >>> [type(part).__name__ for part in reg.parts()]
    ['RegionReweight', 'RegionMix']
    >>> [type(p).__name__ for p in AttentionRegulation.published(box, pathology_words=["polyps"]).parts()]
    ['GateSelfAttention', 'RegionReweight', 'EnergyGuidance']
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Sequence

import torch

from ..model.lens import Lens
from ..model.tokens import check_words, word_keys
from ..validate import check_nonnegative
from .base import Composite, EditContext, Intervention, SiteEdit, check_where, register
from .guide import EnergyGuidance
from .region import Confine, MaskedValue, Region, check_window, window_steps

__all__ = ["AttentionRegulation", "EnergyGuidance", "GateSelfAttention", "RegionMix", "RegionReweight"]

def _renormalize(w: torch.Tensor) -> torch.Tensor:
    return w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


@register
@dataclass(frozen=True, eq=False)
class RegionReweight(MaskedValue, SiteEdit):
    """Scale the cross-attention that queries pay to words by where the queries are.

    ``A'[q, k] = A[q, k] · (outside + (inside − outside) · m(q))`` for the tokens k of `words`, then each
    query's weights are renormalised; ``m`` is the region at the token grid (blurred by `blur` tokens
    and max-normalised when `blur` > 0). ``inside = outside = 1`` is the identity.
    """

    words: tuple[str, ...] = ()
    region: Any = None
    inside: float = 1.0
    outside: float = 1.0
    blur: float = 0.0
    window: tuple[float, float] = (0.0, 1.0)
    layers: tuple[int, ...] | None = None
    halves: str = "cond"
    site: str = "attn2.weights"

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", check_words(self.words, "RegionReweight.words"))
        if not self.words:
            raise ValueError("RegionReweight.words is empty; name the words whose attention to reweight")
        object.__setattr__(self, "region", Region.of(self.region, "RegionReweight.region"))
        for attr in ("inside", "outside", "blur"):
            object.__setattr__(self, attr, check_nonnegative(getattr(self, attr), f"RegionReweight.{attr}"))
        object.__setattr__(self, "window", check_window(self.window, "RegionReweight.window"))
        layers, _ = check_where("RegionReweight", self.layers, None, self.halves)
        object.__setattr__(self, "layers", layers)

    @property
    def is_identity(self) -> bool:
        return self.inside == 1.0 and self.outside == 1.0

    def edit_steps(self, num_inference_steps: int) -> list[int]:
        return window_steps(self.window, num_inference_steps)

    def check(self, lens: Lens, num_inference_steps: int) -> None:
        self.region.check(lens, "RegionReweight.region")
        self.check_at(lens, num_inference_steps)

    def apply(self, h: torch.Tensor, ctx: EditContext | None) -> tuple[torch.Tensor, None]:
        if ctx is None:
            raise ValueError("RegionReweight runs only inside generate")
        grid = tuple(ctx.lens.token_grid)
        m = (self.region.focus(grid, ctx.seeds, self.blur, ctx.pairs) if self.blur > 0
             else self.region.tokens(grid, ctx.seeds, ctx.pairs))  # (pairs, queries)
        factor = torch.ones(ctx.pairs, h.shape[-2], h.shape[-1], dtype=h.dtype)  # (pairs, queries, keys)
        for i, keys in enumerate(word_keys(ctx.lens, ctx.prompts, self.words)):
            factor[i][:, keys] = (self.outside + (self.inside - self.outside) * m[i]).to(h.dtype)[:, None]
        factor = factor.repeat(len(ctx.halves), 1, 1).to(h.device)  # rows = halves × pairs
        return _renormalize(h * factor[:, None]), None


@register
@dataclass(frozen=True, eq=False)
class RegionMix(MaskedValue, SiteEdit):
    """Mix the edited branch's site output with the original branch's by region:

        h' = h_o + w(q) · (h − h_o),   w = outside · (1 − m) + m · (1 + contrast · [step in `window`])

    with ``h_o`` the original branch's output and m the region's share of each token. At the
    cross-attention output of a re-prompted pair, ``outside = 0`` is regional prompting (outside the
    region the edited branch hears the original's prompt) and ``contrast > 0`` amplifies, inside it,
    what the edited prompt changes. ``outside = 1, contrast = 0`` is the identity.
    """

    reads_original: ClassVar[bool] = True
    region: Any = None
    outside: float = 0.0
    contrast: float = 0.0
    window: tuple[float, float] = (0.0, 1.0)
    layers: tuple[int, ...] | None = None
    halves: str = "both"
    site: str = "attn2"

    def __post_init__(self) -> None:
        object.__setattr__(self, "region", Region.of(self.region, "RegionMix.region"))
        for attr in ("outside", "contrast"):
            object.__setattr__(self, attr, check_nonnegative(getattr(self, attr), f"RegionMix.{attr}"))
        if not isinstance(self.site, str) or self.site.endswith(".weights"):
            raise ValueError(f"RegionMix works at output sites (one value per image token), not {self.site!r}")
        object.__setattr__(self, "window", check_window(self.window, "RegionMix.window"))
        layers, _ = check_where("RegionMix", self.layers, None, self.halves)
        object.__setattr__(self, "layers", layers)

    @property
    def is_identity(self) -> bool:
        return self.outside == 1.0 and self.contrast == 0.0

    def edit_steps(self, num_inference_steps: int) -> list[int]:
        if self.outside != 1.0:
            return list(range(num_inference_steps))
        return window_steps(self.window, num_inference_steps)

    def check(self, lens: Lens, num_inference_steps: int) -> None:
        self.check_at(lens, num_inference_steps)
        self.region.check(lens, "RegionMix.region")

    def apply(self, h: torch.Tensor, ctx: EditContext | None) -> tuple[torch.Tensor, None]:
        if ctx is None or ctx.lens is None:
            raise ValueError("RegionMix reads the original branch and runs only inside generate or reprompt")
        m = self.region.tokens(tuple(ctx.lens.token_grid), ctx.seeds, ctx.pairs).to(h)  # (pairs, tokens)
        gain = 1 + self.contrast if ctx.step in window_steps(self.window, ctx.num_inference_steps) else 1.0
        w = (self.outside * (1 - m) + m * gain).repeat(len(ctx.halves), 1)[:, :, None]  # (rows, tokens, 1)
        original = ctx.original()
        return original + w * (h - original), None


@register
@dataclass(frozen=True, eq=False)
class GateSelfAttention(MaskedValue, SiteEdit):
    """Self-attention only within a partition: ``S'[i, j] = S[i, j] · (p_i p_j + (1 − p_i)(1 − p_j))``,
    rows renormalised, ``p`` the partition mask at the token grid."""

    partition: Any = None
    window: tuple[float, float] = (0.0, 1.0)
    layers: tuple[int, ...] | None = None
    halves: str = "both"
    site: str = "attn1.weights"

    def __post_init__(self) -> None:
        object.__setattr__(self, "partition", Region.of(self.partition, "GateSelfAttention.partition"))
        object.__setattr__(self, "window", check_window(self.window, "GateSelfAttention.window"))
        layers, _ = check_where("GateSelfAttention", self.layers, None, self.halves)
        object.__setattr__(self, "layers", layers)

    def edit_steps(self, num_inference_steps: int) -> list[int]:
        return window_steps(self.window, num_inference_steps)

    def check(self, lens: Lens, num_inference_steps: int) -> None:
        self.partition.check(lens, "GateSelfAttention.partition")
        self.check_at(lens, num_inference_steps)

    def apply(self, h: torch.Tensor, ctx: EditContext | None) -> tuple[torch.Tensor, None]:
        if ctx is None:
            raise ValueError("GateSelfAttention runs only inside generate")
        p = self.partition.tokens(tuple(ctx.lens.token_grid), ctx.seeds, ctx.pairs).to(h)  # (pairs, tokens)
        same = p[:, :, None] * p[:, None, :] + (1 - p)[:, :, None] * (1 - p)[:, None, :]  # (pairs, q, k)
        return _renormalize(h * same.repeat(len(ctx.halves), 1, 1)[:, None]), None


@register
@dataclass(frozen=True, eq=False)
class AttentionRegulation(MaskedValue, Composite):
    """Mask-guided attention regulation (see the module docstring for the equations).

    Attributes:
        region: Where the pathology goes / the edit acts (any mask `Region.of` takes: image or
            token-grid size, one mask or one per seed).
        anatomy_mask: The anatomy's mask (same forms); partitions self-attention and gates the anatomy
            words. ``None``: the region partitions self-attention and anatomy words are not gated.
        anatomy_words: Words of the prompt naming the anatomy.
        pathology_words: Words of the prompt naming the pathology (enhanced, and concentrated by the
            latent correction).
        gate_self_attention: Module 1 on/off.
        gate_anatomy_words: Module 2 on/off (needs `anatomy_words` and `anatomy_mask`).
        enhance: η of module 3 (0: off).
        enhance_steps: ``(start, end)`` fractions of the run where module 3 acts.
        energy_step: α_max of module 4 (0: off).
        energy_steps: ``(start, end)`` fractions of the run where module 4 corrects the latents.
        condition_outside: Module 5 on/off.
        contrast: c of module 6 (0: off).
        keep_outside: Module 7: the fraction of the run during which the original is kept outside (0: off).
        layers: Blocks whose attention is regulated and read by the energy (``None``: all).
        blur: Gaussian blur of Ω, in tokens.
    """

    region: Any = None
    anatomy_mask: Any = None
    anatomy_words: tuple[str, ...] = ()
    pathology_words: tuple[str, ...] = ()
    gate_self_attention: bool = False
    gate_anatomy_words: bool = True
    enhance: float = 1.5
    enhance_steps: tuple[float, float] = (0.0, 0.4)
    energy_step: float = 0.0
    energy_steps: tuple[float, float] = (0.0, 0.4)
    condition_outside: bool = True
    contrast: float = 2.0
    keep_outside: float = 0.0
    layers: tuple[int, ...] | None = None
    blur: float = 1.0

    def __post_init__(self) -> None:
        for attr in ("region", "anatomy_mask"):
            value = getattr(self, attr)
            object.__setattr__(self, attr, None if value is None else Region.of(value, f"AttentionRegulation.{attr}"))
        for attr in ("anatomy_words", "pathology_words"):
            object.__setattr__(self, attr, check_words(getattr(self, attr), f"AttentionRegulation.{attr}"))
        for attr in ("gate_self_attention", "gate_anatomy_words", "condition_outside"):
            if not isinstance(getattr(self, attr), bool):
                raise ValueError(f"AttentionRegulation.{attr} must be True or False, got {getattr(self, attr)!r}")
        for attr in ("enhance", "energy_step", "blur", "contrast", "keep_outside"):
            object.__setattr__(self, attr, check_nonnegative(getattr(self, attr), f"AttentionRegulation.{attr}"))
        for attr in ("enhance_steps", "energy_steps"):
            object.__setattr__(self, attr, check_window(getattr(self, attr), f"AttentionRegulation.{attr}"))
        layers, _ = check_where("AttentionRegulation", self.layers, None, "both")
        object.__setattr__(self, "layers", layers)
        if self.keep_outside > 1:
            raise ValueError(f"AttentionRegulation.keep_outside is a fraction of the run in [0, 1], got {self.keep_outside}")
        if (self.condition_outside or self.contrast > 0 or self.keep_outside > 0) and self.region is None:
            raise ValueError("condition_outside, contrast and keep_outside act by region; give a region, or switch "
                             "them off (condition_outside=False, contrast=0, keep_outside=0)")
        if (self.enhance > 0 or self.energy_step > 0) and (self.region is None or not self.pathology_words):
            raise ValueError("pathology enhancement (enhance > 0) and the latent correction (energy_step > 0) need a "
                             "region and pathology_words; give both, or set enhance=0 and energy_step=0")
        if self.gate_self_attention and self.anatomy_mask is None and self.region is None:
            raise ValueError("gate_self_attention needs an anatomy_mask or a region to partition the image by")
        if self.gate_anatomy_words and self.anatomy_words and self.anatomy_mask is None:
            raise ValueError("anatomy_words are gated by the anatomy_mask; give one, or gate_anatomy_words=False")

    def parts(self) -> list[Intervention]:
        out: list[Intervention] = []
        if self.gate_self_attention:
            out.append(GateSelfAttention(self.anatomy_mask or self.region, layers=self.layers))
        if self.gate_anatomy_words and self.anatomy_words:
            out.append(RegionReweight(self.anatomy_words, self.anatomy_mask, inside=1.0, outside=0.0, layers=self.layers))
        if self.enhance > 0:
            out.append(RegionReweight(self.pathology_words, self.region, inside=1 + self.enhance, outside=1.0,
                                      blur=self.blur, window=self.enhance_steps, layers=self.layers))
        if self.energy_step > 0:
            out.append(EnergyGuidance(self.pathology_words, self.region, step=self.energy_step,
                                      window=self.energy_steps, layers=self.layers, blur=self.blur))
        if self.condition_outside or self.contrast > 0:
            out.append(RegionMix(self.region, outside=0.0 if self.condition_outside else 1.0, contrast=self.contrast,
                                 window=self.enhance_steps, layers=self.layers))
        if self.keep_outside > 0:
            out.append(Confine(self.region, steps=(0.0, self.keep_outside)))
        return out

    @classmethod
    def published(cls, region: Any, *, anatomy_mask: Any = None, anatomy_words: Sequence[str] = (),
                  pathology_words: Sequence[str] = (), **changes: Any) -> "AttentionRegulation":
        """Modules 1–4 alone at the published settings: self-attention gating, anatomy-word gating, η = 1.5
        and α_max = 0.05 in the first 0.4 of the run; no region modules."""
        settings = dict(gate_self_attention=True, enhance=1.5, enhance_steps=(0.0, 0.4), energy_step=0.05,
                        energy_steps=(0.0, 0.4), condition_outside=False, contrast=0.0, keep_outside=0.0)
        return cls(region=region, anatomy_mask=anatomy_mask, anatomy_words=tuple(anatomy_words),
                   pathology_words=tuple(pathology_words), **{**settings, **changes})

    def without(self, *modules: str) -> "AttentionRegulation":
        """This regulation with modules switched off: ``"self"``, ``"anatomy"``, ``"enhance"``, ``"energy"``,
        ``"outside"`` (conditioning outside the region), ``"contrast"``, ``"keep"`` (keeping the original outside)."""
        off = {"self": {"gate_self_attention": False}, "anatomy": {"gate_anatomy_words": False},
               "enhance": {"enhance": 0.0}, "energy": {"energy_step": 0.0}, "outside": {"condition_outside": False},
               "contrast": {"contrast": 0.0}, "keep": {"keep_outside": 0.0}}
        unknown = [m for m in modules if m not in off]
        if unknown:
            raise ValueError(f"unknown modules {unknown}; choose from {list(off)}")
        return replace(self, **{k: v for m in modules for k, v in off[m].items()})

    def check(self, lens: Lens, num_inference_steps: int) -> None:
        for attr in ("region", "anatomy_mask"):
            if getattr(self, attr) is not None:
                getattr(self, attr).check(lens, f"AttentionRegulation.{attr}")
        super().check(lens, num_inference_steps)
