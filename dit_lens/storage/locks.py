"""Many processes, one output: locks, atomic files, stale temporaries and folders dit-lens owns.

Every place where dit-lens writes a result that another process may write at the same time (a
capture store, a study folder, a study cell) takes an exclusive lock first (`exclusive`, an OS file
lock from the ``filelock`` package: released by the kernel when its holder dies, so a crash never
leaves a stale lock). A process that finds the lock held waits for it, saying so on stderr, and then
reads what the other process wrote; with a ``timeout`` it raises `BusyError` instead of waiting
longer. Files are written beside their destination under a name unique to the writing process and
renamed into place (`write_atomic`), so a reader never sees half a file; temporaries left by dead
processes are removed (`remove_stale_temporaries`).

Output folders are claimed through `dit_lens.storage.folders.claim`, which holds these locks.

Examples:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with exclusive(folder / "result.zarr"):
    ...     write_atomic(folder / "cell.json", b"{}")
    >>> sorted(p.name for p in folder.iterdir())
    ['.result.zarr.lock', 'cell.json']
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

__all__ = ["BusyError", "exclusive", "lock_path", "remove_stale_temporaries", "temporary_name", "try_exclusive",
           "write_atomic"]


class BusyError(RuntimeError):
    """Another process holds the lock on an output for longer than the caller was willing to wait."""


def lock_path(target: Path) -> Path:
    """The lock file of `target`: hidden, beside it (``.NAME.lock``)."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def exclusive(target: str | Path, *, timeout: float | None = None) -> Iterator[None]:
    """Hold the exclusive lock on `target` (which need not exist) for the ``with`` body.

    Waits while another process holds it (a note on stderr says so after a moment); raises
    `BusyError` after `timeout` seconds if given.
    """
    target = Path(target)
    lock = _file_lock(target)
    try:
        lock.acquire(timeout=0.5)
    except Timeout:
        print(f"dit-lens: {target} is being written by another process; waiting for it to finish "
              f"(its results are then reused)", file=sys.stderr, flush=True)
        try:
            lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout - 0.5))
        except Timeout:
            raise BusyError(f"{target} is busy: another dit-lens process has been writing it for over "
                            f"{timeout:g} s; wait for it to finish and run again (its finished work is "
                            f"reused), or pass another output path") from None
    try:
        yield
    finally:
        lock.release()


def try_exclusive(target: str | Path) -> FileLock | None:
    """The lock on `target` if it is free now (release it with ``.release()``), else None."""
    lock = _file_lock(Path(target))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def _file_lock(target: Path) -> FileLock:
    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_path(target)))


def temporary_name(target: Path) -> Path:
    """Where this process builds `target` before renaming it into place: ``.NAME.PID.tmp``."""
    return target.parent / f".{target.name}.{os.getpid()}.tmp"


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` durably (flushed to disk) and atomically (a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove ``.NAME.PID.tmp`` (and ``.NAME.PID.old``) left beside `target` by processes that
    are gone; returns what was removed. Those of live processes are kept."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.(tmp|old)$")
    removed = []
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match and not _alive(int(match.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier process that had this pid (this one is not writing it)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
