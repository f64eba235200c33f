"""Linear probes with controls: where, over layers and steps, a concept is linearly decodable from a capture.

Method (Hewitt & Liang 2019). For every (layer, step) of a capture, a probe
``Pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced"))`` from scikit-learn
(features standardised with the training set's mean and spread) is trained on the runs of some seeds and
tested on the runs of the other seeds. The split is by seed, drawn once from `seed` and the same for every
cell, so a run is never in both sets (``train_seeds`` and ``test_seeds`` in the attrs). The *control task*
trains the same probe on the training labels shuffled within the training set (stratified so that each
true class is split across the control classes in the training set's proportions: the control labels are
independent of the true ones) and scores it against the true test labels: a probe that reads the concept
rather than memorising its training set is at chance there. One control probe is a random direction, which
reads a strongly separated concept above or below chance by luck; the control figures are the mean over
`n_controls` shuffles (drawn once, the same for every cell; ``control_spread`` is their standard deviation).
Selectivity = accuracy − control accuracy.

- Item level (``token_level=False``): one feature vector per run (the capture's token mean), one label per
  prompt. Intervals: percentile bootstrap over test runs (`dit_lens.metrics.estimates.estimate`); the
  selectivity's is the paired bootstrap of per-run (probe correct − control correct).
- Token level (``token_level=True``, a capture with ``reduce=None``): every image token is an example,
  labelled by `masks` downsampled to the token grid (a token is positive when at least `token_threshold`
  of its pixels are). Reported: token accuracy, balanced accuracy and ROC AUC, their controls, selectivity
  = balanced accuracy − control balanced accuracy (plain accuracy's chance level is the majority share),
  and per-token probability maps of the test runs. Intervals: bootstrap over test runs (a run's tokens
  resampled together). The fitted weights are kept, so `probe_maps` maps any other capture.

Examples:
    >>> import numpy as np, xarray as xr
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(2, 40, 1, 2, 8))  # (prompt, seed, step, layer, channel)
    >>> x[0, :, :, 1, 0] += 4.0  # prompt 0 is told apart at layer 1 only
    >>> ds = xr.Dataset({"attn2": (("prompt", "seed", "step", "layer", "channel"), x)},
    ...                 coords={"prompt": ["polyps", "normal"], "seed": range(40), "step": [0], "layer": [0, 1]})
    >>> result = probe(ds, labels={"polyps": 1, "normal": 0}, n_boot=200, progress=False)
    >>> result.accuracy.sel(step=0).values.round(2).tolist(), bool(result.selectivity.sel(layer=1, step=0) > 0.3)
    ([0.57, 0.95], True)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from ..metrics.estimates import estimate
from ..trace.attrs import PROVENANCE, typed
from .probe_inputs import capture_variable, item_labels, open_capture, pick, token_grid, token_labels

__all__ = ["probe", "probe_maps"]

TOKEN_METRICS = ("accuracy", "balanced_accuracy", "auc")


def probe(
    store_or_dataset: str | Path | xr.Dataset,
    *,
    labels: Mapping[str, Any] | Sequence[Any] | None = None,
    masks: Any = None,
    site: str | None = None,
    layers: Iterable[int] | None = None,
    steps: Iterable[int] | None = None,
    token_level: bool = False,
    token_threshold: float = 0.5,
    train_fraction: float = 0.5,
    C: float = 1.0,
    n_boot: int = 1000,
    n_controls: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> xr.Dataset:
    """Train and test a linear probe and its control task at every (layer, step) of a capture.

    Args:
        store_or_dataset: A capture store (a ``.zarr`` path) or the Dataset `dit_lens.capture` returns.
        labels: Item level: the class of each prompt, as ``{prompt: class}`` or one class per prompt in
            the store's order. Token level: leave out (the masks label the tokens).
        masks: Token level: ``(prompt, seed, H, W)`` or ``(item, H, W)`` booleans (items prompt-major, as
            the store orders its runs), H and W multiples of the token grid; e.g. the world's lesion
            masks or its segmenter's masks of the generated images.
        site: The captured variable (default: the store's only one); a capture of both guidance branches is
            probed on its conditional half.
        layers: Block indices to probe (default: all the store holds).
        steps: Denoising steps to probe (default: all).
        token_level: Probe image tokens (needs a capture with ``reduce=None``) instead of runs.
        token_threshold: The share of a token's pixels that must be in the mask for it to count as
            positive.
        train_fraction: Share of the seeds whose runs train the probes; the rest test them.
        C: Inverse L2 regularisation strength of the logistic regression.
        n_boot: Bootstrap resamples for the 95% intervals.
        n_controls: Shuffles of the control task, averaged.
        seed: Seeds the split, the control's shuffle and the bootstrap.
        progress: Show a tqdm bar over cells.

    Returns:
        A Dataset over ``(layer, step)`` with ``accuracy``, ``control_accuracy``, ``selectivity`` (each with
        ``_low`` and ``_high`` bounds), ``control_spread`` (the control's standard deviation over shuffles),
        ``train_accuracy`` and ``control_train_accuracy`` (how well each fits its own training set),
        ``converged``; at token level also ``balanced_accuracy``, ``auc``, their
        controls with bounds, ``probe_map`` ``(layer, step, prompt, seed, row, col)`` over the test runs, and the
        probe in the capture's units, ``weight`` ``(layer, step, channel)`` and ``bias``. Attrs: the
        capture's provenance, every setting, the split's seeds, the classes and scikit-learn's version.

    Raises:
        ValueError: a bad argument, a store without tokens at token level, labels that miss or add
            prompts, one class only, too few seeds to split, masks of the wrong shape.
    """
    ds, where = open_capture(store_or_dataset)
    da, site = capture_variable(ds, site, token_level)
    layers, steps = pick(da, "layer", layers), pick(da, "step", steps)
    _check_settings(token_threshold, train_fraction, C, n_boot, n_controls, seed)
    prompts, seeds = [str(p) for p in da["prompt"].values], [int(s) for s in da["seed"].values]
    rng = np.random.default_rng(seed)
    if len(seeds) < 2:
        raise ValueError(f"the capture holds {len(seeds)} seed; a probe needs at least 2 (train on some seeds, test "
                         f"on others); capture more seeds")
    order = rng.permutation(len(seeds))
    n_train = min(max(int(round(train_fraction * len(seeds))), 1), len(seeds) - 1)
    train, test = np.sort(order[:n_train]), np.sort(order[n_train:])  # seed indices
    if token_level:
        if labels is not None:
            raise ValueError("a token-level probe is labelled by masks=, not labels=; leave labels out")
        y = token_labels(masks, da, prompts, seeds, token_threshold)  # (prompt, seed, token) bool
        classes = [False, True]
    else:
        if masks is not None:
            raise ValueError("masks= label tokens; pass token_level=True to probe tokens, or leave masks out")
        y, classes = item_labels(labels, prompts)  # (prompt,) class indices
        y = np.broadcast_to(y[:, None], (len(prompts), len(seeds)))
    y_train, y_test = y[:, train].reshape(-1), y[:, test].reshape(-1)
    for part, values in (("training", y_train), ("test", y_test)):
        if len(np.unique(values)) < 2:
            raise ValueError(f"the {part} set holds one class only ({classes[int(values[0])]!r}); a probe needs "
                             f"both classes in both sets: add runs with the other class, or more seeds")
    shuffled = [_control_labels(y_train, rng) for _ in range(n_controls)]
    out = _cells(da, layers, steps, train, test, y_train, y_test, shuffled, C, n_boot, seed, progress, token_level)
    if token_level:
        rows, cols = token_grid(da)
        out["probe_map"] = out["probe_map"].assign_coords(prompt=prompts, seed=[seeds[j] for j in test],
                                                          row=range(rows), col=range(cols))
    out = out.assign_coords(layer=layers, step=steps)
    if "timestep" in da.coords:
        out = out.assign_coords(timestep=("step", da["timestep"].sel(step=steps).values))
    settings = {"store": where or "", "site": site, "layers": layers, "steps": steps, "token_level": token_level,
                "train_fraction": train_fraction, "C": C, "n_boot": n_boot, "n_controls": n_controls, "seed": seed,
                "train_seeds": [seeds[j] for j in train], "test_seeds": [seeds[j] for j in test],
                "classes": [str(c) for c in classes]}
    if token_level:
        settings |= {"token_threshold": token_threshold, "token_labels": "mask share of a token's pixels >= threshold",
                     "selectivity_of": "balanced_accuracy - control_balanced_accuracy"}
    else:
        named = [labels[p] for p in prompts] if isinstance(labels, Mapping) else list(labels)
        settings |= {"labels": {p: str(v) for p, v in zip(prompts, named)},
                     "selectivity_of": "accuracy - control_accuracy"}
    out.attrs = _attrs(ds, settings)
    return out


def probe_maps(result: xr.Dataset, runs: Any, *, layer: int, step: int, prompts: Sequence[str] | None = None,
               seeds: Iterable[int] | None = None) -> xr.DataArray:
    """The lesion probability of every image token of every run, from a token-level probe.

    Args:
        result: What ``probe(..., token_level=True)`` returned.
        runs: A token capture (``reduce=None``) of the same model and site (a store path or Dataset), or a
            `dit_lens.Lens`: then `prompts` × `seeds` are captured at `layer` with the probe's capture settings.
        layer, step: The probe's cell to apply.
        prompts, seeds: The runs to map, with a Lens.

    Returns:
        DataArray ``(prompt, seed, row, col)`` in [0, 1] (row-major token grid).

    Raises:
        ValueError: `result` is not a token-level probe, the capture has no tokens or comes from another
            model, or the cell was not probed.
    """
    if not isinstance(result, xr.Dataset) or "weight" not in result:
        raise ValueError("probe_maps needs a token-level probe: the Dataset of probe(..., token_level=True), which "
                         "holds its 'weight'")
    if layer not in result["layer"].values or step not in result["step"].values:
        raise ValueError(f"the probe has no cell (layer {layer}, step {step}); it has layers "
                         f"{result['layer'].values.tolist()} and steps {result['step'].values.tolist()}")
    site = result.attrs["site"]
    if hasattr(runs, "pipeline"):
        from ..trace.capture import capture

        if not prompts or seeds is None:
            raise ValueError("probe_maps(result, lens, ...) needs the runs: prompts=[...] and seeds=[...]")
        settings = {k: result.attrs.get(f"capture_{k}") for k in ("num_inference_steps", "guidance_scale")}
        if None in settings.values():
            raise ValueError("the probe's attrs hold no capture settings; capture the runs yourself (reduce=None) "
                             "with the settings of the probe's capture and pass that")
        runs = capture(runs, list(prompts), seeds=list(seeds), **settings, layers=[layer], site=site, reduce=None,
                       label="capture for probe maps")
    ds, _ = open_capture(runs)
    theirs, ours = ds.attrs.get("model_fingerprint"), result.attrs.get("model_fingerprint")
    if theirs is not None and ours is not None and theirs != ours:
        raise ValueError(f"the capture comes from model {theirs}, the probe was trained on model {ours}; capture "
                         f"the runs with the probe's model")
    da, _ = capture_variable(ds, site, True)
    x = da.sel(layer=layer, step=step).transpose("prompt", "seed", "token", "channel").values.astype(np.float64)
    cell = result.sel(layer=layer, step=step)
    logit = x @ cell["weight"].values + float(cell["bias"])  # (prompt, seed, token)
    rows, cols = token_grid(da)
    maps = (1.0 / (1.0 + np.exp(-logit))).reshape(*logit.shape[:2], rows, cols)
    return xr.DataArray(maps, dims=("prompt", "seed", "row", "col"), name="probe_map",
                        coords={"prompt": da["prompt"].values, "seed": da["seed"].values, "row": range(rows),
                                "col": range(cols)},
                        attrs={"layer": int(layer), "step": int(step), **dict(result.attrs)})


def _fit(x: np.ndarray, y: np.ndarray, C: float) -> tuple[Any, bool]:
    """A fitted standardised logistic-regression probe and whether lbfgs converged."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=1000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    return model, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _slabs(da: xr.DataArray, layers: list[int], steps: list[int], progress: bool, name: str):
    """``(step, layer, values (prompt, seed[, token], channel))`` cell by cell: a step's layers read at once from
    a token-mean capture, one cell at a time from a token capture (whose chunks are cells)."""
    def read(t: int, chosen: list[int]) -> np.ndarray:
        values = da.sel(step=t, layer=chosen).transpose("layer", "prompt", "seed", ...).values.astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"the capture holds NaN or inf values at step {t}: unfinished or diverged runs; "
                             f"finish the capture (dit_lens.capture with the same store) first")
        return values

    quiet = {} if progress else {"disable": True}  # with progress, TQDM_DISABLE=1 still silences it
    with tqdm(total=len(layers) * len(steps), unit="cell", desc=name, **quiet) as bar:
        for t in steps:
            slab = None if "token" in da.dims else read(t, layers)
            for k, layer in enumerate(layers):
                yield t, layer, slab[k] if slab is not None else read(t, [layer])[0]
                bar.update()


def _cells(da, layers, steps, train, test, y_train, y_test, shuffled, C, n_boot, seed, progress, token) -> xr.Dataset:
    """Fit the probe and its controls at every cell; their figures as ``(layer, step[, ...])`` arrays."""
    grid: dict[str, np.ndarray] = {}

    def put(name: str, i: int, j: int, value: Any) -> None:
        grid.setdefault(name, np.zeros((len(layers), len(steps), *np.shape(value))))[i, j] = value

    if not token and "token" in da.dims:
        da = da.mean("token")
    width, runs = da.sizes["channel"], da.sizes["prompt"] * len(test)
    counts = np.vstack([np.ones(runs), np.random.default_rng(seed).multinomial(  # row 0: the test set itself
        runs, np.full(runs, 1.0 / runs), size=n_boot)])  # token level: resampled test runs, a run's tokens together
    for t, layer, x in _slabs(da, layers, steps, progress, "probe tokens" if token else "probe"):
        i, j = layers.index(layer), steps.index(t)
        x_train, x_test = x[:, train].reshape(-1, width), x[:, test].reshape(-1, width)
        model, ok = _fit(x_train, y_train, C)
        controls = [_fit(x_train, labels, C) for labels in shuffled]
        put("converged", i, j, ok and all(done for _, done in controls))
        put("train_accuracy", i, j, np.mean(model.predict(x_train) == y_train))
        put("control_train_accuracy", i, j, np.mean([np.mean(c.predict(x_train) == labels)
                                                     for (c, _), labels in zip(controls, shuffled)]))
        if token:
            figures, spread, prob = _token_figures(model, [c for c, _ in controls], x_test, y_test, counts)
            scaler, logistic = model[0], model[1]
            put("weight", i, j, logistic.coef_[0] / scaler.scale_)  # the probe in the capture's units
            put("bias", i, j, logistic.intercept_[0] - float(grid["weight"][i, j] @ scaler.mean_))
            put("probe_map", i, j, prob)
        else:
            correct = model.predict(x_test) == y_test
            each = np.array([c.predict(x_test) == y_test for c, _ in controls])  # (shuffle, test run)
            spread = each.mean(1).std()
            per_run = (correct, each.mean(0), correct - each.mean(0))  # control: the share of control probes right
            figures = {name: estimate(v.astype(float), resamples=n_boot, seed=seed)
                       for name, v in zip(("accuracy", "control_accuracy", "selectivity"), per_run)}
            figures = {name: (e.value, e.low, e.high) for name, e in figures.items()}
        put("control_spread", i, j, spread)
        for name, (value, low, high) in figures.items():
            put(name, i, j, value), put(f"{name}_low", i, j, low), put(f"{name}_high", i, j, high)
    grid["converged"] = grid["converged"].astype(bool)
    data = {k: (("layer", "step"), v) for k, v in grid.items() if v.ndim == 2}
    if token:
        rows, cols = token_grid(da)
        data["weight"] = (("layer", "step", "channel"), grid["weight"])
        shape = (len(layers), len(steps), da.sizes["prompt"], len(test), rows, cols)
        data["probe_map"] = (("layer", "step", "prompt", "seed", "row", "col"), grid["probe_map"].reshape(shape))
    return xr.Dataset(data)


def _token_figures(model, controls: list, x_test: np.ndarray, y_test: np.ndarray, counts: np.ndarray):
    """Token accuracy, balanced accuracy and AUC of the probe and of its controls (their mean, resample by
    resample), selectivity, each as (value, low, high); the controls' spread; the probe's test probabilities."""
    tokens = len(y_test) // counts.shape[1]
    prob = model.predict_proba(x_test)[:, 1]
    scores = [np.concatenate([_token_scores(y_test, p, np.repeat(counts[k : k + 100], tokens, axis=1))
                              for k in range(0, len(counts), 100)], axis=1)  # (metric, 1 + n_boot)
              for p in (prob, *(c.predict_proba(x_test)[:, 1] for c in controls))]
    real, fake = scores[0], np.mean(scores[1:], axis=0)
    rows = {**dict(zip(TOKEN_METRICS, real)), **{f"control_{m}": v for m, v in zip(TOKEN_METRICS, fake)},
            "selectivity": real[1] - fake[1]}
    figures = {name: (v[0], *np.nanpercentile(v[1:], [2.5, 97.5])) for name, v in rows.items()}
    return figures, np.std([s[1, 0] for s in scores[1:]]), prob


def _token_scores(y: np.ndarray, prob: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Accuracy, balanced accuracy and ROC AUC (ties count half) of `prob` against `y` under each row of
    token weights `w` ``(resamples, tokens)``; returns ``(3, resamples)``."""
    pred, pos = prob >= 0.5, y.astype(bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        n_pos, n_neg = (w * pos).sum(1), (w * ~pos).sum(1)
        tp, tn = (w * (pred & pos)).sum(1), (w * (~pred & ~pos)).sum(1)
        accuracy, balanced = (tp + tn) / (n_pos + n_neg), 0.5 * (tp / n_pos + tn / n_neg)
        order = np.argsort(prob, kind="stable")
        sorted_prob, sorted_pos, sorted_w = prob[order], pos[order], w[:, order]
        below = np.concatenate([np.zeros((len(w), 1)), np.cumsum(sorted_w * ~sorted_pos, axis=1)], axis=1)
        first = np.searchsorted(sorted_prob, sorted_prob, "left")  # each token's tie group in the sorted order
        last = np.searchsorted(sorted_prob, sorted_prob, "right")
        wins = below[:, first] + 0.5 * (below[:, last] - below[:, first])  # negatives under each token, ties half
        auc = (sorted_w * sorted_pos * wins).sum(1) / (n_pos * n_neg)
    return np.stack([accuracy, balanced, auc])


def _control_labels(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The control task's training labels: `y` shuffled, stratified so that each true class is split across the
    control classes in the training set's proportions. The control labels then carry no information about the
    true ones (a plain permutation correlates with them by chance, about 1/√n, which a strong signal amplifies)."""
    spread = np.sort(y)
    out = np.empty_like(y)
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        picks = ((np.arange(len(members)) + 0.5) * len(y) / len(members)).astype(int)  # evenly over the sorted labels
        out[members] = rng.permutation(spread[picks])
    return out


def _check_settings(token_threshold, train_fraction, C, n_boot, n_controls, seed) -> None:
    if not 0 < float(train_fraction) < 1:
        raise ValueError(f"train_fraction must be between 0 and 1 (exclusive), got {train_fraction!r}")
    if not 0 < float(token_threshold) <= 1:
        raise ValueError(f"token_threshold must be in (0, 1], got {token_threshold!r}")
    if not float(C) > 0:
        raise ValueError(f"C must be positive, got {C!r}")
    if int(n_boot) < 1 or int(n_controls) < 1 or int(seed) < 0:
        raise ValueError(f"n_boot and n_controls must be at least 1 and seed non-negative, got {n_boot!r}, "
                         f"{n_controls!r} and {seed!r}")


def _attrs(ds: xr.Dataset, settings: dict) -> dict:
    """The capture's provenance (model, capture key and settings), the probe's settings and the versions."""
    import sklearn

    from ..version import __version__

    attrs = {k: ds.attrs[k] for k in (*PROVENANCE, "capture_key", "token_grid") if k in ds.attrs}
    attrs |= {k: v for k, v in ds.attrs.items() if str(k).startswith("capture_")}
    return typed(attrs | settings | {
        "probe": "Pipeline(StandardScaler(), LogisticRegression(C, class_weight='balanced', max_iter=1000))",
        "control": "training labels shuffled within the training set, stratified by true class; scored on the "
                   "true test labels; mean over n_controls shuffles",
        "intervals": "95% percentile bootstrap over test runs",
        "sklearn_version": sklearn.__version__, "dit_lens_version": __version__,
    })
