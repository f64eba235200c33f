"""The machinery behind `run_study`: one grid cell at a time, kept on disk, assembled at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from . import metrics as M
from ..views.explorer import write_explorer
from ..views.figures import pairs_figure
from ..interventions.generate import generate, reprompt
from ..interventions.steer import Steer
from .declaration import DYE_METRICS, STEER_METRICS, ConceptPair, Study, window_label, window_layers, window_steps
from ..readouts.vectors import concept_vector

__all__ = ["CellRunner"]

#: A steered image "keeps the polyp" when the segmenter still finds at least this many pixels.
MIN_LESION_PIXELS = 16


class CellRunner:
    """Runs and stores the cells of one study in `folder`."""

    def __init__(self, study: Study, lens: Any, oracle: Callable, segmenter: Callable, folder: Path,
                 *, progress: bool = True) -> None:
        self.study, self.lens, self.oracle, self.segmenter = study, lens, oracle, segmenter
        self.folder, self.progress = Path(folder), progress
        self._captures: dict[int, tuple[xr.Dataset, xr.Dataset]] = {}
        labels = list(getattr(oracle, "labels", []))
        for pair in study.pairs:
            for label in (pair.source, pair.target):
                if labels and label not in labels:
                    raise ValueError(f"label {label!r} of pair {pair.name!r} is not one of the oracle's labels {labels}")
        self.metrics = STEER_METRICS + (DYE_METRICS if study.dye else ())

    # -- cells ---------------------------------------------------------------------------

    def cells(self) -> list[dict]:
        s = self.study
        grid = [
            {"edit": "medsteer", "pair": p, "window": w, "steps": t, "alpha": a, "renormalize": r, "blend": b,
             "vector_seeds": n}
            for p in range(len(s.pairs)) for w in s.windows for t in s.step_windows for a in s.alphas
            for r in s.renormalize for b in s.blends for n in s.vector_seeds
        ]
        # a baseline depends on the pair and on blending (the same latent blending applies to it), not on steering
        grid += [{"edit": e, "pair": p, "blend": b} for e in s.baselines for p in range(len(s.pairs)) for b in s.blends]
        return grid

    def path(self, cell: dict) -> Path:
        blend = f"_b{cell['blend']:g}" if cell["blend"] else ""  # unblended cells keep their names
        if cell["edit"] != "medsteer":
            name = f"{cell['edit']}_p{cell['pair']}{blend}"
        else:
            w, t = ("-".join(f"{x:g}" for x in cell[axis]) for axis in ("window", "steps"))
            name = f"p{cell['pair']}_w{w}_t{t}_a{cell['alpha']:g}_r{int(cell['renormalize'])}{blend}_n{cell['vector_seeds']}"
        return self.folder / "cells" / f"{name}.json"

    def run(self) -> None:
        self._claim_folder()
        todo = [c for c in self.cells() if not self.path(c).exists()]
        done = len(self.cells()) - len(todo)
        if done:
            print(f"{self.study.name}: {done} finished cells reused from {self.folder}")
        for cell in tqdm(todo, desc=self.study.name, unit="cell", disable=not self.progress):
            result = self.run_cell(cell)
            _write_json_atomic(self.path(cell), {"cell": _jsonable(cell), "metrics": result})

    def run_cell(self, cell: dict) -> dict:
        s, lens = self.study, self.lens
        pair = s.pairs[cell["pair"]]
        seeds = [s.eval_seed_base + i for i in range(s.eval_seeds)]
        if cell["edit"] == "reprompt":
            out = reprompt(lens, pair.source_prompt, pair.target_prompt, seeds=seeds, blend=cell["blend"],
                           num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale, batch_size=8,
                           progress=False)
            return self.measure(out, pair)
        steer = self.steer(cell)
        out = generate(lens, pair.source_prompt, seeds=seeds, steer=steer, num_inference_steps=s.num_inference_steps,
                       guidance_scale=s.guidance_scale, blend=cell["blend"], batch_size=8, progress=False)
        result = self.measure(out, pair)
        full = self.vector(cell["pair"], max(s.vector_seeds))
        cos = float((steer.vector * full).sum("channel").mean())
        result["vector_cosine_to_largest"] = {"value": cos, "low": cos, "high": cos, "n": 1}
        return result

    def show(self, pick: dict, *, pairs: int = 8) -> Path:
        """Generate `pairs` pairs at a picked setting (`pick_settings`) with their gates and write the
        gate explorer and a pairs figure beside the result: ``best_p<pair>.html`` / ``.png``."""
        s = self.study
        index = [p.name for p in s.pairs].index(pick["pair"])
        cell = {"edit": "medsteer", "pair": index, **{k: pick[k] for k in ("alpha", "renormalize", "blend", "vector_seeds")},
                "window": next(w for w in s.windows if window_label(w) == pick["window"]),
                "steps": next(w for w in s.step_windows if window_label(w) == pick["steps"])}
        seeds = [s.eval_seed_base + i for i in range(min(pairs, s.eval_seeds))]
        out = generate(self.lens, s.pairs[index].source_prompt, seeds=seeds, steer=self.steer(cell),
                       num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                       record_gates=True, blend=cell["blend"], batch_size=8, progress=False)
        path = write_explorer(out, self.folder / f"best_p{index}.html")
        pairs_figure(out).savefig(self.folder / f"best_p{index}.png", dpi=110, bbox_inches="tight")
        return path

    def steer(self, cell: dict, **extra: Any) -> Steer:
        pair = self.study.pairs[cell["pair"]]
        return Steer(
            self.vector(cell["pair"], cell["vector_seeds"]), alpha=cell["alpha"],
            layers=window_layers(cell["window"], self.lens.num_layers),
            steps=window_steps(cell["steps"], self.study.num_inference_steps),
            renormalize=cell["renormalize"], name=pair.name, **extra,
        )

    def vector(self, pair_index: int, n: int) -> xr.DataArray:
        s = self.study
        if pair_index not in self._captures:
            from ..trace.capture import capture

            pair = s.pairs[pair_index]
            settings = dict(seeds=list(range(max(s.vector_seeds))), num_inference_steps=s.num_inference_steps,
                            guidance_scale=s.guidance_scale, batch_size=8)
            self._captures[pair_index] = (capture(self.lens, pair.positive(), **settings),
                                          capture(self.lens, pair.negative(), **settings))
        pos, neg = self._captures[pair_index]
        return concept_vector(pos.isel(seed=slice(0, n)), neg.isel(seed=slice(0, n)))

    # -- metrics -------------------------------------------------------------------------

    def measure(self, out: xr.Dataset, pair: ConceptPair) -> dict:
        probs = M.classify(out, self.oracle)
        masks = M.segment(out, self.segmenter)
        background = M.background_mask(masks)
        lpips = M.background_lpips(out, background)
        values = {
            "flip_rate": M.flips(probs, pair.source),
            "confidence_shift": M.confidence_drop(probs, pair.source),
            "bg_ssim": M.background_ssim(out, background),
            "bg_psnr": M.background_psnr(out, background).clip(max=100.0),
            "bg_lpips": lpips,
        }
        if self.study.dye:
            predicted = probs.sel(branch="steered").idxmax("class")
            lesion = masks.sel(branch="steered").sum(("y", "x")) >= MIN_LESION_PIXELS
            values["dye_detection_rate"] = M.dyed(probs)
            values["polyp_kept"] = ((predicted == "polyps") & lesion).astype(float)
        result = {k: M.estimate(v).to_dict() for k, v in values.items()}
        result["bg_lpips"]["status"] = lpips.attrs["status"]
        return result

    # -- results -------------------------------------------------------------------------

    def assemble(self) -> xr.Dataset:
        s = self.study
        methods = ["medsteer", *s.baselines]
        coords = {
            "edit": methods, "pair": [p.name for p in s.pairs], "window": [window_label(w) for w in s.windows],
            "steps": [window_label(w) for w in s.step_windows],
            "alpha": list(s.alphas), "renormalize": list(s.renormalize), "blend": list(s.blends),
            "vector_seeds": list(s.vector_seeds),
        }
        shape = tuple(len(v) for v in coords.values())
        names = list(self.metrics) + ["vector_cosine_to_largest"]
        arrays = {f"{m}{suffix}": np.full(shape, np.nan) for m in names for suffix in ("", "_low", "_high", "_n")}
        status = set()
        for cell in self.cells():
            record = json.loads(self.path(cell).read_text())["metrics"]
            if cell["edit"] == "medsteer":
                index = (0, cell["pair"], s.windows.index(tuple(cell["window"])),
                         s.step_windows.index(tuple(cell["steps"])), s.alphas.index(cell["alpha"]),
                         s.renormalize.index(cell["renormalize"]), s.blends.index(cell["blend"]),
                         s.vector_seeds.index(cell["vector_seeds"]))
            else:  # a baseline does not depend on the steering settings: it fills its row at its blend
                index = (methods.index(cell["edit"]), cell["pair"], slice(None), slice(None), slice(None), slice(None),
                         s.blends.index(cell["blend"]))
            for m, est in record.items():
                status.add(est.get("status", "")) if m == "bg_lpips" else None
                for suffix, key in (("", "value"), ("_low", "low"), ("_high", "high"), ("_n", "n")):
                    arrays[f"{m}{suffix}"][index] = est[key]
        ds = xr.Dataset({k: (tuple(coords), v) for k, v in arrays.items()}, coords=coords)
        if not s.baselines:
            ds = ds.isel(edit=0, drop=True)
        ds.attrs.update(self.lens.provenance())
        ds.attrs.update(
            study=json.dumps(s.to_dict()), folder=str(self.folder),
            window_layers=json.dumps({window_label(w): window_layers(w, self.lens.num_layers) for w in s.windows}),
            step_window_steps=json.dumps({window_label(w): window_steps(w, s.num_inference_steps) or "all"
                                          for w in s.step_windows}),
            eval_seeds=json.dumps([s.eval_seed_base + i for i in range(s.eval_seeds)]),
            bg_lpips_status="; ".join(sorted(x for x in status if x)),
        )
        _replace_zarr(ds, self.folder / "result.zarr")
        return ds

    def _claim_folder(self) -> None:
        """Refuse a folder whose cells mean something else; record this declaration in it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        declaration = self.folder / "study.json"
        mine = _jsonable({"study": self.study.to_dict(), "model_fingerprint": self.lens.fingerprint,
                          "metrics_version": M.METRICS_VERSION})
        if declaration.exists():
            theirs = json.loads(declaration.read_text())
            try:
                context = Study.from_dict(theirs["study"]).cell_context()
            except (KeyError, TypeError, ValueError):
                context = None
            if theirs.get("metrics_version", 1) != M.METRICS_VERSION:
                why = f"was measured with metrics version {theirs.get('metrics_version', 1)} (this is {M.METRICS_VERSION})"
            elif context != self.study.cell_context() or theirs.get("model_fingerprint") != self.lens.fingerprint:
                why = "holds another study or model (pairs, seeds, sampler or weights differ)"
            else:
                why = None
            if why:
                raise ValueError(f"{self.folder} {why}; pass a new out= folder (nothing was changed)")
        _write_json_atomic(declaration, mine)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _replace_zarr(ds: xr.Dataset, path: Path) -> None:
    """Write the assembled result (derived from the cells, so replacing it loses nothing)."""
    import shutil

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    ds.to_zarr(tmp, mode="w", zarr_format=2)  # format 3 warns on string coordinates
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
