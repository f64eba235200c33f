"""Argument checks shared by every entry point: one rule per kind of value, one error wording.

Every public function that takes a number of steps, a guidance scale, a window of fractions, seeds or
prompts checks it here, so ``capture``, ``generate``, studies and the command lines accept and refuse
the same values. Python and numpy scalars are accepted alike (``np.int64(4)`` is an integer,
``np.float32(3)`` a real number); bools are not numbers here. Errors are `ValueError` (or its
subclass `NonFiniteError`) and say what was wrong, what was expected and how to fix it.

Examples:
    >>> check_steps(np.int64(4)), check_guidance(np.float32(4.5)), check_window((0, 0.5))
    (4, 4.5, (0.0, 0.5))
    >>> check_window((0.5, 0.2))
    Traceback (most recent call last):
    ...
    ValueError: a window is fractions (start, stop) with 0 <= start < stop <= 1, got (0.5, 0.2); e.g. (0.25, 0.75)
    >>> check_guidance(0)
    Traceback (most recent call last):
    ...
    ValueError: guidance_scale must be a finite number >= 1 (1 runs without classifier-free guidance), got 0; pass e.g. guidance_scale=4.5
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "as_array",
    "check_nonnegative",
    "NonFiniteError",
    "UNIT_NORM_TOLERANCE",
    "USER_ERRORS",
    "check_finite",
    "check_fraction",
    "check_guidance",
    "check_int",
    "check_labels",
    "check_pipeline_folder",
    "check_prompts",
    "check_real",
    "check_seed",
    "check_seeds",
    "window_layers",
    "check_steps",
    "check_unit_norm",
    "check_window",
    "check_writable_folder",
    "is_int",
    "is_real",
    "min_steps",
]

#: How far a concept vector's L2 norm over channels may be from 1 (float32 rounding is ~1e-7).
UNIT_NORM_TOLERANCE = 1e-3


#: What a command line reports as one line and exit status 2 (a traceback only with ``--debug``): bad values,
#: and files or folders that are missing, in the way, unreadable or unwritable.
USER_ERRORS = (ValueError, TypeError, OSError)


class NonFiniteError(ValueError):
    """A run produced NaN or inf values (latents, images); the message names the setting to change."""


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A real number (Python or numpy int or float), not a bool."""
    return isinstance(value, (numbers.Real, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """`value` as an int (Python or numpy integer) that is at least `minimum`."""
    if not is_int(value) or (minimum is not None and value < minimum):
        least = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an integer{least}, got {value!r}")
    return int(value)


def check_real(value: Any, name: str, *, minimum: float | None = None) -> float:
    """`value` as a finite float (Python or numpy number) that is at least `minimum`."""
    if not is_real(value) or not math.isfinite(float(value)) or (minimum is not None and value < minimum):
        least = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{name} must be a finite number{least}, got {value!r}")
    return float(value)


def check_fraction(value: Any, name: str) -> float:
    """A fraction of the denoising steps: a real number in [0, 1], not a bool."""
    if not is_real(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a fraction of the steps in [0, 1], got {value!r}")
    return float(value)


def check_prompts(prompts: Any) -> list[str]:
    """`prompts` as a list of unique strings (one string is one prompt); ValueError otherwise."""
    if isinstance(prompts, str):
        prompts = [prompts]
    try:
        prompts = list(prompts)
    except TypeError:
        kind = type(prompts).__name__
        raise ValueError(f"prompts must be a list of strings, got {kind}") from None
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt, e.g. prompts=['a polyp']")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must all be strings; got {bad[:3]!r}")
    if len(set(prompts)) != len(prompts):
        raise ValueError("prompts has duplicates; list each prompt once (they label the data)")
    return prompts


def check_labels(values: Any, name: str) -> list[str]:
    """`values` (one string or several) as a list of distinct non-empty strings that label data (words, concepts).

    Examples:
        >>> check_labels("polyp", "words")
        ['polyp']
        >>> check_labels(["polyp", "polyp"], "concepts")
        Traceback (most recent call last):
        ...
        ValueError: concepts has duplicates: ['polyp', 'polyp']; list each once (they label the data)
    """
    values = [values] if isinstance(values, str) else list(values)
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError(f"{name} must be a non-empty list of non-empty strings, got {values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {values}; list each once (they label the data)")
    return values


def check_seed(value: Any, name: str = "seed") -> int:
    """One seed: an int (Python or numpy) in [0, 2**63); ValueError naming `name` otherwise."""
    if not is_int(value) or not 0 <= value < 2**63:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {value!r}")
    return int(value)


def check_seeds(seeds: Any, name: str = "seeds") -> list[int]:
    """`seeds` as a list of unique ints in [0, 2**63); ValueError naming `name` otherwise."""
    if is_int(seeds):
        raise ValueError(
            f"{name} must be a list of integers; pass {name}=range({seeds}) or {name}=[{seeds}]"
        )
    try:
        seeds = list(seeds)
    except TypeError:
        raise ValueError(f"{name} must be a list of integers, got {type(seeds).__name__}") from None
    if not seeds:
        raise ValueError(f"{name} is empty; pass at least one seed, e.g. {name}=range(8)")
    for seed in seeds:
        if not is_int(seed) or not 0 <= seed < 2**63:
            raise ValueError(f"{name} must be integers in [0, 2**63), got {seed!r}")
    if len(set(int(s) for s in seeds)) != len(seeds):
        raise ValueError(f"{name} has duplicates; list each seed once (they label the data)")
    return [int(s) for s in seeds]


def min_steps(scheduler: Any) -> int:
    """The fewest denoising steps a PixArt pipeline can run with `scheduler`: 1 or 2.

    At one step diffusers' PixArt pipelines take the second output of ``scheduler.step`` (a one-step
    sampler's denoised sample); schedulers that return only one (DPM-Solver++, UniPC) die there with
    IndexError, so they need 2. Found by running one step of a copy of the scheduler on a tiny zero
    latent, so it holds for any diffusers scheduler and its settings.
    """
    import torch

    probe = copy.deepcopy(scheduler)
    try:
        probe.set_timesteps(1, device="cpu")
        if hasattr(probe, "is_scale_input_called"):  # Euler-type samplers log a reminder otherwise
            probe.is_scale_input_called = True
        sample = torch.zeros(1, 4, 2, 2)
        out = probe.step(torch.zeros_like(sample), probe.timesteps[0], sample, return_dict=False)
    except IndexError:
        return 2
    except Exception:  # noqa: BLE001 - a probe that cannot run proves nothing; the run itself will say more
        return 1
    return 1 if isinstance(out, tuple) and len(out) >= 2 else 2


def check_steps(value: Any, scheduler: Any = None, *, name: str = "num_inference_steps") -> int:
    """Denoising steps as an int >= 1, and >= `min_steps(scheduler)` when a scheduler is given."""
    steps = value
    if not is_int(steps) or steps < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; pass e.g. {name}=20")
    if scheduler is not None and steps < 2:  # every sampler runs 2 steps: probe only below that
        least = min_steps(scheduler)
        if steps < least:
            raise ValueError(
                f"{name}={int(steps)} is too few for the {type(scheduler).__name__} sampler, which needs at "
                f"least {least} steps; pass {name}>={least} (e.g. 20)"
            )
    return int(steps)


def check_guidance(value: Any, *, name: str = "guidance_scale") -> float:
    """A classifier-free guidance scale: a finite number >= 1 (exactly 1 runs without guidance).

    diffusers runs the unconditional branch only above 1 and silently drops guidance below it, so
    values under 1 (0, negative) and NaN, which would run unguided while looking guided, are refused.
    """
    if not is_real(value) or not math.isfinite(float(value)) or value < 1:
        raise ValueError(
            f"{name} must be a finite number >= 1 (1 runs without classifier-free guidance), got {value!r}; "
            f"pass e.g. {name}=4.5"
        )
    return float(value)


def check_nonnegative(value: Any, name: str) -> float:
    """A finite real number >= 0 as a float (`check_real`); ValueError naming `name` otherwise."""
    value = check_real(value, name)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def as_array(value: Any) -> Any:
    """An xarray DataArray's or a torch tensor's values as a numpy array; anything else as given."""
    if hasattr(value, "dims") and hasattr(value, "values"):
        value = value.values
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return value


def check_window(window: Any, name: str = "a window") -> tuple[float, float]:
    """A window ``(start, stop)`` of fractions (of the depth, or of the steps) with 0 <= start < stop <= 1."""
    try:
        start, stop = window
    except (TypeError, ValueError):
        raise ValueError(f"{name} is a pair of fractions (start, stop), got {window!r}; e.g. (0.25, 0.75)") from None
    if not (is_real(start) and is_real(stop) and 0.0 <= start < stop <= 1.0):
        raise ValueError(
            f"{name} is fractions (start, stop) with 0 <= start < stop <= 1, got {tuple(window)!r}; "
            f"e.g. (0.25, 0.75)"
        )
    return float(start), float(stop)


def window_layers(window: tuple[float, float], num_layers: int) -> list[int]:
    """Blocks (or steps) of a fractional window ``round(start·L) … round(stop·L) − 1``; never empty."""
    start = min(int(round(window[0] * num_layers)), num_layers - 1)
    stop = max(int(round(window[1] * num_layers)), start + 1)
    return list(range(start, min(stop, num_layers)))


def check_unit_norm(values: np.ndarray, what: str = "the concept vector",
                    tolerance: float = UNIT_NORM_TOLERANCE) -> None:
    """Refuse `values` ``(..., channel)`` whose L2 norm over the last axis is not 1 within `tolerance`."""
    norms = np.sqrt((np.asarray(values, np.float64) ** 2).sum(-1))
    bad = np.abs(norms - 1.0) > tolerance
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{what} must have unit L2 norm over channels (within {tolerance:g}), but its norm is "
            f"{norms[where]:.6g} at index {where} ({int(bad.sum())} of {bad.size} (step, layer) rows off); "
            f"normalise it first: vec / numpy.sqrt((vec ** 2).sum('channel'))"
        )


#: The dims of a concept vector, in order.
VECTOR_DIMS = ("step", "layer", "channel")


def check_vector(vec: Any) -> Any:
    """Refuse anything but a concept vector: a DataArray ``(step, layer, channel)`` of finite values with unit
    L2 norm over channels. Returns `vec`."""
    import xarray as xr

    if not isinstance(vec, xr.DataArray) or tuple(vec.dims) != VECTOR_DIMS:
        got = getattr(vec, "dims", type(vec).__name__)
        raise ValueError(f"a concept vector is a DataArray with dims {VECTOR_DIMS}, got {got}")
    if not bool(np.isfinite(vec.values).all()):
        raise ValueError("the concept vector holds NaN or inf values; recompute it")
    check_unit_norm(vec.values)
    return vec


def check_finite(values: Any, what: str, fix: str) -> None:
    """Raise `NonFiniteError` naming `what` and how to `fix` it when `values` hold NaN or inf."""
    array = np.asarray(values)
    if not np.isfinite(array).all():
        count = int((~np.isfinite(array)).sum())
        raise NonFiniteError(f"{what} hold {count} NaN or inf values of {array.size}; {fix}")


def check_pipeline_folder(path: str | Path) -> Path:
    """Check a diffusers pipeline folder before loading it, naming the part that is wrong.

    Every component listed in ``model_index.json`` (with a library) must have its own folder with
    its config, and every ``.safetensors`` file must be complete (its header's tensors fit the file),
    so a missing component or a truncated download is reported with its own path.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such pipeline folder: {folder}")
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    try:
        components = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{index} is not valid JSON ({err}); restore the pipeline folder") from None
    for name, spec in components.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        part = folder / name
        if not part.is_dir():
            raise ValueError(f"the pipeline component {name!r} is missing: no folder {part} (listed in {index}); "
                             f"restore it or download the pipeline again")
        configs = [p for p in part.iterdir() if p.suffix == ".json"]
        if not configs:
            raise ValueError(f"the pipeline component folder {part} holds no config (.json); restore it")
        for weights in sorted(part.glob("*.safetensors")):
            _check_safetensors(weights)
    return folder


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    broken = f"{path} is truncated or corrupt (size {size} bytes)"
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > size - 8:
                raise ValueError(broken + "; download it again")
            header = json.loads(fh.read(length))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(broken + ": its header cannot be read; download it again") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if 8 + length + max(ends, default=0) > size:
        raise ValueError(f"{broken}: its tensors need {8 + length + max(ends)} bytes; download it again")


def check_writable_folder(path: str | Path, what: str, fix: str) -> Path:
    """Create `path` if needed and prove it takes a file; a ValueError naming `what` and `fix` otherwise."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder} is a file, not a folder; {fix}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dit-lens-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{what} {folder} cannot be written ({err.strerror or err}); {fix}") from None
    return folder
