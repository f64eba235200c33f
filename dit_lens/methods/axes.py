"""Setting axes: one row of the table that drives a method's declaration, flags, cell names and results.

A method's settings are axes (α, layer window, blend threshold, ...). An `Axis` says everything the
rest of dit-lens needs about one: its default values, how to read a value from the command line,
how to validate it, how it is spelled in cell file names and how it is labelled as a result
coordinate. Methods that share a setting share the `Axis` value (`BLEND`), so a name means one thing.

Examples:
    >>> BLEND.check(0.3), BLEND.cell_key(0.3), BLEND.cell_key(0.0)
    (0.3, '_b0.3', '')
    >>> window = parse_window("0:0.25")
    >>> window, window_label(window), window_layers(window, 12)
    ((0.0, 0.25), '0-0.25', [0, 1, 2])
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .. import validate
from ..validate import window_layers  # the one rounding rule of fractional windows
from ..interventions.blend import check_blend

__all__ = ["Axis", "BLEND", "check_count", "check_flag", "check_real", "check_window", "format_value", "parse_flag",
           "check_fraction", "layer_window", "parse_window", "window_label", "window_layers", "window_steps"]


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Axis:
    """One setting of a method, swept by a study.

    Attributes:
        name: The result dim and the key in ``Study.methods[method]`` (e.g. ``"alpha"``).
        default: Values a study sweeps when it does not set the axis.
        parse: Reads one command-line value (``"0:0.25"`` → ``(0.0, 0.25)``); raises
            `argparse.ArgumentTypeError` or `ValueError` on a bad value.
        check: Validates and normalises one value (raises `ValueError` saying what was expected).
        key: Prefix of the value in cell file names (``"a"`` → ``_a3``).
        label: The value as a result coordinate (a window ``(0, 0.25)`` → ``"0-0.25"``).
        flag: The command-line flag without dashes (default: the name, ``_`` → ``-``).
        omit: A value left out of cell file names (blend 0: cells named before the axis existed).
        resolve: Optional ``resolve(value, lens, num_inference_steps)`` → what the value means on
            that model and sampler (a layer window → its blocks), recorded with results.
        fixed: Changing the axis changes the meaning of other cells (vector seeds: the cosine is
            taken to the largest), so its values are part of the study's folder key instead of
            being widened cell by cell.
        help: One line for ``--help``.
    """

    name: str
    default: tuple
    parse: Callable[[str], Any]
    check: Callable[[Any], Any] = _same
    key: str = ""
    label: Callable[[Any], Any] = _same
    flag: str = ""
    omit: tuple = ()
    resolve: Callable[[Any, Any, int], Any] | None = None
    fixed: bool = False
    help: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"an axis name must be an identifier (it is a result dim), got {self.name!r}")
        object.__setattr__(self, "default", tuple(self.default))
        if not self.default:
            raise ValueError(f"axis {self.name!r} needs at least one default value")
        object.__setattr__(self, "key", self.key or self.name)
        object.__setattr__(self, "flag", self.flag or self.name.replace("_", "-"))

    def values(self, values: Sequence[Any], where: str = "") -> tuple:
        """Validated values of a sweep along this axis: non-empty, each checked, no repeats."""
        where = where or f"axis {self.name!r}"
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ValueError(f"{where} takes a list of values, got {values!r}")
        try:
            checked = tuple(self.check(v) for v in values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None
        if not checked:
            raise ValueError(f"{where} must hold at least one value")
        if len({self.label(v) for v in checked}) != len(checked):
            raise ValueError(f"{where} repeats a value: {list(values)}")
        return checked

    def cell_key(self, value: Any) -> str:
        """The value's part of a cell file name (empty for an omitted value)."""
        return "" if value in self.omit else f"_{self.key}{format_value(value)}"


def format_value(value: Any) -> str:
    """A setting as it appears in file names: ``3.0`` → ``3``, ``(0, 0.25)`` → ``0-0.25``, True → ``1``."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, tuple):
        return "-".join(format_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_window(text: str) -> tuple[float, float]:
    """``"START:STOP"`` fractions → ``(start, stop)``."""
    try:
        start, stop = (float(x) for x in text.split(":"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"a window is START:STOP fractions (of the depth, or of the steps), e.g. 0.25:0.5; got {text!r}") from err
    return start, stop


def check_window(window: Any) -> tuple[float, float]:
    """A window ``(start, stop)`` of fractions with 0 <= start < stop <= 1, as floats (`dit_lens.validate`)."""
    return validate.check_window(window)


def window_label(window: tuple[float, float]) -> str:
    return f"{window[0]:g}-{window[1]:g}"  # ASCII: sel(window="0-0.25")


def layer_window(name: str, *, default: tuple, key: str, flag: str, help: str) -> Axis:
    """An axis of layer windows (fractions of the depth), resolved to the model's blocks."""
    return Axis(name, default=default, parse=parse_window, check=check_window, key=key, label=window_label,
                flag=flag, resolve=lambda window, lens, _steps: window_layers(window, lens.num_layers), help=help)


def check_fraction(value: Any) -> float:
    """One fraction of the steps in [0, 1] (`dit_lens.validate.check_fraction`)."""
    return validate.check_fraction(value, "a fraction")


def window_steps(window: tuple[float, float], num_steps: int) -> list[int] | None:
    """Denoising steps of a fractional window, like `window_layers`; None for the whole run."""
    if tuple(window) == (0.0, 1.0):
        return None
    return window_layers(window, num_steps)


def check_real(value: Any) -> float:
    """A finite real number as a float (not a bool)."""
    if not validate.is_real(value) or not math.isfinite(float(value)):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)


def check_flag(value: Any) -> bool:
    """True or False (1 and 0 accepted)."""
    if value not in (True, False):
        raise ValueError(f"expected true or false, got {value!r}")
    return bool(value)


def parse_flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def check_count(value: Any) -> int:
    """A positive integer."""
    if not validate.is_int(value) or value < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return int(value)


#: Latent blending threshold τ (`dit_lens.interventions.blend`), shared by every method whose pairs
#: are blended: 0 = off; unblended cells keep the names they had before the axis existed.
BLEND = Axis("blend", default=(0.0,), parse=float, check=check_blend, key="b", flag="blends", omit=(0.0,),
             help="latent blending thresholds in [0, 1) (0 = off: the paper's method)")
