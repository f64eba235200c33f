"""The method registry: named recipes that turn a concept pair into counterfactual pairs.

A `Method` is a name, its setting axes (`dit_lens.methods.axes.Axis`) and a function
``run(lens, pair, seeds, settings, *, context)`` returning the pairs Dataset that the metrics read:
``image (prompt, seed, branch, y, x, rgb)`` with branch ``["original", "edited"]`` (the original
and the counterfactual). A new method is one module that calls `register`; studies, the command
line, cell files and results pick it up from its axes.

What a method needs from outside — the sampler settings and concept vectors — comes in a
`MethodContext`, so methods do not depend on studies.

Examples:
    >>> sorted(names())
    ['hedit', 'medsteer', 'medsteer_local', 'pnp', 'regulate', 'reprompt', 'sae_steer']
    >>> [a.name for a in get("reprompt").axes]
    ['blend']
    >>> get("medsteer").settings({"alpha": 3})["alpha"]
    3.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import xarray as xr

from ..validate import NonFiniteError, check_guidance, check_int, check_steps
from .axes import Axis
from .pair import ConceptPair

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["Method", "MethodContext", "Vectors", "METHODS", "VECTOR_SEEDS", "register", "get", "names"]

#: Every registered method by name (read-only by convention: add methods with `register`).
METHODS: dict[str, "Method"] = {}

#: The axis name of a method that needs a concept vector: the number of seeds per prompt it is
#: computed from. A study captures the largest count once per pair (`Vectors`).
VECTOR_SEEDS = "vector_seeds"


class Vectors:
    """Concept vectors of concept pairs from one capture per pair, kept for reuse.

    The positive and negative prompts of a pair are captured once for seeds ``0 … seeds − 1``
    (through the capture store, so a re-run reads them back); a vector from n seeds uses the first
    n of them.

    Args:
        lens: From `dit_lens.load`.
        seeds: Seeds per prompt captured (the largest count asked for).
        num_inference_steps: Denoising steps T of the captures.
        guidance_scale: Classifier-free guidance of the captures.
        batch_size: Passed to `capture` (values change only by float rounding).
        repair: Passed to `capture`: recompute damaged cells of the captures instead of refusing them.
    """

    def __init__(self, lens: Lens, *, seeds: int, num_inference_steps: int = 20, guidance_scale: float = 4.5,
                 batch_size: int | None = 8, repair: bool = False) -> None:
        self.lens, self.seeds = lens, check_int(seeds, "Vectors seeds", minimum=1)
        #: What each capture of a pair is run with (`dit_lens.capture`'s keyword arguments).
        self.settings = dict(seeds=list(range(self.seeds)), num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, batch_size=batch_size, repair=bool(repair))
        self._captures: dict[ConceptPair, tuple[xr.Dataset, xr.Dataset]] = {}

    def __call__(self, pair: ConceptPair, seeds: int | None = None) -> xr.DataArray:
        """The unit vector ``(step, layer, channel)`` of `pair` from its first `seeds` seeds (default: all)."""
        from ..readouts.vectors import concept_vector
        from ..trace.capture import capture

        n = self.seeds if seeds is None else int(seeds)
        if not 1 <= n <= self.seeds:
            raise ValueError(f"a vector from {n} seeds needs 1 to {self.seeds} (the captured seeds); "
                             f"make Vectors(seeds={n}) to capture more")
        if pair not in self._captures:
            self._captures[pair] = (capture(self.lens, pair.positive(), **self.settings),
                                    capture(self.lens, pair.negative(), **self.settings))
        pos, neg = self._captures[pair]
        return concept_vector(pos.isel(seed=slice(0, n)), neg.isel(seed=slice(0, n)))


@dataclass(frozen=True)
class MethodContext:
    """What a method run takes from its caller besides its own settings.

    Attributes:
        num_inference_steps: Denoising steps T.
        guidance_scale: Classifier-free guidance scale.
        batch_size: Pairs per pipeline call.
        vectors: Concept vectors, for methods with a ``vector_seeds`` axis.
        record_gates: Ask steering methods for their gate maps (others ignore it).
        progress: Show progress bars.
        segmenter: The lesion segmenter (images ``(N, H, W, 3)`` → masks ``(N, H, W)``), for methods that
            localise an edit to the lesion.
        oracle: The judge (images ``(N, H, W, 3)`` → class probabilities, with ``.labels``), for methods
            that choose where to edit by its score (MedSteer's ``where="causal"``).
    """

    num_inference_steps: int = 20
    guidance_scale: float = 4.5
    batch_size: int | None = 8
    vectors: Vectors | None = field(default=None, compare=False)
    record_gates: bool = False
    progress: bool = False
    segmenter: Callable | None = field(default=None, compare=False)
    oracle: Callable | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_inference_steps", check_steps(self.num_inference_steps))
        object.__setattr__(self, "guidance_scale", check_guidance(self.guidance_scale))
        if self.batch_size is not None:
            object.__setattr__(self, "batch_size", check_int(self.batch_size, "batch_size", minimum=1))


@dataclass(frozen=True)
class Method:
    """A named recipe for counterfactual pairs.

    Attributes:
        name: The registry key and the value of the result's ``method`` coordinate.
        axes: Its settings, in the order they appear in cell file names and result dims.
        fn: ``fn(lens, pair, seeds, settings, *, context)`` → pairs Dataset; `settings` holds one
            checked value per axis.
        extras: Optional ``extras(lens, pair, settings, *, context)`` → ``{name: float}``, values a
            study records per cell beside the metrics (e.g. a vector's stability).
        cell_prefix: Starts its cell file names (default ``"<name>_"``).
        description: One line for listings.
    """

    name: str
    axes: tuple[Axis, ...]
    fn: Callable[..., xr.Dataset] = field(repr=False)
    extras: Callable[..., dict] | None = field(default=None, repr=False)
    cell_prefix: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"a method name must be an identifier, got {self.name!r}")
        object.__setattr__(self, "axes", tuple(self.axes))
        names = [a.name for a in self.axes]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name!r} repeats an axis: {names}")
        if {"method", "pair"} & set(names):
            raise ValueError(f"method {self.name!r}: 'method' and 'pair' are the study's own dims, not axes")
        if self.cell_prefix is None:
            object.__setattr__(self, "cell_prefix", f"{self.name}_")

    def axis(self, name: str) -> Axis:
        for axis in self.axes:
            if axis.name == name:
                return axis
        raise ValueError(f"method {self.name!r} has no axis {name!r}; its axes: {[a.name for a in self.axes]}")

    def sweep(self, declared: Mapping[str, Sequence[Any]], where: str = "") -> dict[str, tuple]:
        """Validated values per axis, in axis order; axes not declared take their defaults."""
        where = where or f"method {self.name!r}"
        unknown = set(declared) - {a.name for a in self.axes}
        if unknown:
            raise ValueError(f"{where} has no axis {sorted(unknown)}; its axes: {[a.name for a in self.axes]}")
        return {a.name: a.values(declared.get(a.name, a.default), f"{where}[{a.name!r}]") for a in self.axes}

    def settings(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One checked value per axis; an axis not given takes its default when that is one value."""
        given = dict(given or {})
        unknown = set(given) - {a.name for a in self.axes}
        if unknown:
            raise ValueError(f"method {self.name!r} has no setting {sorted(unknown)}; "
                             f"its settings: {[a.name for a in self.axes]}")
        out = {}
        for a in self.axes:
            if a.name in given:
                value = given[a.name]
            elif len(a.default) == 1:
                value = a.default[0]
            else:
                raise ValueError(f"method {self.name!r} needs a value for {a.name!r} (defaults {a.default})")
            try:
                out[a.name] = a.check(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"method {self.name!r}, setting {a.name!r}: {err}") from None
        return out

    def run(self, lens: Lens, pair: ConceptPair, seeds: Sequence[int], settings: Mapping[str, Any] | None = None,
            *, context: MethodContext | None = None) -> xr.Dataset:
        """The pairs of `pair` for `seeds` at `settings` (checked, defaults filled).

        A run that diverges (NaN or inf latents or images) raises `NonFiniteError` naming this method,
        the pair and every setting, so a study never records a cell measured on such images.
        """
        checked = self.settings(settings)
        try:
            return self.fn(lens, pair, list(seeds), checked, context=context or MethodContext())
        except NonFiniteError as err:
            where = ", ".join(f"{a.name}={a.label(checked[a.name])}" for a in self.axes)
            raise NonFiniteError(f"{self.name} on {pair.name!r} at {where}: {err}") from err

    def cell_name(self, pair_index: int, settings: Mapping[str, Any]) -> str:
        """The file stem of one cell: prefix, pair index, each axis's key and value."""
        return f"{self.cell_prefix}p{pair_index}" + "".join(a.cell_key(settings[a.name]) for a in self.axes)


def register(method: Method) -> Method:
    """Add `method` to the registry (a module registering itself at import time).

    An axis name means one thing across methods: a method that uses a name another registered
    method already uses must use the same `Axis` (e.g. `dit_lens.methods.axes.BLEND`).
    """
    if method.name in METHODS and METHODS[method.name] != method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    for other in METHODS.values():
        for axis in method.axes:
            if other.name != method.name and axis.name in {a.name for a in other.axes} and other.axis(axis.name) != axis:
                raise ValueError(f"method {method.name!r}: axis {axis.name!r} differs from method {other.name!r}'s "
                                 f"axis of that name; share the Axis value or rename it")
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method `name`; ValueError listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {names()}") from None


def names() -> list[str]:
    """Registered method names, in registration order."""
    return list(METHODS)


def unregister(name: str) -> None:
    """Remove a registered method (for methods registered by tests or notebooks)."""
    METHODS.pop(name, None)
