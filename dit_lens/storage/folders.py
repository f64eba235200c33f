"""Output folders dit-lens owns: claimed once, marked, and emptied only of what dit-lens recorded writing.

Every output folder (a study, a fine-tune, a demo, an experiment of the embedded world) is claimed
with `claim` before anything is written into it. A folder is claimed when it does not exist, is
empty, or carries dit-lens's marker (`MARKER`) for the same kind of output. Anything else is
refused untouched, whatever ``overwrite`` says: dit-lens never writes into, or removes from, a
folder it did not make.

The marker is a sealed JSON record (`dit_lens.storage.records.write_record`) holding the kind of
output, the identity it was made for (settings, fingerprints: values, never how a path was spelled),
and the entries dit-lens wrote there (`Claim.record`). A folder made for another identity is refused,
naming what differs; with ``overwrite=True`` its recorded entries, and only those, are removed first,
each resolved to a path inside the folder (an entry that names a path outside it, or a link, is never
followed). A marker that fails its digest is refused: it may have been edited to point elsewhere.

Call `claim` holding ``exclusive(folder)`` (`claimed` does both), so two processes never claim one
folder for different outputs.

Examples:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> out = claimed(root / "run", "demo", identity={"seed": 0})
    >>> out.state
    'new'
    >>> _ = out.write("summary.json", b"{}")
    >>> claimed(root / "run", "demo", identity={"seed": 1})
    Traceback (most recent call last):
    ...
    dit_lens.storage.folders.FolderClaimError: .../run holds a dit-lens demo made for other settings (seed: ...
    >>> again = claimed(root / "run", "demo", identity={"seed": 1}, overwrite=True)
    >>> again.state, sorted(p.name for p in (root / "run").iterdir())
    ('replaced', ['.dit-lens'])
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from .locks import exclusive, write_atomic
from .records import DamagedError, MissingError, StorageError, digest, jsonable, read_record, write_record

__all__ = ["MARKER", "Claim", "FolderClaimError", "check_files", "claim", "claimed", "differences", "file_digests"]

#: The file dit-lens puts in every output folder it owns (a sealed JSON record).
MARKER = ".dit-lens"
_IGNORED = (".lock", ".tmp")  # lock files and temporaries of writers: not content


class FolderClaimError(StorageError):
    """An output folder holds something dit-lens did not make, or another output; it was not touched."""


@dataclass
class Claim:
    """A claimed output folder.

    Attributes:
        path: The folder.
        kind: What kind of output it holds.
        identity: What it was made for.
        state: ``"new"`` (just claimed), ``"reused"`` (made earlier for this identity) or ``"replaced"``
            (made for another identity; its recorded entries were removed).
        files: The entries dit-lens recorded writing (paths relative to the folder).
    """

    path: Path
    kind: str
    identity: Any
    state: str
    files: list[str] = field(default_factory=list)
    created_utc: str = ""

    def _save(self) -> None:
        write_record(self.path / MARKER, {"kind": self.kind, "made_by": "dit-lens", "identity": self.identity,
                                          "files": sorted(set(self.files)), "created_utc": self.created_utc,
                                          "version": _version()})

    def record(self, *entries: str | Path) -> None:
        """Record `entries` (files or folders dit-lens makes, relative to the folder) as dit-lens's
        before writing them, so a later replacement removes them and nothing else."""
        names = [inside(self.path, entry) for entry in entries]
        new = [n for n in names if n not in self.files]
        if new:
            self.files.extend(new)
            self._save()

    def write(self, entry: str | Path, data: bytes) -> Path:
        """Record `entry` and write `data` there atomically."""
        self.record(entry)
        target = self.path / inside(self.path, entry)
        write_atomic(target, data)
        return target

    def remove_recorded(self) -> list[str]:
        """Remove every recorded entry (only inside the folder; a link is removed, never followed);
        returns what was removed. A recorded folder (``cells``, ``vector.zarr``) is dit-lens's whole,
        and is removed with what it holds."""
        removed = []
        root = self.path.resolve()
        for name in list(self.files):
            target = self.path / name
            if target.is_symlink() or target.is_file():
                if target.parent.resolve().is_relative_to(root):
                    target.unlink()
                    removed.append(name)
            elif target.is_dir() and target.resolve().is_relative_to(root) and target.resolve() != root:
                shutil.rmtree(target)
                removed.append(name)
        self.files = []
        self._save()
        return removed


def inside(folder: Path, entry: str | Path) -> str:
    """`entry` as a clean relative path inside `folder`; an absolute path, ``..``, or the marker is refused."""
    text = str(entry)
    parts = PurePosixPath(text.replace(os.sep, "/")).parts
    if not text or Path(text).is_absolute() or ".." in parts or parts[:1] == (MARKER,) or not parts:
        raise FolderClaimError(f"{entry!r} is not a path inside the output folder {folder}; dit-lens writes and "
                               f"removes only paths inside the folders it owns")
    return "/".join(parts)


def claim(folder: str | Path, kind: str, *, identity: Any = None, overwrite: bool = False,
          what: str | None = None) -> Claim:
    """Claim `folder` for an output of `kind` made for `identity`, or refuse it untouched.

    Args:
        folder: The output folder (created if it does not exist).
        kind: What it holds ("study", "finetune", "demo", ...).
        identity: What makes two outputs the same (JSON-able values: settings, fingerprints).
        overwrite: Replace a dit-lens folder of this kind made for another identity (its recorded
            entries are removed). Never applies to folders dit-lens did not make.
        what: How messages name the folder (e.g. ``"--out"``).

    Raises:
        FolderClaimError: the folder holds something dit-lens did not make, another kind of output,
            a damaged marker, or (without `overwrite`) an output made for another identity.
    """
    folder = Path(folder).expanduser()
    name = f"{what} {folder}" if what else str(folder)
    identity = jsonable(identity)
    if folder.is_symlink() and not folder.exists():
        raise FolderClaimError(f"{name} is a link to {os.readlink(folder)}, which does not exist; pass a real "
                               f"folder (nothing was changed)")
    if folder.exists() and not folder.is_dir():
        raise FolderClaimError(f"{name} is a file, not a folder; pass a new folder for the {kind} (nothing was changed)")
    marker = folder / MARKER
    if marker.exists() or marker.is_symlink():
        return _reclaim(folder, name, kind, identity, overwrite)
    content = sorted(p.name for p in folder.iterdir() if not p.name.endswith(_IGNORED)) if folder.is_dir() else []
    if content:
        shown = ", ".join(content[:5]) + (", ..." if len(content) > 5 else "")
        raise FolderClaimError(
            f"{name} is not empty and was not made by dit-lens (it holds {shown}); dit-lens writes only into new "
            f"or empty folders, which it then marks as its own, and never into others, even with overwrite: pass "
            f"a new folder (nothing was changed)")
    folder.mkdir(parents=True, exist_ok=True)
    out = Claim(folder, kind, identity, "new", created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    out._save()
    return out


def _reclaim(folder: Path, name: str, kind: str, identity: Any, overwrite: bool) -> Claim:
    fix = ("pass a new folder; if this one is yours to discard, delete it yourself (dit-lens removes nothing "
           "it cannot vouch for; nothing was changed)")
    if (folder / MARKER).is_symlink():
        raise FolderClaimError(f"{name}: its marker {MARKER} is a link, not a file dit-lens wrote; {fix}")
    try:
        record = read_record(folder / MARKER, what="the marker of", fix=fix)
    except (DamagedError, MissingError) as err:
        raise FolderClaimError(str(err)) from None
    found = record.get("kind")
    if found != kind:
        raise FolderClaimError(f"{name} holds a dit-lens {found or 'unknown'} output, not a {kind}; pass another "
                               f"folder (nothing was changed)")
    files = record.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise FolderClaimError(f"{name}: its marker lists no valid entries; {fix}")
    out = Claim(folder, kind, record.get("identity"), "reused", list(files), str(record.get("created_utc", "")))
    for entry in files:
        inside(folder, entry)  # a sealed marker never names another place; refuse if it does
    if identity is not None and out.identity != identity:
        diffs = "; ".join(f"{key}: {_short(old)} there, {_short(new)} now"
                          for key, old, new in differences(out.identity, identity)[:6])
        if not overwrite:
            raise FolderClaimError(f"{name} holds a dit-lens {kind} made for other settings ({diffs}); pass a new "
                                   f"folder, or overwrite=True (`--overwrite`) to replace what dit-lens wrote there "
                                   f"(nothing was changed)")
        out.remove_recorded()
        out.identity, out.state = identity, "replaced"
        out._save()
    return out


def claimed(folder: str | Path, kind: str, *, identity: Any = None, overwrite: bool = False,
            what: str | None = None, timeout: float | None = None) -> Claim:
    """`claim` under the folder's lock (``exclusive(folder)``)."""
    with exclusive(folder, timeout=timeout):
        return claim(folder, kind, identity=identity, overwrite=overwrite, what=what)


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for each leaf where two JSON-like values differ."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        return [diff for key in sorted(set(old) | set(new), key=str)
                for diff in differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [(prefix.rstrip(".") or "value", old, new)]


def _short(value: Any, limit: int = 48) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dit-lens")
    except PackageNotFoundError:
        return "unknown"


def file_digests(folder: Path, entries: list[str]) -> dict[str, str]:
    """``{relative path: digest}`` of every file in `entries` (files or folders inside `folder`): what a
    sealed record lists to vouch for files a library wrote (adapters, pipelines)."""
    out = {}
    for entry in entries:
        target = Path(folder) / inside(Path(folder), entry)
        for file in sorted(target.rglob("*")) if target.is_dir() else [target]:
            if file.is_file():
                rel = file.relative_to(folder).as_posix()
                out[rel] = _file_digest(file, rel)
    return out


def check_files(folder: Path, files: Mapping[str, str], *, record: str, fix: str, what: str = "folder") -> None:
    """Check every file a sealed `record` lists (``{relative path: digest}``, from `file_digests`).

    Raises:
        DamagedError: a listed file is missing or changed.
    """
    folder = Path(folder)
    for rel, sealed in sorted(files.items()):
        target = folder / inside(folder, rel)
        if not target.is_file():
            raise DamagedError(f"{target} is missing: the {what} {folder} is damaged (its {record} lists that "
                               f"file); {fix}")
        if _file_digest(target, rel) != sealed:
            raise DamagedError(f"{target} fails its digest in {folder / record} (it changed after dit-lens wrote "
                               f"it); {fix}")


def _file_digest(path: Path, rel: str) -> str:
    import numpy as np

    return digest({"file": rel}, {"bytes": np.frombuffer(path.read_bytes(), np.uint8)})
