"""Declarative studies: a concept pair, a grid of steering settings, seeds and metrics → a result.

A `Study` is a frozen value. `run_study` does the rest: captures for the vectors (reusing the capture
store), one vector per (pair, number of vector seeds), counterfactual pairs for every grid cell,
metrics with their n and bootstrap intervals, and a labelled `xarray.Dataset` whose dims are the grid
axes. Finished cells are kept as small JSON files, so a killed study resumes, a re-run reuses them, and
a widened grid (another α, window or baseline) computes only its new cells.

Examples:
    >>> s = Study("demo", pairs=(ConceptPair("polyps", "normal cecum"),), alphas=(1.0, 2.5))
    >>> s.grid_shape()
    {'pair': 1, 'window': 1, 'steps': 1, 'alpha': 2, 'renormalize': 1, 'blend': 1, 'vector_seeds': 1}
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

from ..interventions.blend import check_blend
from ..world.procedural import CONTEXTS

__all__ = ["ConceptPair", "ENDOSCOPY_CONTEXTS", "Study", "run_study", "window_layers", "window_steps",
           "floors", "pick_settings", "STEER_METRICS"]

#: Context phrasings varied across the contrastive prompts of a vector ("{}" is the label): the
#: phrasings the embedded world was trained with.
ENDOSCOPY_CONTEXTS = CONTEXTS

#: Metrics computed for every steered cell (and for each baseline).
STEER_METRICS = ("flip_rate", "confidence_shift", "bg_ssim", "bg_psnr", "bg_lpips")
DYE_METRICS = ("dye_detection_rate", "polyp_kept")
#: The steering settings a study sweeps, as result dims (`pair` and `edit` aside).
SETTING_AXES = ("window", "steps", "alpha", "renormalize", "blend", "vector_seeds")


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
        step_windows: When to steer, as fractions of the denoising steps ``(start, stop)``;
            `window_steps` resolves them to steps ``round(start·T) … round(stop·T) − 1`` (a grid
            axis; ``(0, 1)`` steers every step).
        alphas: Steering strengths (a grid axis).
        renormalize: Update variants: False = paper, True = authors' renormalised (a grid axis).
        blends: Latent blending thresholds τ (`dit_lens.interventions.blend`; 0 = off, the paper's method) (a
            grid axis).
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
    step_windows: tuple[tuple[float, float], ...] = ((0.0, 1.0),)
    alphas: tuple[float, ...] = (2.5,)
    renormalize: tuple[bool, ...] = (False,)
    blends: tuple[float, ...] = (0.0,)
    vector_seeds: tuple[int, ...] = (16,)
    eval_seeds: int = 32
    eval_seed_base: int = 10_000
    num_inference_steps: int = 20
    guidance_scale: float = 4.5
    baselines: tuple[str, ...] = ()
    dye: bool = False
    quick: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        tuples = ("pairs", "windows", "step_windows", "alphas", "renormalize", "blends", "vector_seeds", "baselines")
        for attr in tuples:
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        for attr in ("windows", "step_windows"):
            object.__setattr__(self, attr, tuple(tuple(float(x) for x in w) for w in getattr(self, attr)))
        if not self.name or "/" in self.name:
            raise ValueError(f"Study.name must be a plain non-empty name, got {self.name!r}")
        for attr in ("pairs", "windows", "step_windows", "alphas", "renormalize", "blends", "vector_seeds"):
            if not getattr(self, attr):
                raise ValueError(f"Study.{attr} must hold at least one value")
        for attr in ("windows", "step_windows"):
            for window in getattr(self, attr):
                if len(window) != 2 or not 0.0 <= window[0] < window[1] <= 1.0:
                    raise ValueError(f"Study.{attr} entries are fractions (start, stop) with 0 <= start < stop <= 1, "
                                     f"got {window}")
        if any(not np.isfinite(a) for a in self.alphas):
            raise ValueError(f"Study.alphas must be finite, got {self.alphas}")
        try:
            object.__setattr__(self, "blends", tuple(check_blend(b) for b in self.blends))
        except ValueError as err:
            raise ValueError(f"Study.blends: {err}") from None
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
        return {"pair": len(self.pairs), "window": len(self.windows), "steps": len(self.step_windows),
                "alpha": len(self.alphas),
                "renormalize": len(self.renormalize), "blend": len(self.blends), "vector_seeds": len(self.vector_seeds)}

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("quick")
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Study":
        data = dict(data)
        data["pairs"] = tuple(ConceptPair(**p) for p in data["pairs"])
        return cls(**data)

    def cell_context(self) -> dict:
        """What gives a cell's numbers their meaning besides its own grid coordinates.

        Two declarations with the same context can share a result folder: widening a sweep (more
        windows, step windows, α or update variants, another baseline) reuses the cells already
        measured. Everything else — the pairs, seeds, sampler, vector seed counts (the cosine is
        taken to the largest), dye metrics — must match.
        """
        data = self.to_dict()
        for axis in ("name", "windows", "step_windows", "alphas", "renormalize", "blends", "baselines"):
            data.pop(axis)
        return json.loads(json.dumps(data))

    def key(self, lens: Any) -> str:
        """Names the default result folder: the study's name and cell context, the model, the metrics."""
        from .metrics import METRICS_VERSION

        blob = json.dumps({"name": self.name, "context": self.cell_context(), "model": lens.fingerprint,
                           "metrics": METRICS_VERSION}, sort_keys=True)
        return hashlib.blake2b(blob.encode(), digest_size=6).hexdigest()


def window_layers(window: tuple[float, float], num_layers: int) -> list[int]:
    """Blocks of a fractional window ``round(start·L) … round(stop·L) − 1``; never empty."""
    start = min(int(round(window[0] * num_layers)), num_layers - 1)
    stop = max(int(round(window[1] * num_layers)), start + 1)
    return list(range(start, min(stop, num_layers)))


def window_steps(window: tuple[float, float], num_steps: int) -> list[int] | None:
    """Denoising steps of a fractional window, like `window_layers`; None for the whole run."""
    if tuple(window) == (0.0, 1.0):
        return None
    return window_layers(window, num_steps)


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
) -> xr.Dataset:
    """Run every cell of `study` not already finished in `out`, and return the labelled result.

    Returns:
        Dataset with dims ``(pair, window, steps, alpha, renormalize, blend, vector_seeds)`` (plus ``edit``
        when baselines are declared); for each metric the variables ``<metric>``, ``<metric>_low``,
        ``<metric>_high`` and ``<metric>_n``. Attrs: the declaration, provenance, the folder.
    """
    from .cells import CellRunner

    from ..trace.store import cache_root

    folder = Path(out) if out is not None else cache_root() / "studies" / f"{study.name}-{study.key(lens)}"
    runner = CellRunner(study, lens, oracle, segmenter, folder, progress=progress)
    runner.run()
    return runner.assemble()


def floors(result: xr.Dataset) -> dict[str, float]:
    """What a setting must reach to count as working: flip rate ≥ 0.9, or for a dye study flip ≥ 0.8
    with the polyp kept ≥ 0.8."""
    return {"flip_rate": 0.8, "polyp_kept": 0.8} if "polyp_kept" in result else {"flip_rate": 0.9}


def pick_settings(result: xr.Dataset, *, require: dict[str, float] | None = None,
                  maximize: str = "bg_ssim") -> list[dict]:
    """For each pair, the steered setting a sweep picks: the best background among settings that work.

    Among the MedSteer cells whose metrics reach every floor in `require` (default: flip rate ≥ 0.9;
    a dye study would add ``polyp_kept``), the one with the highest `maximize`; when none reaches
    them all, the one closest to doing so (highest worst ratio metric / floor), with
    ``"meets": False``. Returns one dict per pair: the setting's coordinates and every metric as
    ``[value, low, high]``.
    """
    require = {"flip_rate": 0.9} if require is None else dict(require)
    steered = result.sel(edit="medsteer") if "edit" in result.dims else result
    axes = [d for d in SETTING_AXES if d in steered.dims]
    picks = []
    for pair in steered["pair"].values:
        cells = steered.sel(pair=pair).to_dataframe().reset_index()
        cells = cells[np.isfinite(cells["flip_rate"])]
        if cells.empty:
            continue
        missing = [m for m in (*require, maximize) if m not in cells]
        if missing:
            raise ValueError(f"pick_settings: the result has no metric {missing}; it has {sorted(result.data_vars)}")
        ok = np.logical_and.reduce([cells[m] >= floor for m, floor in require.items()])
        if ok.any():
            row = cells[ok].loc[cells[ok][maximize].idxmax()]
        else:
            worst = np.min([cells[m] / floor for m, floor in require.items()], axis=0)
            row = cells.iloc[int(np.argmax(worst))]
        pick = {"pair": str(pair), "meets": bool(ok.any()), **{d: _plain(row[d]) for d in axes}}
        for m in STEER_METRICS + DYE_METRICS:
            if m in cells:
                pick[m] = [float(row[m]), float(row[f"{m}_low"]), float(row[f"{m}_high"])]
        picks.append(pick)
    return picks


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
