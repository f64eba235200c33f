"""The intervention protocol: what every way of changing a run implements.

An intervention is a frozen, validated value that prints, round-trips through ``to_dict`` /
``from_dict`` and is saved next to results. It knows only its own edit; the runner
(`dit_lens.interventions.generate`) knows the batch: which rows are the edited branch, which are
their unedited twins, which guidance halves there are. Three kinds:

- `SiteEdit` replaces a site's output (``"attn2"``, ``"attn1"``, ``"ff"``, ``"block"``) at its
  layers, steps and guidance halves, on the edited rows; it may record one value per token (MedSteer's
  gate). An edit at a weights site (``"attn2.weights"``, ``"attn1.weights"``) sees and replaces the
  softmax attention weights ``(rows, heads, queries, keys)`` instead: an attention-weight edit.
- `LatentEdit` acts on the latents after each denoising step, given the edited branch's latents and
  their unedited twins (latent blending).
- `Guidance` moves the edited branch's latents before chosen denoising steps along the gradient of
  an energy of the model's own forward pass at those latents (a latent correction); the runner gives
  it a differentiable call of the denoiser that the traced run does not see.

A `Composite` is a value made of several of these (attention regulation: gates, reweighting and a
latent correction); the runner applies its parts, results record the composite as the user gave it.

A new intervention is one frozen dataclass deriving from one of them, with ``apply``, ``check`` and
``settings``; registering its class (`register`) lets `from_dict` rebuild it from saved results.

The simplest one, `dit_lens.interventions.reweight.Reweight`, shows the whole protocol in 60 lines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from ..model.lens import Lens
from ..model.where import HALVES, At, check_indices
from ..storage import read_record, write_atomic

__all__ = [
    "HALVES",
    "EditContext",
    "Intervention",
    "Composite",
    "Guidance",
    "LatentEdit",
    "SiteEdit",
    "UnverifiedWarning",
    "from_dict",
    "register",
    "flatten",
    "settings_digest",
]

_CLASSES: dict[str, type] = {}
#: `read_record`'s digest key when it only parses a saved intervention (sealed by `settings_digest` instead).
_PARSE_ONLY = "\0 parse only"


def register(cls: type) -> type:
    """Make `cls` known to `from_dict` under its class name (use as a class decorator)."""
    _CLASSES[cls.__name__] = cls
    return cls


def from_dict(data: dict) -> "Intervention":
    """Rebuild an intervention saved with ``to_dict`` (its ``"type"`` names the class)."""
    kind = data.get("type")
    if kind not in _CLASSES:
        raise ValueError(f"unknown intervention type {kind!r}; known: {sorted(_CLASSES)}")
    return _CLASSES[kind].from_dict(data)


class UnverifiedWarning(UserWarning):
    """A saved intervention from before dit-lens digested every setting: its settings cannot be verified."""


def settings_digest(data: dict) -> str:
    """Digest of a saved intervention: every key except ``"digest"`` (settings, and a Steer's vector with its
    coords and attrs), as canonical JSON, so editing any of them is detected on `Intervention.load`."""
    blob = json.dumps({k: v for k, v in data.items() if k != "digest"}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class EditContext:
    """What the runner tells a site edit about the rows it is given.

    Attributes:
        step: Denoising step (index of the transformer call).
        layer: Block index.
        site: The site being edited.
        halves: The guidance halves present in the rows, in row order (``("uncond", "cond")``
            or ``("cond",)``); each half holds `pairs` rows, one per pair of the batch.
        pairs: Pairs in the batch.
        original: Returns the unedited twins of the rows, in the same layout (for edits that copy
            from the original branch).
        seeds: The seed of each pair (empty where rows have no seed, e.g. inverted images); edits with
            one mask per seed pick theirs by it.
        prompts: The edited branch's prompt of each pair (edits that name words find their tokens in it).
        num_inference_steps: Steps T of the run.
        lens: The `dit_lens.Lens` being run (for its tokenizer and token grid).
    """

    step: int
    layer: int
    site: str
    halves: tuple[str, ...]
    pairs: int
    original: Callable[[], torch.Tensor]
    seeds: tuple[int, ...] = ()
    prompts: tuple[str, ...] = ()
    num_inference_steps: int = 0
    lens: Lens | None = None


class Intervention:
    """Base of every intervention. Subclasses are frozen dataclasses."""

    #: ``"site"``, ``"weights"`` (a site edit at an attention-weights site) or ``"latent"``.
    kind: ClassVar[str] = ""
    #: Name of what the intervention records while it runs (e.g. ``"gate"``), or None.
    record: ClassVar[str | None] = None
    #: Whether the edit reads the original branch (``ctx.original()``, a latent edit's twins); a run
    #: whose edits never do may leave the original rows out of the batch.
    reads_original: ClassVar[bool] = False

    def check(self, lens: Lens, num_inference_steps: int) -> None:
        """Raise a clear ValueError if this cannot run on `lens` with T steps."""

    def settings(self) -> dict:
        """Every setting, JSON-serialisable and small (large arrays digested), with ``"type"``."""
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {"type": type(self).__name__, **data}

    def to_dict(self) -> dict:
        """Everything needed to rebuild the value with `from_dict`."""
        return self.settings()

    @classmethod
    def from_dict(cls, data: dict) -> "Intervention":
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def is_identity(self) -> bool:
        """True when the edit leaves every value unchanged (e.g. strength 0); the runner skips it."""
        return False

    def save(self, path: str | Path) -> Path:
        """Write ``to_dict`` as JSON with a ``"digest"`` over all of it (atomically); refuses to overwrite an
        existing file."""
        path = Path(path)
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{path} exists; choose a new path or delete it first")
        data = self.to_dict()
        data["digest"] = settings_digest(data)
        write_atomic(path, json.dumps(data).encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Intervention":
        """Read a file written by `save`; ``Intervention.load`` takes any type, ``Steer.load`` a Steer.

        A file whose settings (or vector) no longer match its digest was edited or damaged and is
        refused. Files saved before digests existed still load, with an `UnverifiedWarning`.
        """
        path = Path(path)
        fix = "save the intervention again rather than editing the file"
        if not path.is_file():
            raise FileNotFoundError(f"no saved intervention at {path}")
        # parsed by the storage reader (clear errors for truncated, non-JSON or too deeply nested files); the
        # digest is this module's own `settings_digest`, so the key it would check is one no file holds
        data = read_record(path, what=f"the saved {cls.__name__}", fix=fix, key=_PARSE_ONLY, unsealed=True)
        if "digest" in data:
            if data["digest"] != settings_digest(data):
                raise ValueError(
                    f"{path} does not match its digest: its settings or vector were edited or damaged after it "
                    f"was saved; {fix}"
                )
            data = {k: v for k, v in data.items() if k != "digest"}
        else:
            warnings.warn(
                f"{path} was saved by an older dit-lens without a digest over its settings, so they cannot be "
                f"verified; check them (print the loaded value) and save it again to protect it",
                UnverifiedWarning, stacklevel=2,
            )
        if "type" not in data and cls is not Intervention:  # written before interventions named their type
            data = {**data, "type": cls.__name__}
        value = from_dict(data)
        if not isinstance(value, cls):
            raise ValueError(f"{path} holds a {type(value).__name__}, not a {cls.__name__}")
        return value


class SiteEdit(Intervention):
    """Replaces a site's output on the edited rows. Subclasses define ``site``, ``halves`` (and usually
    ``layers`` and ``steps``): their place is `at`, a `dit_lens.model.where.At` from which ``edit_layers(lens)``
    and ``edit_steps(T)`` (where and when it runs) follow; and

    - ``apply(h, ctx)``: ``h`` holds the edited rows of the chosen halves, ``(rows, tokens, C)`` at an
      output site or ``(rows, heads, queries, keys)`` at a weights site; returns the new rows (or
      None to leave them) and, if the class has a `record`, one value per row and token (or None).
    """

    site: str
    halves: str

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "weights" if self.site.endswith(".weights") else "site"

    @property
    def at(self) -> At:
        """Where the edit runs, from its own fields (``layers`` and ``steps`` None, all, where it has none)."""
        return At(self.site, getattr(self, "layers", None), getattr(self, "steps", None), self.halves)

    def edit_layers(self, lens: Lens) -> list[int]:
        """The blocks it edits on `lens` (``layers=None``: every block that has the site)."""
        return list(self.at.layers_in(lens))

    def edit_steps(self, num_inference_steps: int) -> list[int]:
        """The denoising steps it edits in a run of T steps."""
        return list(self.at.steps_in(num_inference_steps))

    def check_at(self, lens: Lens, num_inference_steps: int) -> None:
        """Raise a clear ValueError unless `at` fits `lens` and T (site, blocks, steps), naming this class."""
        self.at.resolve(lens, num_inference_steps, name=type(self).__name__)

    def apply(self, h: torch.Tensor, ctx: EditContext | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError


class LatentEdit(Intervention):
    """Acts on the edited branch's latents after each denoising step. Subclasses define
    ``apply_latents(step, original, edited, ctx)`` → (new edited latents, record or None), latents
    ``(pairs, C, H, W)``; ``ctx`` (an `EditContext`, its ``layer`` and ``site`` unused) tells the pairs'
    seeds and prompts and the run's step count. An edit that also moves the initial latents z_T
    (latent drifting) says so with `changes_initial` and defines ``apply_initial``."""

    kind: ClassVar[str] = "latent"
    reads_original: ClassVar[bool] = True

    @property
    def changes_initial(self) -> bool:
        """Whether `apply_initial` changes z_T (the runner calls it only then)."""
        return False

    def apply_initial(self, latents: torch.Tensor, ctx: EditContext | None = None) -> torch.Tensor:
        """The edited rows' z_T ``(pairs, C, H, W)`` before the sampler's ``init_noise_sigma``; identity by default."""
        return latents

    def apply_latents(self, step: int, original: torch.Tensor, edited: torch.Tensor,
                      ctx: EditContext | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class Guidance(Intervention):
    """Moves the edited branch's latents before each of its steps (``guided_steps(T)``) down the gradient
    of an energy of the denoiser's own forward pass at those latents. Subclasses define ``guided_steps``,
    ``layers_needed(lens)`` (blocks whose cross-attention weights the energy reads) and
    ``correct(step, latents, forward, ctx)`` → (new latents, record or None), where
    ``forward(latents)`` runs the denoiser on the edited rows' conditional prompts with gradients and
    returns the cross-attention weights ``{layer: (pairs, heads, queries, keys)}``; ``ctx`` tells the
    pairs' seeds and prompts (its ``layer`` and ``site`` are unused)."""

    kind: ClassVar[str] = "guidance"

    def guided_steps(self, num_inference_steps: int) -> list[int]:
        raise NotImplementedError

    def layers_needed(self, lens: Lens) -> list[int]:
        raise NotImplementedError

    def correct(self, step: int, latents: torch.Tensor, forward: Callable[[torch.Tensor], dict],
                ctx: EditContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class Composite(Intervention):
    """A value made of several interventions (``parts()``: site edits, latent edits, guidance), applied
    together; results record the composite's own settings. Switching a part off leaves it out."""

    kind: ClassVar[str] = "composite"

    def parts(self) -> list[Intervention]:
        raise NotImplementedError

    @property
    def is_identity(self) -> bool:
        return all(part.is_identity for part in self.parts())

    @property
    def reads_original(self) -> bool:  # type: ignore[override]
        return any(part.reads_original for part in self.parts())

    def check(self, lens: Lens, num_inference_steps: int) -> None:
        for part in self.parts():
            part.check(lens, num_inference_steps)


def flatten(edits: Any) -> list[Intervention]:
    """The interventions a run applies: each `Composite` replaced by its parts, in order."""
    return [part for e in edits for part in (e.parts() if isinstance(e, Composite) else [e])]


def check_where(name: str, layers: Any, steps: Any, halves: str) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """Validated ``(layers, steps)`` (sorted unique tuples or None) and halves, for a site edit's fields, in
    `dit_lens.model.where.At`'s words."""
    if halves not in HALVES:
        raise ValueError(f"{name}.halves must be one of {list(HALVES)}, got {halves!r}")
    return check_indices(f"{name}.layers", layers), check_indices(f"{name}.steps", steps)


def check_layers_fit(name: str, layers: list[int], lens: Lens) -> None:
    """Refuse blocks beyond `lens`'s (for interventions without a site, e.g. guidance), in `At`'s words."""
    deep = [layer for layer in layers if layer >= lens.num_layers]
    if deep:
        raise ValueError(f"{name}.layers {deep} do not exist: the model has {lens.num_layers} blocks; pass indices "
                         f"in 0..{lens.num_layers - 1}, or None for all")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
