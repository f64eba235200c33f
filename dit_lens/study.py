"""Declarative studies: a concept pair, a grid of steering settings, seeds and metrics → a result.

A `Study` is a frozen value. `run_study` does the rest: captures for the vectors (reusing the capture
store), one vector per (pair, number of vector seeds), counterfactual pairs for every grid cell,
metrics with their n and bootstrap intervals, and a labelled `xarray.Dataset` whose dims are the grid
axes. Finished cells are kept as small JSON files, so a killed study resumes and a re-run reuses them.

Examples:
    >>> s = Study("demo", pairs=(ConceptPair("polyps", "normal cecum"),), alphas=(1.0, 2.5))
    >>> s.grid_shape()
    {'pair': 1, 'window': 1, 'alpha': 2, 'renormalize': 1, 'vector_seeds': 1}
    >>> ConceptPair("polyps", "normal cecum").source_prompt
    'An endoscopic image of polyps'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xarray as xr

from .world.procedural import CONTEXTS

__all__ = ["ConceptPair", "ENDOSCOPY_CONTEXTS", "Study", "run_study", "window_layers", "STEER_METRICS"]

#: Context phrasings varied across the contrastive prompts of a vector ("{}" is the label): the
#: phrasings the embedded world was trained with.
ENDOSCOPY_CONTEXTS = CONTEXTS

#: Metrics computed for every steered cell (and for each baseline).
STEER_METRICS = ("flip_rate", "confidence_shift", "bg_ssim", "bg_psnr", "bg_lpips")
DYE_METRICS = ("dye_detection_rate", "polyp_kept")


@dataclass(frozen=True)
class ConceptPair:
    """Remove `source` so the image reads as `target` (e.g. polyps → normal cecum).

    Attributes:
        source: Class label of the concept to remove (the prompt that is steered).
        target: Class label without it (the negative prompts, and the re-prompting baseline).
        contexts: Prompt templates varied when computing the vector ("{}" is the label).
        prompt: The template of the generation prompt.
    """

    source: str
    target: str
    contexts: tuple[str, ...] = ENDOSCOPY_CONTEXTS
    prompt: str = "An endoscopic image of {}"

    def __post_init__(self) -> None:
        if not self.source or not self.target or self.source == self.target:
            raise ValueError(f"a ConceptPair needs two different labels, got {self.source!r}, {self.target!r}")
        object.__setattr__(self, "contexts", tuple(self.contexts))
        for template in (*self.contexts, self.prompt):
            if template.count("{}") != 1:
                raise ValueError(f"prompt template {template!r} must contain exactly one '{{}}'")

    @property
    def name(self) -> str:
        return f"{self.source} → {self.target}"

    @property
    def source_prompt(self) -> str:
        return self.prompt.format(self.source)

    @property
    def target_prompt(self) -> str:
        return self.prompt.format(self.target)

    def positive(self) -> list[str]:
        return [c.format(self.source) for c in self.contexts]

    def negative(self) -> list[str]:
        return [c.format(self.target) for c in self.contexts]


@dataclass(frozen=True)
class Study:
    """A grid of steering settings over concept pairs, with seeds and what to measure.

    Attributes:
        name: Names the result folder.
        pairs: Concept pairs (a grid axis).
        windows: Layer windows as fractions of depth ``(start, stop)``; `window_layers` resolves
            them to blocks ``round(start·L) … round(stop·L) − 1`` (a grid axis).
        alphas: Steering strengths (a grid axis).
        renormalize: Update variants: False = paper, True = authors' renormalised (a grid axis).
        vector_seeds: Numbers of seeds per prompt for the vector (a grid axis); vectors for
            smaller counts use the first seeds of the largest capture.
        eval_seeds: Pairs generated per cell (seeds ``eval_seed_base + i``, disjoint from the
            vector seeds ``0 …``).
        baselines: ``("reprompt",)`` adds the re-prompting baseline for each pair.
        dye: Also measure dye detection rate and whether the polyp is kept.
        quick: Field overrides for ``--quick`` runs.
    """

    name: str
    pairs: tuple[ConceptPair, ...]
    windows: tuple[tuple[float, float], ...] = ((0.0, 1.0),)
    alphas: tuple[float, ...] = (2.5,)
    renormalize: tuple[bool, ...] = (False,)
    vector_seeds: tuple[int, ...] = (16,)
    eval_seeds: int = 32
    eval_seed_base: int = 10_000
    num_inference_steps: int = 20
    guidance_scale: float = 4.5
    baselines: tuple[str, ...] = ()
    dye: bool = False
    quick: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        tuples = ("pairs", "windows", "alphas", "renormalize", "vector_seeds", "baselines")
        for attr in tuples:
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        object.__setattr__(self, "windows", tuple(tuple(float(x) for x in w) for w in self.windows))
        if not self.name or "/" in self.name:
            raise ValueError(f"Study.name must be a plain non-empty name, got {self.name!r}")
        for attr in ("pairs", "windows", "alphas", "renormalize", "vector_seeds"):
            if not getattr(self, attr):
                raise ValueError(f"Study.{attr} must hold at least one value")
        for start, stop in self.windows:
            if not 0.0 <= start < stop <= 1.0:
                raise ValueError(f"Study.windows entries are fractions 0 <= start < stop <= 1, got {(start, stop)}")
        if any(not np.isfinite(a) for a in self.alphas):
            raise ValueError(f"Study.alphas must be finite, got {self.alphas}")
        if any(int(n) < 1 for n in self.vector_seeds) or self.eval_seeds < 1:
            raise ValueError("Study.vector_seeds and Study.eval_seeds must be >= 1")
        if self.eval_seed_base < max(self.vector_seeds):
            raise ValueError("Study.eval_seed_base must exceed the vector seeds, so they stay disjoint")
        if set(self.baselines) - {"reprompt"}:
            raise ValueError(f"unknown baselines {sorted(set(self.baselines) - {'reprompt'})}; known: ['reprompt']")
        if self.num_inference_steps < 1:
            raise ValueError("Study.num_inference_steps must be >= 1")
        unknown = set(self.quick) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"Study.quick overrides unknown fields {sorted(unknown)}")

    def replace(self, **changes: Any) -> "Study":
        return dataclasses.replace(self, **changes)

    def quick_version(self) -> "Study":
        return self.replace(**self.quick, name=f"{self.name}-quick")

    def grid_shape(self) -> dict:
        return {"pair": len(self.pairs), "window": len(self.windows), "alpha": len(self.alphas),
                "renormalize": len(self.renormalize), "vector_seeds": len(self.vector_seeds)}

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("quick")
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Study":
        data = dict(data)
        data["pairs"] = tuple(ConceptPair(**p) for p in data["pairs"])
        return cls(**data)

    def key(self, lens: Any) -> str:
        blob = json.dumps({"study": self.to_dict(), "model": lens.fingerprint}, sort_keys=True)
        return hashlib.blake2b(blob.encode(), digest_size=6).hexdigest()


def window_layers(window: tuple[float, float], num_layers: int) -> list[int]:
    """Blocks of a fractional window ``round(start·L) … round(stop·L) − 1``; never empty."""
    start = min(int(round(window[0] * num_layers)), num_layers - 1)
    stop = max(int(round(window[1] * num_layers)), start + 1)
    return list(range(start, min(stop, num_layers)))


def window_label(window: tuple[float, float]) -> str:
    return f"{window[0]:g}–{window[1]:g}"


def run_study(
    study: Study,
    lens: Any,
    *,
    oracle: Callable,
    segmenter: Callable,
    out: str | Path | None = None,
    progress: bool = True,
    keep_images: bool = True,
) -> xr.Dataset:
    """Run every cell of `study` not already finished in `out`, and return the labelled result.

    Returns:
        Dataset with dims ``(pair, window, alpha, renormalize, vector_seeds)`` (plus ``edit``
        when baselines are declared); for each metric the variables ``<metric>``, ``<metric>_low``,
        ``<metric>_high`` and ``<metric>_n``. Attrs: the declaration, provenance, the folder.
    """
    from .cells import CellRunner

    from .store import cache_root

    folder = Path(out) if out is not None else cache_root() / "studies" / f"{study.name}-{study.key(lens)}"
    runner = CellRunner(study, lens, oracle, segmenter, folder, progress=progress, keep_images=keep_images)
    runner.run()
    return runner.assemble()
