"""Result folders of the experiments (adaptation, its downstream test, the long tail, the
downstream detector): each folder is claimed through `dit_lens.storage.claim` for its settings, and
each measured cell is a sealed JSON record written once, atomically, and reused.

Examples:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp()) / "run"
    >>> _ = claim_experiment(folder, "long_tail", {"seeds": 2}, entries=("cells",))
    >>> cached_json(folder / "cells" / "a.json", lambda: {"read": [1, 0]}, timed=False)
    {'read': [1, 0]}
    >>> cached_json(folder / "cells" / "a.json", lambda: {"read": "never computed again"})
    {'read': [1, 0]}
    >>> claim_experiment(folder, "long_tail", {"seeds": 3})
    Traceback (most recent call last):
    ...
    dit_lens.storage.folders.FolderClaimError: the long_tail folder ... made for other settings (seeds: 2 there, 3 now); ...
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from ..storage import Claim, claim, exclusive, read_record, write_record

__all__ = ["cached_json", "claim_experiment"]


def claim_experiment(folder: str | Path, kind: str, settings: dict, *, entries: Sequence[str] = (),
                     overwrite: bool = False) -> Claim:
    """Claim `folder` for the experiment `kind` made with `settings` (its identity), record `entries`
    (what the experiment writes there) and write the settings to ``<kind>.json``.

    Raises:
        FolderClaimError: the folder holds something dit-lens did not make, another kind of output, or
            (without `overwrite`) this experiment with other settings; nothing was changed.
    """
    folder = Path(folder)
    with exclusive(folder):
        out = claim(folder, kind, identity=settings, overwrite=overwrite, what=f"the {kind} folder")
        out.record(f"{kind}.json", *entries)
        write_record(folder / f"{kind}.json", settings)
    return out


def cached_json(path: Path, compute: Callable[[], dict], *, timed: bool = True) -> dict:
    """The cell at `path`, checked against its digest, or ``compute()`` written there (with
    ``"seconds"`` when `timed`) and returned. A damaged cell is an error naming the file."""
    if path.is_file():
        return read_record(path, what="the cell", fix="delete that file to measure the cell again")
    start = time.perf_counter()
    result = compute()
    if timed:
        result["seconds"] = round(time.perf_counter() - start, 1)
    write_record(path, result)
    return read_record(path, what="the cell")  # as a re-run reads it
