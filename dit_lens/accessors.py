"""What a result says about itself: ``ds.lens`` on every dit-lens result, ``result.study`` on study results.

Results stay plain `xarray.Dataset` values; their behaviour is reached through xarray accessors, as
xarray's own ``ds.plot`` is. ``ds.lens.provenance`` is the model that made a result and the dit-lens
version (the attrs ``Lens.provenance()`` recorded), ``ds.lens.settings`` every other attr decoded (seeds,
steps, each edit's settings ...), ``ds.lens.describe()`` its edits in words. On a `run_study` result,
``result.study.pick()`` is the setting each pair and method picks, ``.floors``, ``.method_axes``,
``.metrics``, ``.extras`` and ``.declaration`` what the study declared and measured, ``.figure()`` its
summary figure. Every attr is read through `dit_lens.trace.attrs.read`, so results made before attrs
were typed read the same.

Importing this module registers both accessors. The package's face imports it, so any ``import dit_lens``
(or of any of its modules) registers them, also for a result read back with ``xarray.open_zarr``. It needs
xarray only (figures and words load their modules when asked for).

Examples:
    >>> ds = xr.Dataset(attrs={"model_source": "tiny", "dit_lens_version": "0.1.0", "seeds": "[0, 1]"})
    >>> ds.lens.provenance
    {'model_source': 'tiny', 'dit_lens_version': '0.1.0'}
    >>> ds.lens.settings
    {'seeds': [0, 1]}
    >>> rate = xr.DataArray([[0.5, 0.95]], dims=("pair", "alpha"), coords={"pair": ["a -> b"], "alpha": [1.0, 2.0]})
    >>> result = xr.Dataset({"flip_rate": rate, "flip_rate_low": rate - 0.1, "flip_rate_high": rate + 0.1})
    >>> result.study.floors
    {'flip_rate': 0.9}
    >>> [(pick["alpha"], pick["meets"]) for pick in result.study.pick(maximize="flip_rate")]
    [(2.0, True)]
"""

from __future__ import annotations

import copy
from numbers import Real
from typing import Any, Mapping, Sequence

import numpy as np
import xarray as xr

from .trace.attrs import PROVENANCE, read, typed

__all__ = ["DEFAULT_FLOORS", "LensAccessor", "StudyAccessor"]

#: What a setting must reach to count as working when a study declares no floors.
DEFAULT_FLOORS = {"flip_rate": 0.9}


def _plain(value: Any) -> Any:
    """An attr as a caller may keep and change: NumPy values (a netCDF round trip) as Python ones, a copy."""
    return typed(value) if isinstance(value, (np.ndarray, np.generic)) else copy.deepcopy(value)


@xr.register_dataset_accessor("lens")
class LensAccessor:
    """``ds.lens``: the provenance, settings and description of a result a dit-lens function made.

    Every property raises ValueError on a Dataset without provenance attrs (one dit-lens did not make).
    """

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def _attrs(self) -> Mapping[str, Any]:
        if not any(k in self._ds.attrs for k in PROVENANCE):
            raise ValueError(f"this Dataset was not made by dit-lens: it has no provenance attrs "
                             f"({', '.join(PROVENANCE)}); ds.lens reads the results of dit-lens functions "
                             f"(generate, capture, patching, run_study ...)")
        return self._ds.attrs

    @property
    def provenance(self) -> dict[str, Any]:
        """The model that made the result and the dit-lens version: the keys of ``Lens.provenance()``
        the result holds (all of them for results of this version)."""
        attrs = self._attrs()
        return {k: _plain(attrs[k]) for k in PROVENANCE if k in attrs}

    @property
    def settings(self) -> dict[str, Any]:
        """Every other attr, decoded: how the result was made (seeds, steps, guidance, edits' settings ...)."""
        attrs = self._attrs()
        return {str(k): _plain(read(attrs, k)) for k in attrs if k not in PROVENANCE}

    def describe(self) -> str:
        """The result's edits and sampler in words (`dit_lens.views.describe.describe_result`)."""
        self._attrs()
        from .views.describe import describe_result

        return describe_result(self._ds)


@xr.register_dataset_accessor("study")
class StudyAccessor:
    """``result.study``: what a `run_study` result declared and measured, the settings it picks, its figure.

    A study result holds each metric with its interval (``flip_rate``, ``flip_rate_low``,
    ``flip_rate_high``, ...) over ``pair``, ``method`` and every method's axes. Every member raises
    ValueError on a Dataset without ``flip_rate``.
    """

    def __init__(self, result: xr.Dataset) -> None:
        self._result = result

    def _checked(self) -> xr.Dataset:
        if "flip_rate" not in self._result.data_vars:
            raise ValueError(f"this Dataset is not a study result: it has no flip_rate variable (it has "
                             f"{sorted(map(str, self._result.data_vars))}); result.study reads what run_study returns")
        return self._result

    @property
    def floors(self) -> dict[str, float]:
        """What a setting must reach to count as working: the study's ``require`` (`DEFAULT_FLOORS` when
        the result names none)."""
        attrs = self._checked().attrs
        return {str(k): float(v) for k, v in (read(attrs, "require") if "require" in attrs else DEFAULT_FLOORS).items()}

    @property
    def method_axes(self) -> dict[str, list[str]]:
        """Each method's own axes (a method's cells repeat along the axes it does not have)."""
        result = self._checked()
        if "method_axes" in result.attrs:
            return {str(m): [str(a) for a in axes] for m, axes in read(result.attrs, "method_axes").items()}
        methods = [str(m) for m in result["method"].values] if "method" in result.dims else ["medsteer"]
        own = [str(d) for d in result["flip_rate"].dims if d not in ("method", "pair")]
        return {m: list(own) for m in methods}

    @property
    def metrics(self) -> list[str]:
        """The metrics the result holds, in order: the standard ones, the declared ones, method extras."""
        result = self._checked()
        if "metrics" in result.attrs:
            return [str(m) for m in read(result.attrs, "metrics")]
        return [str(v) for v in result.data_vars if f"{v}_low" in result]

    @property
    def extras(self) -> list[str]:
        """The metrics a method adds of its own (a vector's stability), neither standard nor declared."""
        return [str(m) for m in read(self._checked().attrs, "extras", [])]

    @property
    def declaration(self) -> dict[str, Any]:
        """The study that made the result (``Study.to_dict()``; ``Study.from_dict`` reads it back), or
        ``{}`` for a result that does not record one."""
        study = read(self._checked().attrs, "study", {})
        return _plain(study) if isinstance(study, dict) else {}

    def pick(self, *, require: Mapping[str, float] | None = None, maximize: str = "bg_ssim",
             methods: Sequence[str] | None = None) -> list[dict]:
        """For each pair and method, the setting a sweep picks: the best `maximize` among settings that work.

        Args:
            require: ``{metric: floor}`` every metric of a working setting reaches (default: `floors`,
                flip rate ≥ 0.9 unless the study says otherwise).
            maximize: The metric the pick maximizes among working settings.
            methods: The methods to pick for (default: every method of the result).

        Returns:
            One dict per (pair, method), pair by pair: ``method``, ``pair``, ``meets`` (whether the
            setting reaches every floor; when none does, the pick is the one closest to doing so, with
            the highest worst ratio metric / floor), the method's own setting coordinates and every
            metric as ``[value, low, high]``.

        Raises:
            ValueError: `require` is not a mapping of metric names to numbers, it or `maximize` names a
                metric the result does not hold, or `methods` a method it does not hold.
        """
        result = self._checked()
        if require is not None and not (isinstance(require, Mapping) and all(
                isinstance(v, Real) and not isinstance(v, bool) for v in require.values())):
            raise ValueError(f"require maps metric names to floors, e.g. {{'flip_rate': 0.9}}; got {require!r}")
        require = self.floors if require is None else {str(k): float(v) for k, v in require.items()}
        own = self.method_axes
        names = self.metrics
        if methods is not None:
            methods = [methods] if isinstance(methods, str) else list(methods)
            unknown = [m for m in methods if m not in own]
            if unknown:
                raise ValueError(f"methods: the result has no method {unknown}; it has {list(own)}")
        if "method" not in result.dims:
            result = result.expand_dims(method=list(own))
        picks = []
        for pair in result["pair"].values:
            for method in methods if methods is not None else list(own):
                cells = result.sel({"pair": pair, "method": method}).to_dataframe().reset_index()
                cells = cells[np.isfinite(cells["flip_rate"])]
                cells = cells.drop_duplicates(subset=own[method]) if own[method] else cells.iloc[:1]  # its own cells
                if cells.empty:
                    continue
                missing = [m for m in (*require, maximize) if m not in cells]
                if missing:
                    raise ValueError(f"the study result has no metric {missing} to pick by; it has "
                                     f"{sorted(map(str, result.data_vars))}")
                ok = np.ones(len(cells), bool)  # (cells,): reaches every floor
                for m, floor in require.items():
                    ok &= (cells[m] >= floor).to_numpy()
                if ok.any():
                    row = cells[ok].loc[cells[ok][maximize].idxmax()]
                else:
                    worst = np.min([cells[m] / floor for m, floor in require.items()], axis=0)
                    row = cells.iloc[int(np.argmax(worst))]
                pick = {"method": str(method), "pair": str(pair), "meets": bool(ok.any()),
                        **{d: _item(row[d]) for d in own[method]}}
                for m in names:
                    if m in cells:
                        pick[m] = [float(row[m]), float(row[f"{m}_low"]), float(row[f"{m}_high"])]
                picks.append(pick)
        return picks

    def figure(self) -> Any:
        """The study's summary figure (`dit_lens.views.study.study_figure`): a matplotlib Figure."""
        from .views.study import study_figure

        return study_figure(self._checked())


def _item(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
