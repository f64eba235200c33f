"""`run_study`: run a declared `Study`'s cells with the cell runner and assemble the labelled result.

The declaration (`dit_lens.study.declaration`) says what to measure and knows nothing of how cells run;
this module, beside the cell runner (`dit_lens.study.cells`), runs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import xarray as xr

from ..scale.executors import RayExecutor, as_executor
from ..storage.cache import cache_root
from .cells import CellRunner
from .declaration import Study

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["run_study", "study_folder"]


def run_study(
    study: Study,
    lens: Lens,
    *,
    oracle: Callable,
    segmenter: Callable,
    out: str | Path | None = None,
    progress: bool = True,
    repair: bool = False,
    overwrite: bool = False,
    executor: Any = None,
) -> xr.Dataset:
    """Run every cell of `study` not already finished in `out`, and return the labelled result.

    Args:
        study: The declaration.
        lens: From `dit_lens.load`.
        oracle: Classifier: images ``(N, H, W, 3)`` → probabilities ``(N, K)``, with ``.labels``.
        segmenter: Images → boolean lesion masks ``(N, H, W)``.
        out: The result folder (default ``cache/studies/<name>-<key>``).
        progress: Show a progress bar over cells.
        repair: Recompute cells whose files are damaged (checksum mismatch) instead of refusing.
        overwrite: Replace another study held in `out`: only what dit-lens recorded writing there is
            removed, and never while another process runs a study in it. A folder dit-lens did not
            make is refused untouched whatever this says.
        executor: Where the cells run: ``None`` (this process) or ``"ray"`` / a
            `dit_lens.scale.RayExecutor` (Ray tasks on workers that each load the model once; the
            same cells, values and folder).

    Returns:
        Dataset with dims ``(method, pair, <every declared method's axes>)``; for each metric the
        variables ``<metric>``, ``<metric>_low``, ``<metric>_high`` and ``<metric>_n``. A method's
        cells repeat along the axes it does not have (re-prompting does not depend on α, so its
        row is the same at every α) and are NaN at values of its own axes it does not sweep.
        Attrs: the declaration, each method's axes, the measured metrics, the floors, provenance
        and the folder.
    """
    executor = as_executor(executor)
    if isinstance(executor, RayExecutor):
        executor.connect()  # an unreachable cluster is said before the folder is claimed
    runner = CellRunner(study, lens, oracle, segmenter, study_folder(study, lens, out), progress=progress,
                        repair=repair, overwrite=overwrite)
    with runner.in_use():  # no other study replaces the folder until its result is assembled
        runner.run(executor)
        return runner.assemble()


def study_folder(study: Study, lens: Lens, out: str | Path | None = None) -> Path:
    """Where `run_study` keeps `study`'s cells: `out`, or ``cache/studies/<name>-<key>``."""
    return Path(out) if out is not None else cache_root() / "studies" / f"{study.name}-{study.key(lens)}"
