"""`At`: where an edit or a read happens — a site, its blocks, its denoising steps and guidance halves.

One frozen value, apart from what is done there (pyvene's representation config, diffusers'
``LayerSkipConfig``). It validates its own fields once; `At.resolve` checks it against a lens and a step
count and returns a `Where` with concrete layers and steps. Site interventions build theirs from their own
fields (``edit.at``), so every one of them states and checks its place the same way.

Examples:
    >>> from dit_lens.model.builders import PixArtSpec, build_pixart
    >>> from dit_lens.model.lens import load
    >>> at = At("attn2", layers=[1, 0, 1], steps=3)
    >>> at
    At(site='attn2', layers=(0, 1), steps=(3,), halves='both')
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> at.resolve(lens, 4)
    Where(site='attn2', layers=(0, 1), steps=(3,), halves='both')
    >>> At("attn2").resolve(lens, 2).steps
    (0, 1)
    >>> At("attn2", layers=2).resolve(lens, 4)
    Traceback (most recent call last):
    ...
    ValueError: At.layers [2] do not exist: the model has 2 blocks; pass indices in 0..1, or None for all
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .lens import Lens

__all__ = ["HALVES", "At", "Where", "check_indices"]

#: Which halves of the classifier-free-guidance batch an edit touches.
HALVES = ("both", "cond", "uncond")


def check_indices(name: str, value: Any, empty: bool = False) -> tuple[int, ...] | None:
    """`value` (None, one integer or integers) as a sorted tuple of distinct indices >= 0, or None.

    Args:
        name: What the value is, for the message (``"Steer.layers"``).
        value: None (all), an integer or an iterable of integers.
        empty: Whether an empty list is allowed (nowhere).

    Returns:
        The indices, sorted and distinct, or None.

    Raises:
        ValueError: Not integers, negative, or empty where `empty` is False.
    """
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    try:
        values = tuple(value)
    except TypeError:
        values = None
    if values is None or (not values and not empty) or not all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in values):
        raise ValueError(f"{name} must be a non-empty list of integers or None (all), got {value!r}")
    if values and min(values) < 0:
        raise ValueError(f"{name} must be >= 0, got {list(values)}")
    return tuple(sorted({int(x) for x in values}))


@dataclass(frozen=True)
class Where:
    """An `At` resolved against a lens and a run: concrete, checked blocks and steps.

    Attributes:
        site: The site.
        layers: Blocks that have the site, ascending.
        steps: Denoising steps of the run, ascending (empty: nowhere).
        halves: Guidance halves.
    """

    site: str
    layers: tuple[int, ...]
    steps: tuple[int, ...]
    halves: str


@dataclass(frozen=True)
class At:
    """Where: a site at some blocks, denoising steps and guidance halves.

    Attributes:
        site: A site of the model family's table (``"attn2"``, ``"block"``, ``"attn2.weights"``, ...).
        layers: Blocks (an integer or integers; ``None``: every block that has the site).
        steps: Denoising steps (``None``: all; an empty tuple: none).
        halves: Guidance halves, one of `HALVES`.
    """

    site: str
    layers: tuple[int, ...] | None = None
    steps: tuple[int, ...] | None = None
    halves: str = "both"

    def __post_init__(self) -> None:
        self.validate("At")

    def validate(self, name: str) -> None:
        """Check and normalise the fields in place, naming them ``{name}.layers`` etc. in messages."""
        if not isinstance(self.site, str) or not self.site:
            raise ValueError(f"{name}.site must be a site name such as 'attn2', got {self.site!r}")
        object.__setattr__(self, "layers", check_indices(f"{name}.layers", self.layers))
        object.__setattr__(self, "steps", check_indices(f"{name}.steps", self.steps, empty=True))
        if self.halves not in HALVES:
            raise ValueError(f"{name}.halves must be one of {list(HALVES)}, got {self.halves!r}")

    def layers_in(self, lens: "Lens") -> tuple[int, ...]:
        """The blocks, ``None`` expanded to every block of `lens` that has the site (unchecked)."""
        return tuple(lens.layers_with(self.site)) if self.layers is None else self.layers

    def steps_in(self, num_inference_steps: int) -> tuple[int, ...]:
        """The steps, ``None`` expanded to every step of a run of T steps (unchecked)."""
        return tuple(range(num_inference_steps)) if self.steps is None else self.steps

    def resolve(self, lens: "Lens", num_inference_steps: int, name: str = "At") -> Where:
        """This place checked against `lens` and a run of T steps.

        Args:
            lens: The `dit_lens.Lens` to run.
            num_inference_steps: Steps T of the run.
            name: What to call the value in messages (an intervention's class name).

        Returns:
            A `Where` with concrete layers and steps.

        Raises:
            ValueError: The site is not in the family, a block does not exist or lacks the site (Flux's two
                block lists), or a step is beyond the run.
        """
        family = lens.family
        if self.site not in family.every_site:
            raise ValueError(f"{name}: unknown site {self.site!r} for {family.name}; "
                             f"choose one of {sorted(family.every_site)}")
        count = lens.num_layers
        layers = self.layers_in(lens)
        deep = [layer for layer in layers if layer >= count]
        if deep:
            raise ValueError(f"{name}.layers {deep} do not exist: the model has {count} blocks; pass indices in "
                             f"0..{count - 1}, or None for all")
        for layer in layers:
            family.check_site(self.site, layer, lens.split)
        steps = self.steps_in(num_inference_steps)
        if steps and max(steps) >= num_inference_steps:
            raise ValueError(f"{name}.steps {list(steps)} go beyond the run's {num_inference_steps} steps")
        return Where(self.site, tuple(layers), tuple(steps), self.halves)
