"""A study's result from its cells: one Dataset ``(method, pair, <axes>)``, and where it is kept.

`assemble_cells` lays the cells' metric estimates (``value``, ``low``, ``high``, ``n``) out on one
grid: the methods' swept axes are dims, labelled as the axes label their values, and a method's cells
fill the axes it lacks. `replace_zarr` swaps the result on disk for a new one only once the new one is
complete. Running the cells and keeping them is `dit_lens.study.cells`.

Examples:
    >>> from dit_lens.methods import ConceptPair
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> from dit_lens.study.declaration import Study
    >>> study = Study("demo", pairs=(ConceptPair("polyps", "normal cecum", contexts=("An image of {}",)),),
    ...               methods={"reprompt": {}})
    >>> lens = load(build_pixart(PixArtSpec(num_layers=1)))
    >>> estimate = {"value": 0.5, "low": 0.25, "high": 0.75, "n": 4}
    >>> ds = assemble_cells(study, lens, [({"method": "reprompt", "pair": 0, "blend": 0.0},
    ...                                    {"flip_rate": estimate})], folder="studies/demo")
    >>> dict(ds.sizes), float(ds["flip_rate_high"].squeeze())
    ({'method': 1, 'pair': 1, 'blend': 1}, 0.75)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from .. import metrics as M
from ..methods import get
from ..storage import remove_stale_temporaries, temporary_name
from ..trace.attrs import typed
from .declaration import Study

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["assemble_cells", "replace_zarr"]

#: The fields of a cell's metric estimate, and the suffix of the result variable that holds each.
ESTIMATE_FIELDS = (("", "value"), ("_low", "low"), ("_high", "high"), ("_n", "n"))


def assemble_cells(study: Study, lens: Lens, records: list[tuple[dict, dict]], *, folder: str | Path) -> xr.Dataset:
    """The cells as one Dataset ``(method, pair, <axes>)``; a method's cells fill the axes it lacks.

    Args:
        study: The study the cells belong to.
        lens: The model they ran on (its provenance goes into the attrs; axes that resolve against a
            model, such as layer windows, record what their values meant on it).
        records: Per cell, ``(cell, metrics)``: the cell (``{"method", "pair", <axes>: value}``) and
            its metrics, ``{name: {"value", "low", "high", "n"[, "status"]}}``.
        folder: The study folder, recorded in the attrs.

    Returns:
        A variable per metric and per estimate field (``<metric>``, ``_low``, ``_high``, ``_n``), NaN
        where no cell gave it; the attrs hold the study, its axes and metrics and the model's provenance.
    """
    axes = {a.name: a for m in study.methods for a in get(m).axes}
    coords: dict[str, list] = {"method": list(study.methods), "pair": [p.name for p in study.pairs]}
    for name in study.axis_names():
        labels = [axes[name].label(v) for sweep in study.methods.values() if name in sweep for v in sweep[name]]
        coords[name] = list(dict.fromkeys(labels))
    shape = tuple(len(v) for v in coords.values())
    names = list(dict.fromkeys(m for _, metrics in records for m in metrics))
    arrays = {f"{m}{suffix}": np.full(shape, np.nan) for m in names for suffix, _ in ESTIMATE_FIELDS}
    status = set()
    for cell, metrics in records:
        index = (coords["method"].index(cell["method"]), cell["pair"],
                 *(coords[a].index(axes[a].label(cell[a])) if a in cell else slice(None) for a in study.axis_names()))
        for m, est in metrics.items():
            if m == "bg_lpips":
                status.add(est.get("status", ""))
            for suffix, key in ESTIMATE_FIELDS:
                arrays[f"{m}{suffix}"][index] = est[key]
    ds = xr.Dataset({k: (tuple(coords), v) for k, v in arrays.items()}, coords=coords)
    ds.attrs.update(lens.provenance())
    ds.attrs.update(
        study=typed(study.to_dict()), folder=str(folder),
        method_axes=typed({m: list(sweep) for m, sweep in study.methods.items()}),
        metrics=typed(names), require=typed(study.require),
        extras=typed([m for m in names if m not in (*M.STANDARD_METRICS, *(x.name for x in study.metrics))]),
        eval_seeds=[study.eval_seed_base + i for i in range(study.eval_seeds)],
        bg_lpips_status="; ".join(sorted(x for x in status if x)),
    )
    for name, axis in axes.items():  # what the values meant on this model and sampler (layer windows → blocks)
        if axis.resolve is not None:
            values = dict.fromkeys(v for sweep in study.methods.values() for v in sweep.get(name, ()))
            ds.attrs[f"{name}_resolved"] = typed(
                {str(axis.label(v)): axis.resolve(v, lens, study.num_inference_steps) for v in values})
    return ds


def replace_zarr(ds: xr.Dataset, path: Path) -> None:
    """Write the assembled result (derived from the cells, so replacing it loses nothing), with a
    checksum on every chunk; the old result is swapped out only once the new one is complete.
    Call it holding ``exclusive(folder)``."""
    from numcodecs import CRC32

    remove_stale_temporaries(path)
    tmp, old = temporary_name(path), path.parent / f".{path.name}.{os.getpid()}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    encoding = {name: {"filters": [CRC32()]} for name in ds.variables}
    ds.to_zarr(tmp, mode="w-", zarr_format=2, encoding=encoding)  # format 3 warns on string coordinates
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
