"""Output folders in use: which processes run in a folder now (a study's, shared by every process running it).

Any number of processes may run one study in one folder at once (they share its cells), but a
folder is replaced by another study only when none runs there. Each process running a study holds
an OS lock on its own mark, ``.locks/.in-use.<pid>.lock`` inside the folder, for as long as it
runs (the kernel releases it if the process dies). Marks are taken and inspected only under the
folder's lock (``dit_lens.storage.exclusive(folder)``), so a replacement never slips in between a
claim and its mark.

Examples:
    >>> import tempfile
    >>> from dit_lens.storage import exclusive
    >>> folder = Path(tempfile.mkdtemp())
    >>> with exclusive(folder):
    ...     release = mark(folder)
    >>> others(folder)  # this process's own mark does not count
    []
    >>> release()
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from .locks import try_exclusive

__all__ = ["mark", "others"]

_MARK = re.compile(r"^\.in-use\.(\d+)\.lock$")
#: The folders this process marks now: ``{folder: [lock, depth]}`` (nested runs share one mark).
_HELD: dict[Path, list] = {}


def _target(folder: Path, pid: int) -> Path:
    return folder / ".locks" / f"in-use.{pid}"


def mark(folder: Path) -> Callable[[], None]:
    """Mark `folder` in use by this process (call holding ``exclusive(folder)``); returns the call that
    ends this use (the mark goes when every nested use has ended)."""
    key = Path(folder).expanduser().absolute()
    held = _HELD.get(key)
    if held is None:
        lock = try_exclusive(_target(key, os.getpid()))
        if lock is None:  # only this process takes this name: never held by another
            raise RuntimeError(f"{folder}: this process's in-use mark is held elsewhere")
        held = _HELD[key] = [lock, 0]
    held[1] += 1

    def release() -> None:
        held[1] -= 1
        if held[1] == 0:
            _HELD.pop(key, None)
            held[0].release()

    return release


def others(folder: Path) -> list[int]:
    """The processes other than this one that run a study in `folder` now (call holding
    ``exclusive(folder)``). Marks of processes that have finished are removed."""
    locks = Path(folder) / ".locks"
    if not locks.is_dir() or locks.is_symlink():
        return []
    busy = []
    for entry in sorted(locks.iterdir()):
        found = _MARK.match(entry.name)
        if found is None or int(found.group(1)) == os.getpid():
            continue
        lock = try_exclusive(_target(Path(folder), int(found.group(1))))
        if lock is None:
            busy.append(int(found.group(1)))
        else:  # a finished run's mark: nobody takes it but under the folder's lock, which the caller holds
            lock.release()
            entry.unlink(missing_ok=True)
    return busy
