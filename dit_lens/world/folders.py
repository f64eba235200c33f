"""Result folders of the world's experiments (adaptation, its downstream test, the long tail): a folder is
claimed by its settings, and each measured cell is a JSON file written once, atomically, and reused."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from ..storage.locks import write_atomic

__all__ = ["cached_json", "claim_settings"]


def claim_settings(folder: str | Path, record: str, settings: dict, what: str) -> Path:
    """Make `folder` (created if missing) hold `what` with `settings`, recorded in ``folder/record``.

    Raises:
        FileExistsError: the folder already holds `what` with other settings (nothing is changed).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = json.loads(json.dumps(settings))  # as JSON keeps them: tuples become lists
    claim = folder / record
    if claim.is_file() and json.loads(claim.read_text()) != stored:
        raise FileExistsError(f"{folder} holds {what} with other settings; pick a new folder")
    write_atomic(claim, json.dumps(stored, indent=1).encode())
    return folder


def cached_json(path: Path, compute: Callable[[], dict], *, timed: bool = True) -> dict:
    """The cell at `path`, or ``compute()`` written there (with ``"seconds"`` when `timed`) and returned."""
    if path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    result = compute()
    if timed:
        result["seconds"] = round(time.perf_counter() - start, 1)
    write_atomic(path, json.dumps(result, indent=1).encode())
    return result
