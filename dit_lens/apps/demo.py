"""`dit-lens demo`: concept vector → counterfactual pairs → metrics, figures and the explorer.

On the embedded world with no arguments it removes polyps (polyps → normal cecum). On a user's
checkpoint, ``--model DIR [--lora DIR] --positive ... --negative ...`` runs the same; flip metrics
then need a classifier that knows the labels (``--oracle``), otherwise they are reported as
unavailable rather than guessed.

The output folder is only ever written where dit-lens made it: a new or empty ``--out`` folder is
claimed with a marker file (`MARKER`) listing what the demo wrote; a folder holding anything else is
refused, and an earlier demo's results are replaced only with ``--overwrite`` (and then only the files
the marker lists). Every setting is checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..study import metrics as M
from ..interventions.blend import check_blend
from ..readouts.attention_maps import attention_maps
from ..trace.tokens import word_tokens
from ..views.attention import attention_figure
from ..views.explorer import write_explorer
from ..views.describe import describe_result
from ..views.figures import gate_figure, pairs_figure
from ..interventions.generate import generate
from ..model.lens import load
from ..interventions.steer import Steer
from ..study.declaration import window_layers
from ..world.domain import ENDOSCOPY_CONTEXTS
from ..readouts.vectors import concept_vector, save_vector
from ..validate import (check_guidance, check_int, check_pipeline_folder, check_real, check_steps, check_window,
                        check_writable_folder)

__all__ = ["MARKER", "OUTPUTS", "add_demo_arguments", "claim_output_folder", "run_demo"]

#: Marks a folder the demo made; lists the files it wrote there (the only ones it ever replaces).
MARKER = ".dit-lens-demo.json"
#: What the demo writes into its folder.
OUTPUTS = ("summary.json", "pairs.png", "gates.png", "attention.png", "explorer.html", "vector.zarr")

#: Demo defaults on the embedded world, as picked by the layer and alpha sweeps (README, Results).
DEFAULT_SOURCE, DEFAULT_TARGET = "polyps", "normal cecum"
DEFAULT_WINDOW = (0.0, 1.0)
DEFAULT_ALPHA = 3.0
DEFAULT_BLEND = 0.0


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="pipeline folder (default: the embedded world)")
    p.add_argument("--lora", default=None, help="peft LoRA adapter folder to merge into the denoiser")
    p.add_argument("--out", default="cache/demo",
                   help="output folder, new or empty or an earlier demo's (default: cache/demo)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo's results in --out")
    p.add_argument("--source", default=None,
                   help=f"class of the concept to remove (default: the classifier's class named in every --positive "
                        f"prompt, or {DEFAULT_SOURCE!r} without --positive)")
    p.add_argument("--target", default=None,
                   help=f"class of the counterfactual (default: the class named in every --negative prompt, or "
                        f"{DEFAULT_TARGET!r} without --negative)")
    p.add_argument("--positive", nargs="+", help="prompts with the concept (default: the world's phrasings of SOURCE)")
    p.add_argument("--negative", nargs="+", help="prompts without it (default: the world's phrasings of TARGET)")
    p.add_argument("--prompt", default=None,
                   help="generation prompt (default: the first --positive prompt, or 'An endoscopic image of SOURCE')")
    p.add_argument("--oracle", default=None, help="classifier/segmenter ('embedded' is the default for the embedded model)")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="steering strength")
    p.add_argument("--window", type=float, nargs=2, default=DEFAULT_WINDOW, metavar=("START", "STOP"),
                   help="steered layers as fractions of depth")
    p.add_argument("--renormalize", action="store_true", help="the authors' norm-preserving update")
    p.add_argument("--blend", type=float, default=DEFAULT_BLEND,
                   help="latent blending threshold in [0, 1): keep the unsteered latent where steering changed "
                        "it little (0 = off, the paper's method)")
    p.add_argument("--vector-seeds", type=int, default=16, help="seeds per prompt for the vector")
    p.add_argument("--pairs", type=int, default=16, help="counterfactual pairs to generate")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale")


def _check_arguments(args: argparse.Namespace) -> None:
    """Every setting, before anything runs (each error names its flag)."""
    check_real(args.alpha, "--alpha")
    check_window(args.window, "--window")
    check_guidance(args.guidance, name="--guidance")
    check_steps(args.steps, name="--steps")
    check_int(args.pairs, "--pairs", minimum=1)
    check_int(args.vector_seeds, "--vector-seeds", minimum=1)
    try:
        check_blend(args.blend)
    except ValueError as err:
        raise ValueError(f"--blend: {err}") from None
    if args.model != "embedded":
        check_pipeline_folder(args.model)


def run_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    _check_arguments(args)
    from ..trace.store import CACHE_ENV, cache_root

    check_writable_folder(cache_root(), "the cache folder",
                          f"set {CACHE_ENV} to a writable folder (it holds the captures)")
    out_dir = claim_output_folder(Path(args.out), overwrite=args.overwrite)
    lens = load(args.model, lora=args.lora)
    check_steps(args.steps, lens.pipeline.scheduler, name="--steps")
    oracle_source = args.oracle or ("embedded" if args.model == "embedded" else None)
    labels = _oracle_labels(oracle_source)
    concept = resolve_concept(args.source, args.target, args.positive, args.negative, args.prompt, labels)
    positive, negative, prompt = concept["positive"], concept["negative"], concept["prompt"]
    print(f"concept: {concept['name']} (source class: {concept['source'] or 'none named'}; target class: "
          f"{concept['target'] or 'none named'}); generating from {prompt!r}")

    print(f"[1/3] concept vector: {len(positive)} positive vs {len(negative)} negative prompts × {args.vector_seeds} seeds")
    vector = concept_vector(lens, positive=positive, negative=negative, seeds=list(range(args.vector_seeds)),
                            num_inference_steps=args.steps, guidance_scale=args.guidance, batch_size=8)
    layers = window_layers(check_window(args.window, "--window"), lens.num_layers)
    steer = Steer(vector, alpha=args.alpha, layers=layers, renormalize=args.renormalize,
                  name=concept["name"])
    seeds = [10_000 + i for i in range(args.pairs)]
    print(f"[2/3] {args.pairs} counterfactual pairs, {steer!r}")
    pairs = generate(lens, prompt, seeds=seeds, steer=steer, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, record_gates=True, blend=args.blend, batch_size=8)

    words = _source_words(lens, prompt, concept["source"])
    maps = None
    if words:
        print(f"      cross-attention maps of {words} over the unsteered images")
        maps = attention_maps(lens, prompt, seeds=seeds, words=words, num_inference_steps=args.steps,
                              guidance_scale=args.guidance, batch_size=8)

    print("[3/3] metrics and figures")
    summary = _measure(pairs, oracle_source, concept["source"], concept["target"])
    summary.update(
        n_pairs=args.pairs,
        settings={"alpha": args.alpha, "layers": layers, "window": list(args.window),
                  "renormalize": args.renormalize, "blend": args.blend, "num_inference_steps": args.steps,
                  "guidance_scale": args.guidance, "seeds": seeds,
                  "vector_seeds": list(range(args.vector_seeds)), "prompt": prompt,
                  "positive": positive, "negative": negative, "source": concept["source"],
                  "target": concept["target"]},
        steer=steer.settings(),
        steer_description=describe_result(pairs),
        provenance=lens.provenance(),
        seconds=round(time.perf_counter() - start, 1),
    )
    judge = None
    if oracle_source is not None:
        from ..world import load_oracle

        judge = load_oracle(oracle_source)
    _write_outputs(out_dir, pairs, vector, summary, maps, judge)
    _print_table(summary, out_dir)
    return 0


def _oracle_labels(oracle_source: str | None) -> tuple[str, ...]:
    if oracle_source is None:
        return ()
    from ..world import load_oracle

    return tuple(load_oracle(oracle_source).labels)


def resolve_concept(source: str | None, target: str | None, positive: list[str] | None, negative: list[str] | None,
                    prompt: str | None, labels: tuple[str, ...]) -> dict:
    """The demo's concept from its flags: prompts, generation prompt, source and target classes, and name.

    A class not given is the classifier's class named in every prompt of its side (the longest one:
    "dyed lifted polyps", not "polyps"), or the world default when that side's prompts are not given
    either; None when no class fits (flip and target rates are then reported as unavailable). The
    generation prompt is the first positive prompt; the name says what was steered, from the classes
    when both are known and from the prompts otherwise."""
    def named(prompts: list[str]) -> str | None:
        found = [label for label in labels if all(_names(p, label) for p in prompts)]
        return max(found, key=len) if found else None

    if source is not None and labels and source not in labels:
        raise ValueError(f"--source {source!r} is not a class of the classifier; choose one of {list(labels)}")
    if target is not None and labels and target not in labels:
        raise ValueError(f"--target {target!r} is not a class of the classifier; choose one of {list(labels)}")
    source = source or (named(positive) if positive else DEFAULT_SOURCE)
    target = target or (named(negative) if negative else DEFAULT_TARGET)
    positive = positive or [c.format(source) for c in ENDOSCOPY_CONTEXTS]
    negative = negative or [c.format(target) for c in ENDOSCOPY_CONTEXTS]
    if source and target:
        name = f"{source} -> {target}"
    else:
        more = lambda xs: f" (+{len(xs) - 1} more)" if len(xs) > 1 else ""  # noqa: E731
        name = f"'{positive[0]}'{more(positive)} -> '{negative[0]}'{more(negative)}"
    return {"positive": list(positive), "negative": list(negative), "prompt": prompt or positive[0],
            "source": source, "target": target, "name": name}


def _names(prompt: str, label: str) -> bool:
    import re

    return re.search(rf"(?<![\w-]){re.escape(label.lower())}(?![\w-])", prompt.lower()) is not None


def _measure(pairs, oracle_source, source_label, target_label) -> dict:
    result: dict = {}
    if oracle_source is None:
        masks_note = "no segmenter: whole image"
        background = ~M.segment(pairs, lambda x: np.zeros(x.shape[:3], bool)).any("branch")
        for key in ("flip_rate", "target_rate", "confidence_shift"):
            result[key] = None
            result[f"{key}_status"] = "unavailable: no classifier for this model (pass --oracle)"
    else:
        from ..world import load_oracle, load_segmenter
        from ..world.domain import DYE_CLASSES, dye_detection_rate, polyp_kept

        oracle, segmenter = load_oracle(oracle_source), load_segmenter(oracle_source)
        probs = M.classify(pairs, oracle)
        masks = M.segment(pairs, segmenter)
        background = M.background_mask(masks)
        masks_note = f"outside the union of both images' lesion masks ({oracle_source} segmenter)"
        judged = M.Judged(pairs, probs, masks, source_label, target_label)
        rates = {"flip_rate": (source_label, lambda: M.flips(probs, source_label)),
                 "target_rate": (target_label, lambda: M.target_rate(probs, target_label)),
                 "confidence_shift": (source_label, lambda: M.confidence_drop(probs, source_label)),
                 "unsteered_recognised": (source_label, lambda: 1.0 - M.flips(probs, source_label, branch="original"))}
        if source_label in DYE_CLASSES and target_label == "polyps":  # removing dye must keep the polyp
            rates["dye_detection_rate"] = (source_label, lambda: dye_detection_rate(judged))
            rates["polyp_kept"] = (source_label, lambda: polyp_kept(judged))
        for key, (label, values) in rates.items():
            if label is None:
                side = "--source" if label is source_label else "--target"
                result[key], result[f"{key}_status"] = None, f"unavailable: no class named; pass {side}"
                continue
            est = M.estimate(values())
            result[key], result[f"{key}_ci95"] = est.value, [est.low, est.high]
    ssim = "bg_ssim" if oracle_source is not None else "whole_image_ssim"
    psnr = "bg_psnr" if oracle_source is not None else "whole_image_psnr"
    for key, values in ((ssim, M.background_ssim(pairs, background)),
                        (psnr, M.background_psnr(pairs, background).clip(max=100.0))):
        est = M.estimate(values)
        result[key], result[f"{key}_ci95"] = est.value, [est.low, est.high]
    lpips = M.background_lpips(pairs, background)
    lp = "bg_lpips" if oracle_source is not None else "whole_image_lpips"
    result[lp] = None if lpips.attrs["status"].startswith("unavailable") else M.estimate(lpips).value
    result[f"{lp}_status"] = lpips.attrs["status"]
    result["background"] = masks_note
    result["metrics_version"] = M.METRICS_VERSION
    result[f"{ssim}_definition"] = ("7x7 SSIM, window statistics over background pixels only, averaged over them"
                                    if oracle_source is not None else "7x7 SSIM over the whole image")
    return result


def claim_output_folder(out_dir: Path, *, overwrite: bool) -> Path:
    """Make `out_dir` the demo's: new or empty (marked now), or marked by an earlier demo.

    Refuses a file, an unwritable folder, a folder holding anything the demo did not write (also inside
    ``vector.zarr``), and an earlier demo's results unless `overwrite`. Nothing is deleted here.
    """
    fix = "pass --out with a new or empty folder"
    if out_dir.is_dir() and any(out_dir.iterdir()):
        written = _written(out_dir)
        if written is None:
            names = sorted(p.name for p in out_dir.iterdir())
            raise ValueError(f"--out {out_dir} holds files dit-lens did not write ({', '.join(names[:3])}"
                             f"{', ...' if len(names) > 3 else ''}); {fix}, nothing was changed")
        foreign = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*")
                         if not p.is_dir() and p.name != MARKER and str(p.relative_to(out_dir)) not in written)
        if foreign:
            raise ValueError(f"--out {out_dir} holds files the demo did not write ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); move them away or {fix}; nothing was changed")
        if written and not overwrite:
            raise ValueError(f"--out {out_dir} holds an earlier demo's results; pass --overwrite to replace them, "
                             f"or {fix}")
    check_writable_folder(out_dir, "--out", fix)
    if not (out_dir / MARKER).is_file():
        _mark(out_dir, [])
    return out_dir


def _written(out_dir: Path) -> list[str] | None:
    """The files an earlier demo wrote in `out_dir` (relative paths), or None for a folder it did not make."""
    try:
        record = json.loads((out_dir / MARKER).read_text())
        return [str(f) for f in record["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _mark(out_dir: Path, files: list[str]) -> None:
    from .. import __version__

    (out_dir / MARKER).write_text(json.dumps({"written_by": f"dit-lens {__version__} demo", "files": files}))


def _source_words(lens, prompt: str, source: str) -> list[str]:
    """The source label as words of the generation prompt, or none when the prompt does not contain it."""
    try:
        word_tokens(lens, prompt, [source])
    except ValueError:
        return []
    return [source]


def _write_outputs(out_dir: Path, pairs, vector, summary: dict, maps=None, judge=None) -> None:
    for name in _written(out_dir) or []:  # only what an earlier demo wrote (claim_output_folder checked)
        (out_dir / name).unlink(missing_ok=True)
    vector_path = out_dir / "vector.zarr"
    for folder in sorted((p for p in vector_path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        folder.rmdir()  # empty once its files are gone; a file put there since raises instead
    if vector_path.is_dir():
        vector_path.rmdir()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    pairs_figure(pairs, max_pairs=8, judge=judge).savefig(out_dir / "pairs.png", dpi=110, bbox_inches="tight")
    gate_figure(pairs).savefig(out_dir / "gates.png", dpi=110, bbox_inches="tight")
    if maps is not None:
        attention_figure(maps).savefig(out_dir / "attention.png", dpi=110, bbox_inches="tight")
    write_explorer(pairs, out_dir / "explorer.html", attention=maps, judge=judge)
    save_vector(vector, vector_path)
    files = [name for name in OUTPUTS[:-1] if (out_dir / name).exists()]
    files += [str(p.relative_to(out_dir)) for p in vector_path.rglob("*") if p.is_file()]
    _mark(out_dir, sorted(files))


def _print_table(summary: dict, out_dir: Path) -> None:
    def fmt(key: str) -> str:
        value = summary.get(key)
        if value is None:
            return summary.get(f"{key}_status", "unavailable")
        low, high = summary.get(f"{key}_ci95", [value, value])
        return f"{value:.3f}  [{low:.3f}, {high:.3f}]"

    print(f"\n{summary['steer']['name']}: {summary['steer_description']}")
    print(f"{'metric':22s} value  [95% CI]   (n = {summary['n_pairs']} pairs)")
    for key in ("flip_rate", "target_rate", "dye_detection_rate", "polyp_kept", "confidence_shift",
                "unsteered_recognised", "bg_ssim", "bg_psnr", "whole_image_ssim", "whole_image_psnr"):
        if key in summary:
            print(f"{key:22s} {fmt(key)}")
    for key in ("bg_lpips", "whole_image_lpips"):
        if f"{key}_status" in summary:
            print(f"{key:22s} {summary[f'{key}_status']}")
    print(f"{summary['seconds']} s")
    written = [name for name in OUTPUTS if (out_dir / name).exists()]
    print(f"wrote {out_dir}/" + ", ".join(written))
