"""What `optimize_noise` maximises: an objective of the generated image, or of the prompted words' attention.

Two kinds, told apart by their ``reads`` attribute:

- **Image objectives** (``reads = "images"``, or any plain callable): images ``(N, 3, H, W)`` float in
  [0, 1] -> scores ``(N,)``. `class_probability` is the judge's log-probability of a class. The whole
  run and the decode are differentiated.
- **Attention objectives** (``reads = "attention"``): `attention_concentration` scores how concentrated
  the prompted words' cross-attention is in the first steps of the run. The differentiable run stops at
  the last step the objective reads (5 of 20 transformer calls for its default window, and no decode),
  so it costs a fraction of an image objective, and it needs no judge: the image is never scored by the
  classifier that later reads it.

For word k, the attention over image tokens q is a distribution p_k(q) = A_k(q) / Σ_q A_k(q), where A_k
is the word's map as `dit_lens.attention_maps` makes it (cross-attention weights of the conditional half
of classifier-free guidance, averaged over heads, summed over the word's tokens), averaged over the
objective's layers and read steps. Concentration is

- without a region, 1 − H(p_k) / log Q: 0 for attention spread evenly over the Q image tokens, 1 for all
  of it on one token;
- with a region Ω (blurred, peak 1, as attention regulation's energy makes it), Σ_q p_k(q) Ω(q): the
  share of the word's attention inside the region, 1 − L_path of `dit_lens.EnergyGuidance`;

averaged over the words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import math

import torch

from ..model.lens import Lens
from ..model.tokens import check_words
from ..interventions.base import check_where
from ..interventions.region import as_region, check_window, window_steps
from ..sampling.loop import frozen
from ..validate import check_nonnegative

__all__ = ["AttentionConcentration", "ClassProbability", "attention_concentration", "class_probability"]


@dataclass(frozen=True, eq=False)
class ClassProbability:
    """The judge's log-probability (or probability) of `label` for each image: an objective to maximise.

    Log-probability by default: its gradient does not vanish where the probability is near 0, which is
    where a seed needs it. Images ``(N, 3, H, W)`` in [0, 1] are read as ``Oracle.__call__`` reads them.
    """

    reads: ClassVar[str] = "images"
    oracle: Any
    label: str
    log: bool = True

    def __post_init__(self) -> None:
        if not isinstance(getattr(self.oracle, "net", None), torch.nn.Module) or not hasattr(self.oracle, "labels"):
            raise ValueError(f"class_probability needs a judge with a torch module .net and .labels, such as "
                             f"dit_lens.load_oracle(); got {type(self.oracle).__name__}")
        if self.label not in tuple(self.oracle.labels):
            raise ValueError(f"{self.label!r} is not a class of the oracle; choose one of {list(self.oracle.labels)}")
        if not isinstance(self.log, bool):
            raise ValueError(f"class_probability log must be True (log-probability) or False, got {self.log!r}")

    @property
    def name(self) -> str:
        judge = getattr(self.oracle, "fingerprint", "")[:12]
        return f"class_probability({self.label!r}, log={self.log}{f', oracle={judge}' if judge else ''})"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with frozen([self.oracle.net]):  # eval mode, and no graph through the judge's own weights
            logits = self.oracle.net(images * 2 - 1)  # (N, classes); the oracle reads [-1, 1]
        scores = torch.log_softmax(logits, dim=1)[:, list(self.oracle.labels).index(self.label)]
        return scores if self.log else scores.exp()


def class_probability(oracle: Any, label: str, *, log: bool = True) -> ClassProbability:
    """An objective: `oracle`'s log-probability of `label` (its probability with ``log=False``)."""
    return ClassProbability(oracle, label, log)


@dataclass(frozen=True, eq=False)
class AttentionConcentration:
    """How concentrated the cross-attention of `words` is in the steps of `window` (module docstring).

    Attributes:
        words: Words of the prompt whose attention is read (all their tokens).
        region: Where the attention should be (a pixel or token-grid mask, one per seed as a DataArray
            with a ``seed`` dim); None: concentration anywhere (negative normalised entropy).
        window: ``(start, end)`` fractions of the run whose steps are read; the run stops after them.
        layers: Blocks whose attention is averaged (None: all).
        blur: Gaussian blur of the region in tokens (as `dit_lens.EnergyGuidance`).
    """

    reads: ClassVar[str] = "attention"
    words: tuple[str, ...] = ()
    region: Any = None
    window: tuple[float, float] = (0.0, 0.25)
    layers: tuple[int, ...] | None = None
    blur: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", check_words(self.words, "attention_concentration words"))
        if not self.words:
            raise ValueError("attention_concentration needs words: the prompted words whose attention to "
                             "concentrate, e.g. words=('esophagitis',)")
        object.__setattr__(self, "region", as_region(self.region, "attention_concentration region"))
        object.__setattr__(self, "window", check_window(self.window, "attention_concentration window"))
        layers, _ = check_where("attention_concentration", self.layers, None, "both")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "blur", check_nonnegative(self.blur, "attention_concentration blur"))

    @property
    def name(self) -> str:
        where = "anywhere" if self.region is None else f"region={self.region.digest[:12]}"
        layers = "all" if self.layers is None else list(self.layers)
        return (f"attention_concentration({list(self.words)}, {where}, window={list(self.window)}, "
                f"layers={layers})")

    def read_steps(self, steps: int) -> list[int]:
        """The steps of a run of `steps` steps whose attention is read (never empty)."""
        read = window_steps(self.window, steps)
        if not read:
            raise ValueError(f"attention_concentration window {self.window} holds no step of a {steps}-step run; "
                             f"widen it (a step i is read when start <= i / steps < end)")
        return read

    def read_layers(self, lens: Lens) -> list[int]:
        layers = list(range(lens.num_layers)) if self.layers is None else list(self.layers)
        bad = [layer for layer in layers if not 0 <= layer < lens.num_layers]
        if bad:
            raise ValueError(f"attention_concentration layers {bad} are not blocks of this model "
                             f"(it has {lens.num_layers}: 0 … {lens.num_layers - 1})")
        if self.region is not None:
            self.region.check(lens, "attention_concentration region")
        return layers

    def score(self, attention: torch.Tensor, *, seeds: Sequence[int], grid: tuple[int, int]) -> torch.Tensor:
        """Scores ``(m,)`` from the words' maps ``attention (m, reads, queries, words)`` (one read per step
        and layer)."""
        a = attention.double().mean(1)  # (m, queries, words); float64: 1 − H / log Q cancels near uniform
        p = a / a.sum(1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)  # a distribution over queries
        if self.region is None:
            entropy = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(1)  # (m, words)
            per_word = 1 - entropy / math.log(p.shape[1])
        else:
            omega = self.region.focus(tuple(grid), list(seeds), self.blur).to(p)  # (m, queries)
            per_word = (p * omega[:, :, None]).sum(1)
        return per_word.mean(1)


def attention_concentration(words: Sequence[str] | str, *, region: Any = None, window: tuple[float, float] = (0.0, 0.25),
                            layers: Sequence[int] | None = None, blur: float = 1.0) -> AttentionConcentration:
    """An objective: how concentrated the cross-attention of `words` is early in the run (module docstring)."""
    words = (words,) if isinstance(words, str) else tuple(words)
    return AttentionConcentration(words, region, window, None if layers is None else tuple(layers), blur)

