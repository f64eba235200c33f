"""`concept_maps`: where each concept is in the image, read from the attention *outputs* (ConceptAttention) or
from the cross-attention weights, for generated runs and for given images.

``kind="output"`` (ConceptAttention, Helbling et al. 2025): at each layer, the map of concept c over the image
tokens is ``softmax_c ⟨o_x, o_c⟩``, o_x an image token's attention output and o_c the concept's own output in
the same space (after the attention's output projection). Each concept is encoded alone by the pipeline's text
encoders, as the pipeline encodes a prompt, then enters the blocks as the prompt does; a concept of several
tokens pools all of them: the mean of their outputs (of their keys, for ``"prototype"`` and ``"key"``), so the
mean of their similarities before the softmax.

- Joint-attention families (SD3, Flux double-stream blocks): the concept tokens form a stream of their own
  through the text stream's weights (adaLN, q/k/v, output projection, feed-forward), reset at every step. Their
  queries attend to the image tokens and to each other; nothing attends to them, so the run is unchanged. Flux
  gives its text tokens position 0 (identity rotation), so the concept tokens are not rotated either.
- Cross-attention families (PixArt, SANA) have no text-stream queries, and their image tokens' attention outputs
  are built from text values only. The nearest equivalent, ``output_space="prototype"`` (the default): the
  concept attends to the image tokens through the only projections that pair text with image, the
  cross-attention's image queries and the concept's keys: with a_c(x) = softmax over image tokens x of
  ``q_x · k_c`` (scaled, mean over heads), o_c = Σ_x a_c(x)·o_x, the image outputs the concept draws from
  (ConceptAttention's o_c = Σ_x softmax(q_c · k_x)·v_x with the roles of query and key mirrored). Two alternatives
  are measured beside it (`studies/segmentation.py`): ``"value"``, o_c = ``to_out(to_v(e_c))``, the concept's
  value vector through the output projection (an image token's output is a weighted mean of such vectors, so
  ⟨o_x, o_c⟩ asks how much of the concept it took in), and ``"key"``, the logits ``q_x · k_c`` themselves
  softmaxed over the concepts (cross-attention restricted to the concepts). e_c: the concept's tokens as the
  cross-attention sees its keys (caption projection; SANA's caption norm).

``kind="cross_attention"``: the word maps of `dit_lens.readouts.attention_maps` (the concepts must be words of
the prompt). Given images (``images`` an ``(n, H, W, 3)`` array in [0, 1]) are encoded by the pipeline's VAE,
noised to each of `noise_levels` with one noise field drawn from `seeds[0]` (the same for every image), and
read from one conditional denoiser call per level (all images in one batch); the ``step`` dimension then
indexes the noise levels.

Examples:
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> ds = concept_maps(lens, prompt="a red polyp", concepts=["polyp", "red"], seeds=[0],
    ...                   num_inference_steps=2, progress=False)
    >>> ds["map"].dims, ds["map"].shape
    (('item', 'step', 'layer', 'concept', 'row', 'col'), (1, 2, 2, 2, 4, 4))
    >>> float(ds["map"].sum("concept").min()) > 0.999  # softmax over the concepts
    True
    >>> ds["pooled"].dims
    ('item', 'concept', 'row', 'col')
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from ..model.lens import Lens
from ..model.tokens import max_tokens, prompt_text, word_tokens
from ..sampling import check_images, check_levels, encode, noise_field
from ..trace.attrs import typed
from ..trace.capture import DEFAULT_BATCH
from ..trace.runner import check_seeds, scheduler_timesteps
from ..validate import check_guidance, check_labels
from .attention_maps import _check_steps, attention_maps
from .concept_reader import Reader

__all__ = ["KINDS", "MAP_DIMS", "SPACES", "concept_maps"]

KINDS = ("output", "cross_attention")
#: What a cross-attention family's concept output is (`concept_maps`' ``output_space``).
SPACES = ("value", "key", "prototype")
MAP_DIMS = ("item", "step", "layer", "concept", "row", "col")
#: Given images per denoiser call.
GIVEN_BATCH = 16


def concept_maps(lens: Lens, images: Any = None, *, prompt: str, concepts: Sequence[str], seeds: Sequence[int] = (0,),
                 layers: Sequence[int] | None = None, steps: Sequence[int] | None = None, kind: str = "output",
                 noise_levels: Sequence[float] = (0.5,), num_inference_steps: int = 20, guidance_scale: float = 4.5,
                 output_space: str = "prototype", progress: bool = True) -> xr.Dataset:
    """Maps of each concept over the image tokens, per item, step (or noise level), layer.

    Args:
        lens: A `dit_lens.Lens`.
        images: ``None`` (generate ``prompt`` with each of `seeds`) or images ``(n, H, W, 3)`` in [0, 1] to read.
        prompt: The prompt of the runs (of the denoiser call, for given images).
        concepts: Concept words or phrases (unique, non-empty); with ``kind="cross_attention"`` words of `prompt`.
        seeds: Generator seeds of the runs; for given images, ``seeds[0]`` draws the noise.
        layers: Block indices (default: every block that has the read; SD3's last block and Flux's
            single-stream blocks have no text-stream output for ``kind="output"``).
        steps: Denoising steps to read (default all; generated runs only: the run always makes all of them).
        kind: ``"output"`` or ``"cross_attention"``.
        noise_levels: For given images, levels in (0, 1]: the fraction of the training timesteps (ε/v models) or
            the flow noise σ (flow models).
        num_inference_steps: Denoising steps of generated runs.
        guidance_scale: Guidance of generated runs (maps read from the conditional half); Flux's embedded scale.
        output_space: Cross-attention families, ``kind="output"``: ``"prototype"`` (o_c: the image outputs the
            concept attends to), ``"value"`` (o_c = to_out(to_v(e_c))) or ``"key"`` (logits q_x · k_c); see the
            module docstring. Joint-attention families have their concept stream and take only the default.
        progress: Show a progress bar.

    Returns:
        Dataset with ``map (item, step, layer, concept, row, col)`` float32 (softmax over concepts for
        ``"output"``; softmax weights summed over the word's tokens for ``"cross_attention"``), ``pooled (item,
        concept, row, col)`` (the mean of ``map`` over step and layer) and ``image (item, y, x, rgb)``; attrs hold
        provenance, every setting and the seeds.

    Raises:
        ValueError: a bad argument: an empty or repeated concept, one the tokenizer makes no token of, images of
            the wrong shape or range, layers or steps out of range.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if output_space not in SPACES:
        raise ValueError(f"output_space must be one of {SPACES}, got {output_space!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    concepts = check_labels(concepts, "concepts")
    seeds = check_seeds(seeds)
    guidance_scale = check_guidance(guidance_scale)
    joint = lens.family.processor != "cross"
    if joint and output_space != "prototype":
        raise ValueError(f"output_space applies to cross-attention families; {lens.family.label or lens.family.name} "
                         f"reads its concepts' own outputs through the text stream (leave output_space out)")
    layers = _check_layers(lens, layers, kind, joint)
    given = images is not None
    if given:
        images = check_images(images, lens)
        levels = check_levels(noise_levels)
        if steps is not None:
            raise ValueError("steps apply to generated runs; for given images choose noise_levels=[...]")
        recorded = list(range(len(levels)))
    else:
        recorded = _check_steps(steps, num_inference_steps)
    tokens = _concept_tokens(lens, prompt if kind == "cross_attention" else None, concepts)

    if kind == "cross_attention" and not given:
        words = attention_maps(lens, [prompt], seeds=seeds, words=concepts, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, layers=layers, steps=recorded, progress=progress)
        values = words["attention"].isel(prompt=0).values  # (seed, step, layer, word, row, col)
        made = words["image"].isel(prompt=0).values
    else:
        reader = Reader(lens, kind, concepts, tokens, prompt, layers, output_space, joint)
        if given:
            latents = encode(lens, images)  # (n, C, h, w)
            noise = noise_field(latents, seeds[0])  # one field for every image
            chunks = [slice(i, i + GIVEN_BATCH) for i in range(0, len(images), GIVEN_BATCH)]
            values = [reader.given(latents[c], noise[c], levels, guidance_scale)
                      for c in tqdm(chunks, desc=f"concept maps ({kind})", unit="batch", disable=not progress)]
            values, made = np.concatenate(values), images
        else:
            batches = [seeds[i : i + DEFAULT_BATCH] for i in range(0, len(seeds), DEFAULT_BATCH)]
            done = [reader.generated(batch, num_inference_steps, guidance_scale, recorded)
                    for batch in tqdm(batches, desc=f"concept maps ({kind})", unit="batch", disable=not progress)]
            values, made = np.concatenate([d[0] for d in done]), np.concatenate([d[1] for d in done])
        n = len(values)
        values = values.reshape(n, len(recorded), len(layers), len(concepts), *lens.token_grid)
    settings = dict(kind=kind, prompt=prompt, concepts=concepts, seeds=seeds, layers=layers, recorded=recorded,
                    levels=levels if given else None, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, output_space=output_space, tokens=tokens)
    return _dataset(lens, values, made, settings)


def _concept_tokens(lens: Lens, prompt: str | None, concepts: list[str]) -> list[tuple[int, ...]]:
    """Each concept's text-token positions: in the prompt (word maps), or in the concept's own encoding."""
    if prompt is not None:
        found = word_tokens(lens, prompt, concepts)
        return [found[c] for c in concepts]
    out, keep = [], max_tokens(lens)
    for concept in concepts:
        count = len(lens.pipeline.tokenizer(prompt_text(lens, concept)).input_ids)
        if keep is not None and count > keep:
            raise ValueError(f"concept {concept[:40]!r}… makes {count} tokens, more than the {keep} the text encoder "
                             f"keeps; use a shorter word or phrase")
        try:
            positions = word_tokens(lens, concept, [concept])[concept]
        except ValueError as err:
            raise ValueError(f"concept {concept!r} gives no token of the pipeline's tokenizer ({err}); use a "
                             f"word or phrase the tokenizer keeps") from None
        out.append(positions)
    return out


def _check_layers(lens: Lens, layers: Any, kind: str, joint: bool) -> list[int]:
    """The blocks to read; for joint families' output maps, only blocks with a text-stream output."""
    def usable(layer: int) -> bool:
        block = lens.blocks[layer]
        return not joint or kind != "output" or (hasattr(block, "ff_context") and block.ff_context is not None
                                                 and not getattr(block, "context_pre_only", False))
    if layers is None:
        return [layer for layer in range(lens.num_layers) if usable(layer)]
    if isinstance(layers, (int, np.integer)):
        raise ValueError(f"layers must be a list of block indices; pass layers=[{layers}]")
    layers = list(layers)
    if not layers or not all(isinstance(l, (int, np.integer)) for l in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be a non-empty list of distinct block indices, got {layers!r}")
    outside = [int(l) for l in layers if not 0 <= l < lens.num_layers]
    if outside:
        raise ValueError(f"layers {outside} out of range: the model has blocks 0..{lens.num_layers - 1}")
    bad = [int(l) for l in layers if not usable(l)]
    if bad:
        raise ValueError(f"blocks {bad} of {lens.family.label or lens.family.name} have no text-stream output "
                         f"(the last joint block, or a single-stream one) for kind='output'; leave them out")
    return sorted(int(l) for l in layers)


def _dataset(lens: Lens, values: np.ndarray, made: np.ndarray, settings: dict) -> xr.Dataset:
    rows, cols = lens.token_grid
    given = settings["levels"] is not None
    recorded = settings["recorded"]
    coords: dict = {"item": np.arange(values.shape[0]), "step": np.array(recorded, np.int64),
                    "layer": np.array(settings["layers"], np.int64), "concept": list(settings["concepts"]),
                    "row": np.arange(rows), "col": np.arange(cols)}
    if given:
        coords["noise_level"] = ("step", np.array(settings["levels"], np.float64))
    else:
        coords["seed"] = ("item", np.array(settings["seeds"], np.int64))
        T = settings["num_inference_steps"]
        coords["timestep"] = ("step", scheduler_timesteps(lens, T).astype(np.float64)[np.array(recorded)])
    ds = xr.Dataset({"map": (MAP_DIMS, values.astype(np.float32)),
                     "image": (("item", "y", "x", "rgb"), made.astype(np.float32))}, coords=coords)
    ds["pooled"] = ds["map"].mean(("step", "layer"))
    ds["pooled"].attrs["description"] = "mean of the per-cell maps over the chosen steps (noise levels) and layers"
    ds["map"].attrs["description"] = ("softmax over the concepts of <image token's attention output, concept's output>"
                                      if settings["kind"] == "output" else
                                      "cross-attention weights (mean over heads) summed over each word's tokens")
    ds.attrs.update(lens.provenance())
    ds.attrs.update(readout="concept_maps", kind=settings["kind"], prompt=settings["prompt"],
                    concepts=typed(settings["concepts"]), seeds=typed(settings["seeds"]),
                    maps_of="given images" if given else "generated runs", num_inference_steps=int(settings["num_inference_steps"]),
                    guidance_scale=float(settings["guidance_scale"]), token_grid=[rows, cols],
                    output_space=("" if settings["kind"] != "output" else "concept stream" if lens.family.processor
                                  != "cross" else settings["output_space"]),
                    concept_tokens=typed({c: list(t) for c, t in zip(settings["concepts"], settings["tokens"])}))
    if given:
        ds.attrs["noise_levels"] = typed(settings["levels"])
    return ds
