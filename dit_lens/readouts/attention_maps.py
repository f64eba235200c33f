"""`attention_maps`: where each word of a prompt looks in the image (DAAM-style cross-attention maps).

For each run (prompt, seed), the plain pipeline call, at every requested layer and step: the softmax
weights of the cross-attention (``attn2.weights``: image-token queries × text-token keys) on the
conditional half of the guidance batch, averaged over heads and summed over the text tokens each word
became (found from the tokenizer's own offsets, `dit_lens.model.tokens`). That is one map per word over
the image-token grid. The reduction runs inside the hook, on the model's device: what is kept is the
maps, never the ``(heads, queries, keys)`` weights of every step.

Examples:
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> maps = attention_maps(lens, ["a red polyp"], seeds=[0], words=["polyp", "red"],
    ...                       num_inference_steps=2, progress=False)
    >>> maps.attention.dims
    ('prompt', 'seed', 'step', 'layer', 'word', 'row', 'col')
    >>> maps.attention.shape
    (1, 1, 2, 2, 2, 4, 4)
    >>> maps.n_tokens.values.tolist()  # ByT5 makes one token per byte
    [[5, 3]]
    >>> maps.image.dims
    ('prompt', 'seed', 'y', 'x', 'rgb')
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from ..model.lens import Lens
from ..trace.attrs import typed
from ..trace.capture import DEFAULT_BATCH, CaptureSettings
from ..trace.runner import scheduler_timesteps
from ..trace.runner import Hook, check_prompts, check_seeds, is_int, traced_generate
from ..validate import check_labels
from ..model.tokens import prompt_words, word_tokens

__all__ = ["MAP_DIMS", "attention_maps"]

MAP_DIMS = ("prompt", "seed", "step", "layer", "word", "row", "col")


def attention_maps(
    lens: Lens,
    prompts: str | Iterable[str],
    *,
    seeds: Iterable[int],
    words: Sequence[str] | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.5,
    layers: Iterable[int] | None = None,
    steps: Iterable[int] | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """The cross-attention map of each word over the image, per run, step and layer.

    Args:
        lens: A `dit_lens.Lens`.
        prompts: Prompt strings (unique); one string is one prompt.
        seeds: Generator seeds (unique non-negative integers).
        words: Words or phrases; every one must occur in every prompt (whole-word match after the
            pipeline's own preprocessing, so case does not matter when it lower-cases; every
            occurrence counts). ``None``: the words of the prompts, which must then share them.
        num_inference_steps: Denoising steps T.
        guidance_scale: Classifier-free guidance scale (maps come from the conditional half).
        layers: Block indices (default: all).
        steps: Denoising steps to record (default: all); the run always makes all T.
        batch_size: Runs per pipeline call (default 8); changes values only by float rounding.
        progress: Show a progress bar over batches.

    Returns:
        Dataset with ``attention (prompt, seed, step, layer, word, row, col)`` float32: the mean over
        heads of the softmax weights summed over the word's tokens (in [0, 1]; the maps of words
        that share no token add up to at most 1 per image token), ``image (prompt, seed, y, x, rgb)``
        the generated images in [0, 1], coordinates timestep (per step) and ``n_tokens (prompt,
        word)``; attrs hold provenance, every setting and ``word_tokens`` (JSON: prompt -> word ->
        token positions). The maps take prompts × seeds × steps × layers × words × image tokens × 4 B
        (one run of the embedded world, 20 steps × 12 layers × 5 words: 307 kB); pass `layers` or
        `steps` to keep fewer.

    Raises:
        ValueError: a bad argument, or a word that is not in a prompt (the message names it).
    """
    prompts, seeds = check_prompts(prompts), check_seeds(seeds)
    if isinstance(layers, (int, np.integer)):
        raise ValueError(f"layers must be a list of block indices; pass layers=[{layers}]")
    settings = CaptureSettings(  # validates steps, guidance and layers as capture does
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        layers=None if layers is None else tuple(layers),
        site=f"{lens.family.cross_attention_site}.weights",
        reduce="heads",
    ).resolve(lens, "attention_maps")
    T = settings.num_inference_steps
    recorded = _check_steps(steps, T)
    batch_size = DEFAULT_BATCH if batch_size is None else batch_size
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    words = _check_words(lens, prompts, words)
    tokens = [word_tokens(lens, prompt, words) for prompt in prompts]  # per prompt: word -> positions

    rows, cols = lens.token_grid
    height, width = lens.pipeline_kwargs["height"], lens.pipeline_kwargs["width"]
    maps = np.zeros((len(prompts), len(seeds), len(recorded), len(settings.layers), len(words), rows * cols),
                    np.float32)
    images = np.zeros((len(prompts), len(seeds), height, width, 3), np.float32)
    cells = [(p, s) for p in range(len(prompts)) for s in range(len(seeds))]
    batches = [cells[i : i + int(batch_size)] for i in range(0, len(cells), int(batch_size))]
    for batch in tqdm(batches, desc="attention maps", unit="batch", disable=not progress):
        values, made = _run_batch(lens, batch, prompts, seeds, words, tokens, settings, recorded)
        for row, (p, s) in enumerate(batch):
            maps[p, s], images[p, s] = values[row], made[row]

    steps_kept = np.array(recorded, dtype=np.int64)
    coords = {
        "prompt": prompts,
        "seed": seeds,
        "step": steps_kept,
        "timestep": ("step", scheduler_timesteps(lens, T).astype(np.float64)[steps_kept]),
        "layer": np.array(settings.layers, dtype=np.int64),
        "word": list(words),
        "row": np.arange(rows),
        "col": np.arange(cols),
        "n_tokens": (("prompt", "word"), np.array([[len(t[w]) for w in words] for t in tokens], np.int64)),
    }
    ds = xr.Dataset(
        {
            "attention": (MAP_DIMS, maps.reshape(*maps.shape[:5], rows, cols)),
            "image": (("prompt", "seed", "y", "x", "rgb"), images),
        },
        coords=coords,
    )
    ds["attention"].attrs["description"] = (
        f"softmax weights of {settings.site} on the conditional half, mean over heads, summed over each "
        f"word's text tokens; queries laid out as the {rows}x{cols} image-token grid"
    )
    ds.attrs.update(lens.provenance())
    ds.attrs.update(
        site=settings.site,
        num_inference_steps=T,
        guidance_scale=settings.guidance_scale,
        seeds=typed(seeds),
        batch_size=int(batch_size),
        token_grid=[rows, cols],
        word_tokens=typed({prompt: {w: list(t[w]) for w in words} for prompt, t in zip(prompts, tokens)}),
    )
    return ds


def _run_batch(lens, batch, prompts, seeds, words, tokens, settings, recorded) -> tuple[np.ndarray, np.ndarray]:
    """One pipeline call for the cells of `batch`: maps ``(cells, step, layer, word, query)`` and
    images ``(cells, H, W, 3)``."""
    size, guided = len(batch), lens.guided(settings.guidance_scale)
    step_index = {t: i for i, t in enumerate(recorded)}
    layer_index = {l: j for j, l in enumerate(settings.layers)}
    queries = lens.token_grid[0] * lens.token_grid[1]
    device = lens.device
    buffer = torch.zeros((size, len(recorded), len(settings.layers), len(words), queries),
                         dtype=torch.float32, device=device)  # (cells, step, layer, word, query)
    select: list[torch.Tensor] = []  # [(cells, keys, words)], made once the key count is seen

    def visit(step: int, layer: int, weights: torch.Tensor) -> None:  # weights (rows, heads, q, k)
        cond = weights[-size:] if guided else weights  # (cells, heads, q, k): conditional rows last
        if not select:
            select.append(_selection(cond.shape[-1], batch, words, tokens, device))
        head_mean = cond.mean(dim=1, dtype=torch.float32)  # (cells, q, k)
        per_word = torch.bmm(head_mean, select[0])  # (cells, q, words)
        buffer[:, step_index[step], layer_index[layer]] = per_word.transpose(1, 2)

    result = traced_generate(
        lens,
        [prompts[p] for p, _ in batch],
        [seeds[s] for _, s in batch],
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        hooks=[Hook(settings.site, settings.layers, visit, frozenset(recorded))],
        output_type="np",
    )
    return buffer.cpu().numpy(), np.asarray(result.images, dtype=np.float32)


def _selection(keys: int, batch, words, tokens, device) -> torch.Tensor:
    """``(cells, keys, words)``: 1 where key k is one of the word's tokens in that cell's prompt."""
    select = torch.zeros((len(batch), keys, len(words)), dtype=torch.float32)
    for row, (p, _) in enumerate(batch):
        for w, word in enumerate(words):
            positions = list(tokens[p][word])
            if max(positions) >= keys:
                raise ValueError(f"word {word!r} maps to text tokens {positions}, past the {keys} keys of the "
                                 f"cross-attention")
            select[row, positions, w] = 1.0
    return select.to(device)


def _check_steps(steps: Iterable[int] | None, T: int) -> list[int]:
    if steps is None:
        return list(range(T))
    if isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be a list of step indices; pass steps=[{steps}]")
    steps = list(steps)
    if not steps or not all(is_int(t) for t in steps):
        raise ValueError(f"steps must be a non-empty list of step indices (or None for all), got {steps!r}")
    outside = [int(t) for t in steps if not 0 <= t < T]
    if outside:
        raise ValueError(f"steps {outside} out of range: a run of num_inference_steps={T} has steps 0..{T - 1}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"steps has duplicates: {steps}; list each step once")
    return sorted(int(t) for t in steps)


def _check_words(lens: Lens, prompts: list[str], words: Sequence[str] | None) -> list[str]:
    if words is None:
        found = [prompt_words(lens, prompt) for prompt in prompts]
        if any(f != found[0] for f in found[1:]):
            raise ValueError(f"the prompts have different words ({[', '.join(f) for f in found]}); pass words=[...] "
                             f"that occur in every prompt")
        return found[0]
    return check_labels(words, "words")
