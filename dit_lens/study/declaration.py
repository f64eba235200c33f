"""Declarative studies: concept pairs, methods with the settings each sweeps, seeds and metrics → a result.

A `Study` is a frozen value. ``methods`` maps registered method names (`dit_lens.methods`) to the
values each of its axes sweeps; axes left out take the method's defaults. `run_study`
(`dit_lens.study.run`) does the rest: captures for the vectors (reusing the capture store), the pairs of every cell (one method at
one setting for one concept pair), metrics with their n and bootstrap intervals, and a labelled
`xarray.Dataset` with a ``method`` dim beside every method's axes. Finished cells are kept as small
JSON files, so a killed study resumes, a re-run reuses them, and a widened grid (another α, window
or method) computes only its new cells.

Examples:
    >>> pair = ConceptPair("polyps", "normal cecum", contexts=("An image of {}",))
    >>> s = Study("demo", pairs=(pair,), methods={"medsteer": {"alpha": (1.0, 2.5)}, "reprompt": {}})
    >>> s.grid_shape()
    {'medsteer': {'pair': 1, 'window': 1, 'steps': 1, 'alpha': 2, 'renormalize': 1, 'blend': 1, 'vector_seeds': 1, 'where': 1, 'top': 1, 'causal_seeds': 1}, 'reprompt': {'pair': 1, 'blend': 1}}
    >>> s.with_axis("blend", (0.0, 0.3)).methods["reprompt"]
    {'blend': (0.0, 0.3)}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import xarray as xr

from ..accessors import DEFAULT_FLOORS
from ..methods import METHODS, VECTOR_SEEDS, ConceptPair, get, window_label, window_layers, window_steps
from ..validate import check_guidance, check_int, check_steps
from ..metrics import STANDARD_METRICS, Metric

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["ConceptPair", "Study", "window_layers", "window_steps", "window_label", "floors",
           "pick_settings", "DEFAULT_FLOORS"]


@dataclass(frozen=True)
class Study:
    """Concept pairs × methods × each method's settings, with seeds and what to measure.

    Attributes:
        name: Names the result folder.
        pairs: Concept pairs (a result dim).
        methods: ``{method name: {axis: values}}``; each method sweeps the product of its axes
            (`dit_lens.methods.get(name).axes`), axes left out take their defaults. Methods that
            share an axis (``blend``) are compared at its values.
        eval_seeds: Pairs generated per cell (seeds ``eval_seed_base + i``, disjoint from the
            vector seeds ``0 …``).
        eval_seed_base: The first evaluation seed.
        num_inference_steps: Denoising steps T.
        guidance_scale: Classifier-free guidance scale.
        metrics: Extra metrics beside `STANDARD_METRICS` (e.g. `dit_lens.world.domain.DYE_METRICS`).
        require: What a setting must reach to be picked (`pick_settings`), e.g. ``{"flip_rate": 0.9}``.
        quick: Overrides for ``--quick`` runs: Study fields, or axis names (set in every declared
            method that has the axis), e.g. ``{"alpha": (2.0,), "eval_seeds": 8}``.
    """

    name: str
    pairs: tuple[ConceptPair, ...]
    methods: Mapping[str, Mapping[str, Sequence[Any]]] = field(default_factory=lambda: {"medsteer": {}})
    eval_seeds: int = 32
    eval_seed_base: int = 10_000
    num_inference_steps: int = 20
    guidance_scale: float = 4.5
    metrics: tuple[Metric, ...] = ()
    require: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_FLOORS))
    quick: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"Study.name must be a plain non-empty name, got {self.name!r}")
        object.__setattr__(self, "pairs", tuple(self.pairs))
        if not self.pairs or not all(isinstance(p, ConceptPair) for p in self.pairs):
            raise ValueError("Study.pairs must hold at least one ConceptPair")
        if not isinstance(self.methods, Mapping) or not self.methods:
            raise ValueError("Study.methods maps method names to their axes, e.g. {'medsteer': {'alpha': [2, 3]}}")
        methods = {}
        for name, axes in self.methods.items():
            if not isinstance(axes, Mapping):
                raise ValueError(f"Study.methods[{name!r}] maps axis names to values, got {axes!r}")
            methods[name] = get(name).sweep(axes, f"Study.methods[{name!r}]")
        object.__setattr__(self, "methods", methods)
        for axis, values in self.fixed_axes().items():
            if len(values) > 1:
                raise ValueError(f"methods {sorted(values)} declare different {axis!r}; it must be the same for all")
        object.__setattr__(self, "metrics", tuple(self.metrics))
        if not all(isinstance(m, Metric) for m in self.metrics) or len({m.name for m in self.metrics}) < len(self.metrics):
            raise ValueError("Study.metrics holds Metric values with distinct names")
        object.__setattr__(self, "require", {str(k): float(v) for k, v in dict(self.require).items()})
        measured = set(STANDARD_METRICS) | {m.name for m in self.metrics}
        if set(self.require) - measured:
            raise ValueError(f"Study.require names metrics {sorted(set(self.require) - measured)} the study does not "
                             f"measure; it measures {sorted(measured)}")
        object.__setattr__(self, "eval_seeds", check_int(self.eval_seeds, "Study.eval_seeds", minimum=1))
        object.__setattr__(self, "eval_seed_base", check_int(self.eval_seed_base, "Study.eval_seed_base", minimum=0))
        object.__setattr__(self, "num_inference_steps",
                           check_steps(self.num_inference_steps, name="Study.num_inference_steps"))
        object.__setattr__(self, "guidance_scale", check_guidance(self.guidance_scale, name="Study.guidance_scale"))
        if self.eval_seed_base < self.vector_seeds():
            raise ValueError("Study.eval_seed_base must exceed the vector seeds, so they stay disjoint")
        fields = {f.name for f in dataclasses.fields(self)} - {"quick"}
        axes = _registered_axes()
        unknown = set(self.quick) - fields - axes
        if unknown:
            raise ValueError(f"Study.quick overrides unknown fields or axes {sorted(unknown)}; fields: {sorted(fields)}, "
                             f"axes: {sorted(axes)}")

    # -- the grid ------------------------------------------------------------------------

    def axis_names(self) -> list[str]:
        """Every declared method's axes, in order of first appearance (the result dims after ``pair``)."""
        names: list[str] = []
        for method in self.methods:
            names += [a.name for a in get(method).axes if a.name not in names]
        return names

    def fixed_axes(self) -> dict[str, dict[str, tuple]]:
        """``{axis: {values: [methods]}}`` of the axes that are part of the cell context (`Axis.fixed`)."""
        fixed: dict[str, dict] = {}
        for method, sweep in self.methods.items():
            for axis in get(method).axes:
                if axis.fixed:
                    fixed.setdefault(axis.name, {}).setdefault(sweep[axis.name], []).append(method)
        return fixed

    def vector_seeds(self) -> int:
        """The largest number of vector seeds any method asks for (0 when none needs a vector)."""
        return max((max(s[VECTOR_SEEDS]) for s in self.methods.values() if VECTOR_SEEDS in s), default=0)

    def grid_shape(self) -> dict:
        return {m: {"pair": len(self.pairs), **{a: len(v) for a, v in sweep.items()}} for m, sweep in self.methods.items()}

    def with_axis(self, axis: str, values: Sequence[Any]) -> "Study":
        """The study with `axis` set to `values` in every declared method that has it."""
        if not any(axis in sweep for sweep in self.methods.values()):
            raise ValueError(f"no declared method has an axis {axis!r}; axes: {self.axis_names()}")
        return self.replace(methods={m: {**sweep, axis: tuple(values)} if axis in sweep else sweep
                                     for m, sweep in self.methods.items()})

    def replace(self, **changes: Any) -> "Study":
        """A copy with fields (or axis names, as `with_axis`) changed."""
        axes = {k: changes.pop(k) for k in list(changes) if k not in {f.name for f in dataclasses.fields(self)}}
        study = dataclasses.replace(self, **changes)
        for axis, values in axes.items():
            study = study.with_axis(axis, values)
        return study

    def quick_version(self) -> "Study":
        """The study with its ``quick`` overrides (axes no declared method has are skipped)."""
        declared = self.axis_names()
        changes = {k: v for k, v in self.quick.items() if k in declared or k not in _registered_axes()}
        return self.replace(**changes, name=f"{self.name}-quick")

    # -- values --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return json.loads(json.dumps({
            "name": self.name, "pairs": [p.to_dict() for p in self.pairs],
            "methods": {m: {a: list(v) for a, v in sweep.items()} for m, sweep in self.methods.items()},
            "eval_seeds": self.eval_seeds, "eval_seed_base": self.eval_seed_base,
            "num_inference_steps": self.num_inference_steps, "guidance_scale": float(self.guidance_scale),
            "metrics": [m.to_dict() for m in self.metrics], "require": self.require,
        }))

    @classmethod
    def from_dict(cls, data: dict) -> "Study":
        data = dict(data)
        data["pairs"] = tuple(ConceptPair.from_dict(p) for p in data["pairs"])
        data["metrics"] = tuple(Metric.from_dict(m) for m in data.get("metrics", ()))
        return cls(**data)

    def cell_context(self) -> dict:
        """What gives a cell's numbers their meaning besides its own coordinates.

        Two declarations with the same context can share a result folder: widening a sweep (more
        windows, α, blends, another method) reuses the cells already measured. Everything else —
        the pairs, seeds, sampler, fixed axes (vector seed counts: the cosine is taken to the
        largest), extra metrics — must match.
        """
        return context_of(self.to_dict())

    def key(self, lens: Lens) -> str:
        """Names the default result folder: the study's name and cell context, the model, the metrics."""
        from ..metrics import METRICS_VERSION

        blob = json.dumps({"name": self.name, "context": self.cell_context(), "model": lens.fingerprint,
                           "metrics": METRICS_VERSION}, sort_keys=True)
        return hashlib.blake2b(blob.encode(), digest_size=6).hexdigest()


def _registered_axes() -> set[str]:
    return {a.name for m in METHODS.values() for a in m.axes}


#: Declarations written before studies declared methods and metrics kept the dye metrics as a flag;
#: a context without extra metrics, or with exactly those, is spelled the same way, so the folders
#: (and the finished cells in them) of unchanged studies keep their names.
_FLAGGED_METRICS = {(): False, (("dye_detection_rate", 1), ("polyp_kept", 1)): True}


def context_of(declaration: dict) -> dict:
    """The cell context (`Study.cell_context`) of a saved declaration, including pre-method ones."""
    context = {k: declaration[k] for k in ("pairs", "eval_seeds", "eval_seed_base", "num_inference_steps",
                                           "guidance_scale")}
    if "methods" not in declaration:  # written before methods: the steering settings were top-level fields
        return json.loads(json.dumps({**context, VECTOR_SEEDS: declaration[VECTOR_SEEDS], "dye": declaration["dye"]}))
    for method, sweep in declaration["methods"].items():
        for axis in get(method).axes:
            if axis.fixed:
                context[axis.name] = sweep[axis.name]
    metrics = tuple((m["name"], m["version"]) for m in declaration["metrics"])
    if metrics in _FLAGGED_METRICS:
        context["dye"] = _FLAGGED_METRICS[metrics]
    else:
        context["metrics"] = [{"name": n, "version": v} for n, v in metrics]
    return json.loads(json.dumps(context))


def floors(result: xr.Dataset) -> dict[str, float]:
    """What a setting of `result` must reach to count as working: the study's ``require`` (``result.study.floors``)."""
    return result.study.floors


def method_axes(result: xr.Dataset) -> dict[str, list[str]]:
    """Each method's own axes in a study result (``result.study.method_axes``)."""
    return result.study.method_axes


def metric_names(result: xr.Dataset) -> list[str]:
    """The metrics a study result holds, in order: standard, declared, method extras (``result.study.metrics``)."""
    return result.study.metrics


def pick_settings(result: xr.Dataset, *, require: dict[str, float] | None = None, maximize: str = "bg_ssim",
                  methods: Sequence[str] | None = None) -> list[dict]:
    """For each pair and method, the setting a sweep picks: the best background among settings that work.

    Among a method's cells whose metrics reach every floor in `require` (default: the study's
    ``require``, flip rate ≥ 0.9 unless it says otherwise), the one with the highest `maximize`;
    when none reaches them all, the one closest to doing so (highest worst ratio metric / floor),
    with ``"meets": False``. Returns one dict per (pair, method), pair by pair: ``method``,
    ``pair``, the method's own setting coordinates and every metric as ``[value, low, high]``.
    The same as ``result.study.pick(...)`` (`dit_lens.accessors.StudyAccessor.pick`).
    """
    return result.study.pick(require=require, maximize=maximize, methods=methods)
