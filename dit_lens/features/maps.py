"""Feature maps: where on the image an SAE's features fire, per denoising step, and what a dashboard shows.

`sae_features` runs the model (the one traced loop, `dit_lens.trace.runner.traced_generate`) and encodes the
SAE's site at its blocks with the SAE, on the conditional half of the guidance batch (the half the SAE was
trained on): ``activation (prompt, seed, step, layer, feature, row, col)`` on the token grid, beside the
images. `feature_dashboard` reduces such maps to what a feature page shows: per-prompt (class) activation
rates and the top-activating images with their maps. `store_feature_means` reads a capture store through an
SAE cell by cell, for choosing features from captures without running the model again.

Examples:
    >>> import tempfile
    >>> from dit_lens import load, capture
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> from dit_lens.features.train import train_sae
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> folder = tempfile.mkdtemp()
    >>> _ = capture(lens, ["a polyp", "normal mucosa"], seeds=[0, 1, 2], num_inference_steps=2, reduce=None,
    ...             store=folder + "/tokens.zarr")
    >>> sae = train_sae(folder + "/tokens.zarr", k=4, expansion=2, tokens=2048, batch_size=64, progress=False)
    >>> maps = sae_features(sae, lens, ["a polyp"], seeds=[5], num_inference_steps=2, progress=False)
    >>> maps.activation.dims, maps.activation.shape
    (('prompt', 'seed', 'step', 'layer', 'feature', 'row', 'col'), (1, 1, 2, 2, 32, 4, 4))
    >>> board = feature_dashboard(maps, top=1)
    >>> board.rate.dims, board.top_map.dims
    (('feature', 'prompt'), ('feature', 'rank', 'row', 'col'))
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable, Sequence, TYPE_CHECKING

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from ..sampling import check_levels, noise_field, noised
from ..trace.attrs import typed
from ..trace.runner import Hook, branch_rows, check_prompts, check_seeds, scheduler_timesteps, traced_generate
from ..validate import check_int
from .sae import SAE

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["feature_dashboard", "image_features", "sae_features", "store_feature_means", "top_features"]


def sae_features(sae: SAE, lens: Lens, prompts: str | Sequence[str] | None = None, images: Any = None, *,
                 seeds: Iterable[int] = (0,), num_inference_steps: int = 20, guidance_scale: float = 4.5,
                 layers: Any = None, steps: Any = None, features: Any = None, noise_levels: Sequence[float] = (0.5,),
                 batch_size: int = 8, progress: bool = True) -> xr.Dataset:
    """Feature activations per image token, as maps, from runs of `prompts` × `seeds` (or of given `images`).

    Given `images` ``(n, H, W, 3)`` in [0, 1], each is encoded, noised to each of `noise_levels` with one noise
    field drawn from ``seeds[0]`` (shared by every image), and read in one conditional denoiser call per level
    under the one prompt `prompts` (default: the empty prompt): ``activation (item, level, layer, feature, row,
    col)`` (`image_features`).

    Args:
        sae: A trained `SAE` (`dit_lens.train_sae`); it must have been trained on `lens`'s model.
        lens: The `dit_lens.Lens` to run.
        prompts: One prompt or a list (with `images`: the one prompt of the denoiser calls, default empty).
        images: Images ``(n, H, W, 3)`` in [0, 1] to read instead of generating (`image_features`).
        seeds: Generator seeds (with `images`: the first draws the noise).
        num_inference_steps: Denoising steps T of the runs.
        guidance_scale: Classifier-free guidance scale.
        layers: Blocks to read (default: the SAE's); each must be one the SAE was trained on.
        steps: Steps to read (default: every step of the run).
        features: Feature indices to keep (default: all).
        noise_levels: With `images`: the noise levels in (0, 1] they are read at.
        batch_size: Runs per pipeline call.
        progress: Show a progress bar over batches.

    Returns:
        Dataset with ``activation (prompt, seed, step, layer, feature, row, col)`` (float32, k non-zero per
        token) and ``image (prompt, seed, y, x, rgb)``; attrs hold the lens's provenance, the SAE's folder,
        digest and quality, and every setting.

    Raises:
        ValueError: an SAE trained on another model (or width), a block it was not trained on, a feature index
            out of range.
    """
    sae.check_fits(lens, name="the SAE")
    seeds = check_seeds(seeds)
    if images is not None:
        if prompts is not None and not isinstance(prompts, str):
            raise ValueError("given images are read under one prompt: pass prompts='...' (a string) or None")
        return image_features(sae, lens, images, prompt=prompts or "", seed=seeds[0], noise_levels=noise_levels,
                              guidance_scale=guidance_scale, layers=layers, features=features)
    if prompts is None:
        raise ValueError("pass prompts to generate and read, or images= to read given images")
    prompts = check_prompts(prompts)
    layers = _layers(sae, layers)
    steps = tuple(range(num_inference_steps)) if steps is None else tuple(sorted({int(t) for t in steps}))
    if not steps or min(steps) < 0 or max(steps) >= num_inference_steps:
        raise ValueError(f"steps {list(steps)} are not steps of a run of {num_inference_steps} (0.."
                         f"{num_inference_steps - 1}); pass some of those, or None for all")
    chosen = torch.tensor(sae.check_features(range(sae.num_features) if features is None else features))
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    rows, cols = lens.token_grid
    cells = [(p, s) for p in range(len(prompts)) for s in range(len(seeds))]
    values = np.zeros((len(prompts), len(seeds), len(steps), len(layers), len(chosen), rows, cols), np.float32)
    images = np.zeros((len(prompts), len(seeds), *_image_shape(lens)), np.float32)
    step_at, layer_at = {t: i for i, t in enumerate(steps)}, {x: i for i, x in enumerate(layers)}
    guided = lens.guided(guidance_scale)
    for start in tqdm(range(0, len(cells), batch_size), desc="sae features", unit="batch", disable=not progress):
        batch = cells[start : start + batch_size]

        def visit(step: int, layer: int, h: torch.Tensor, batch=batch) -> None:
            z = sae.encode(branch_rows(h, "cond", len(batch), guided))[..., chosen]  # (runs, tokens, features)
            maps = z.transpose(1, 2).reshape(len(batch), len(chosen), rows, cols).cpu().numpy()
            for r, (p, s) in enumerate(batch):
                values[p, s, step_at[step], layer_at[layer]] = maps[r]

        out = traced_generate(lens, [prompts[p] for p, _ in batch], [seeds[s] for _, s in batch],
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              hooks=[Hook(sae.site, layers, visit, frozenset(steps))], output_type="np")
        for r, (p, s) in enumerate(batch):
            images[p, s] = out.images[r]
    timesteps = scheduler_timesteps(lens, num_inference_steps).astype(np.float64)[list(steps)]
    ds = xr.Dataset(
        {"activation": (("prompt", "seed", "step", "layer", "feature", "row", "col"), values),
         "image": (("prompt", "seed", "y", "x", "rgb"), images)},
        coords={"prompt": prompts, "seed": seeds, "step": list(steps), "timestep": ("step", timesteps),
                "layer": list(layers), "feature": chosen.tolist()})
    ds.attrs.update(lens.provenance())
    ds.attrs.update(readout="sae_features", site=sae.site, sae_folder=str(sae.folder or ""), sae_digest=sae.digest,
                    sae_k=sae.k, sae_features=sae.num_features, sae_fvu=sae.fvu, num_inference_steps=num_inference_steps,
                    guidance_scale=float(guidance_scale), seeds=typed(seeds), branch="cond")
    return ds


def _layers(sae: SAE, layers: Any) -> tuple[int, ...]:
    """The blocks to read: the SAE's (None), or some of them."""
    if layers is None:
        return sae.layers
    layers = tuple(sorted({int(x) for x in ([layers] if np.isscalar(layers) else layers)}))
    foreign = sorted(set(layers) - set(sae.layers))
    if foreign:
        raise ValueError(f"the SAE was trained on blocks {list(sae.layers)}, not {foreign}; read those blocks or "
                         f"train an SAE on them")
    return layers


def image_features(sae: SAE, lens: Lens, images: Any, *, prompt: str = "", seed: int = 0,
                   noise_levels: Sequence[float] = (0.5,), guidance_scale: float = 4.5, layers: Any = None,
                   features: Any = None) -> xr.Dataset:
    """Feature maps of given images: ``activation (item, level, layer, feature, row, col)`` and ``image (item, y, x,
    rgb)``.

    Each image is encoded (`dit_lens.sampling.encode`) and noised to each level with one noise field drawn from
    `seed` (the same for every image, so no map depends on the others in the batch): ε and v models at training
    timestep ``round(level · (N − 1))`` as ``√ᾱ·z + √(1 − ᾱ)·ε``, flow models at σ = level as
    ``(1 − σ)·z + σ·ε``.
    One conditional denoiser call per level under `prompt` is read at the SAE's site and blocks.
    """
    from ..sampling.denoiser import Denoiser
    from ..sampling.images import check_images, encode

    sae.check_fits(lens, name="the SAE")
    images = check_images(images, lens)
    levels = check_levels(noise_levels)
    layers = _layers(sae, layers)
    chosen = torch.tensor(sae.check_features(range(sae.num_features) if features is None else features))
    rows, cols = lens.token_grid
    latents = encode(lens, images)  # (n, C, h, w)
    noise = noise_field(latents, seed)
    values = np.zeros((len(images), len(levels), len(layers), len(chosen), rows, cols), np.float32)
    denoiser = Denoiser(lens, [prompt], guidance=guidance_scale)
    state = {"level": 0}
    handles = []
    try:
        for j, layer in enumerate(layers):
            def hook(_module, _args, output, j=j, layer=layer):
                h = lens.part(layer).read(sae.site, output, lens.text_tokens())  # (n, tokens, C)
                z = sae.encode(h)[..., chosen]  # (n, tokens, features)
                values[:, state["level"], j] = z.transpose(1, 2).reshape(len(images), len(chosen), rows, cols).numpy()

            handles.append(lens.site_module(sae.site, layer).register_forward_hook(hook))
        for i, level in enumerate(levels):
            state["level"] = i
            noisy, timestep = noised(lens, latents, noise, level)
            with torch.no_grad():
                denoiser.raw(noisy, timestep, [0] * len(images))
    finally:
        for handle in handles:
            handle.remove()
    ds = xr.Dataset({"activation": (("item", "level", "layer", "feature", "row", "col"), values),
                     "image": (("item", "y", "x", "rgb"), images)},
                    coords={"item": np.arange(len(images)), "level": levels, "layer": list(layers),
                            "feature": chosen.tolist()})
    ds.attrs.update(lens.provenance())
    ds.attrs.update(readout="sae_image_features", site=sae.site, sae_folder=str(sae.folder or ""),
                    sae_digest=sae.digest, prompt=prompt, seed=int(seed), guidance_scale=float(guidance_scale))
    return ds


def _image_shape(lens: Lens) -> tuple[int, int, int]:
    return lens.pipeline_kwargs["height"], lens.pipeline_kwargs["width"], 3


def feature_dashboard(maps: xr.Dataset, *, features: Any = None, top: int = 6,
                      attention: xr.Dataset | None = None) -> xr.Dataset:
    """What a feature page shows, from `sae_features` maps.

    Args:
        maps: The Dataset `sae_features` returned.
        features: Features to describe (default: all in `maps`).
        top: Top-activating images per feature.
        attention: Optionally `dit_lens.attention_maps` of the same prompts and seeds: each feature's map is
            then compared with each word's cross-attention map, to name the words attention says the feature
            follows.

    Returns:
        Dataset with ``rate (feature, prompt)`` (share of image tokens where the feature is active, over seeds,
        steps and layers), ``image_rate (feature, prompt)`` (share of images where it fires anywhere),
        ``peak (feature, prompt, seed)`` (its largest activation), and its `top` images: ``top_prompt``,
        ``top_seed``, ``top_peak (feature, rank)``, ``top_map (feature, rank, row, col)`` (the activation
        averaged over steps and layers) and ``top_image (feature, rank, y, x, rgb)``.
    """
    act = maps["activation"] if features is None else maps["activation"].sel(feature=list(features))
    top = check_int(top, "top", minimum=1)
    items = act.sizes["prompt"] * act.sizes["seed"]
    top = min(top, items)
    rate = (act > 0).mean(("seed", "step", "layer", "row", "col"))
    image_rate = (act > 0).any(("step", "layer", "row", "col")).mean("seed")
    peak = act.max(("step", "layer", "row", "col"))  # (prompt, seed, feature)
    mean_map = act.mean(("step", "layer"))  # (prompt, seed, feature, row, col)
    flat = peak.transpose("feature", "prompt", "seed").values.reshape(act.sizes["feature"], items)
    order = np.argsort(-flat, axis=1, kind="stable")[:, :top]  # (feature, rank)
    p_index, s_index = np.divmod(order, act.sizes["seed"])
    maps_fp = mean_map.transpose("feature", "prompt", "seed", "row", "col").values
    images = maps["image"].transpose("prompt", "seed", "y", "x", "rgb").values
    f_index = np.arange(act.sizes["feature"])[:, None]
    board = xr.Dataset(
        {"rate": rate.transpose("feature", "prompt"), "image_rate": image_rate.transpose("feature", "prompt"),
         "peak": peak.transpose("feature", "prompt", "seed"),
         "top_prompt": (("feature", "rank"), act["prompt"].values[p_index]),
         "top_seed": (("feature", "rank"), act["seed"].values[s_index]),
         "top_peak": (("feature", "rank"), np.take_along_axis(flat, order, 1)),
         "top_map": (("feature", "rank", "row", "col"), maps_fp[f_index, p_index, s_index]),
         "top_image": (("feature", "rank", "y", "x", "rgb"), images[p_index, s_index])},
        coords={"feature": act["feature"].values, "rank": np.arange(top)})
    if attention is not None:
        board = board.merge(_word_correlation(mean_map, attention))
    board.attrs.update(maps.attrs)
    board.attrs["readout"] = "feature_dashboard"  # what `dit_lens.views.features.write_feature_explorer` draws
    return board


def _word_correlation(mean_map: xr.DataArray, attention: xr.Dataset) -> xr.Dataset:
    """``word_correlation (feature, word)`` and ``word (feature)`` between feature maps ``(prompt, seed, feature,
    row, col)`` and the words' attention maps of the same runs."""
    words = attention["attention"] if isinstance(attention, xr.Dataset) else attention
    prompts, seeds = list(mean_map["prompt"].values), list(mean_map["seed"].values)
    missing = [p for p in prompts if p not in list(words["prompt"].values)] + \
        [s for s in seeds if s not in list(words["seed"].values)]
    if missing:
        raise ValueError(f"attention lacks the runs {missing} of the feature maps; pass attention_maps of the same "
                         f"prompts and seeds")
    words = words.sel(prompt=prompts, seed=seeds).mean(("step", "layer"))  # (prompt, seed, word, row, col)
    if (words.sizes["row"], words.sizes["col"]) != (mean_map.sizes["row"], mean_map.sizes["col"]):
        raise ValueError("attention maps and feature maps lie on different token grids; pass maps of one model")
    f = mean_map.transpose("feature", "prompt", "seed", "row", "col").values.reshape(mean_map.sizes["feature"], -1)
    w = words.transpose("word", "prompt", "seed", "row", "col").values.reshape(words.sizes["word"], -1)
    f, w = f - f.mean(1, keepdims=True), w - w.mean(1, keepdims=True)
    norm = np.linalg.norm(f, axis=1)[:, None] * np.linalg.norm(w, axis=1)[None]  # (feature, word)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(norm > 0, f @ w.T / np.where(norm > 0, norm, 1.0), np.nan)  # a silent feature: no correlation
    best = np.where(np.isnan(r).all(1), "", np.array(words["word"].values)[np.nanargmax(np.nan_to_num(r, nan=-2), 1)])
    return xr.Dataset({"word_correlation": (("feature", "word"), r), "word": ("feature", best.astype(str))},
                      coords={"feature": mean_map["feature"].values, "word": words["word"].values})


def store_feature_means(sae: SAE, store: Any) -> xr.DataArray:
    """Mean activation of every feature per prompt ``(prompt, feature)`` over a token-level capture store's
    seeds, and the SAE's steps, layers and tokens, read one (prompt, seed) cell at a time."""
    from .train import open_tokens, read_cell

    source = open_tokens(store, sae.site, sae.layers)  # every step of the store; the SAE's when it has them all
    if set(sae.steps) <= set(source.steps):
        source = replace(source, steps=sae.steps, step_index=tuple(source.steps.index(t) for t in sae.steps))
    if int(source.array.shape[-1]) != sae.width or source.attrs.get("model_fingerprint") != sae.model_fingerprint:
        raise ValueError("the store was captured from another model (or width) than the SAE was trained on; pass a "
                         "capture of the SAE's model")
    means = np.zeros((len(source.prompts), sae.num_features))
    for i in range(len(source.prompts)):
        for j in range(len(source.seeds)):
            means[i] += sae.encode(torch.from_numpy(read_cell(source, (i, j)))).double().mean(0).numpy()
    means /= len(source.seeds)
    out = xr.DataArray(means, dims=("prompt", "feature"),
                       coords={"prompt": list(source.prompts), "feature": np.arange(sae.num_features)},
                       name="mean_activation")
    out.attrs.update(site=sae.site, sae_digest=sae.digest, seeds=typed(list(source.seeds)))
    return out


def top_features(means: xr.DataArray, source: str | Sequence[str], target: str | Sequence[str],
                 count: int) -> xr.DataArray:
    """The `count` features most more active on the `source` prompts than on the `target` prompts.

    Args:
        means: Mean activations ``(prompt, feature)`` (`store_feature_means`).
        source: The source prompt(s) (their means are averaged).
        target: The target prompt(s).
        count: How many features.

    Returns:
        The difference (source mean − target mean) of the chosen features, largest first, over ``feature``.

    Examples:
        >>> means = xr.DataArray([[0.0, 2.0, 1.0], [0.5, 0.0, 0.0]], dims=("prompt", "feature"),
        ...                      coords={"prompt": ["polyp", "normal"], "feature": [0, 1, 2]})
        >>> top_features(means, "polyp", "normal", 2).feature.values.tolist()
        [1, 2]
    """
    pick = lambda prompts: means.sel(prompt=[prompts] if isinstance(prompts, str) else list(prompts))  # noqa: E731
    difference = pick(source).mean("prompt") - pick(target).mean("prompt")
    order = np.argsort(-difference.values, kind="stable")[: check_int(count, "count", minimum=1)]
    return difference.isel(feature=order).rename("difference")
