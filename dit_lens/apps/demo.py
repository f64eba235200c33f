"""`dit-lens demo`: concept vector → counterfactual pairs → metrics, figures and the explorer.

On the embedded world with no arguments it removes polyps (polyps → normal cecum). On a user's
checkpoint, ``--model DIR [--lora DIR] --positive ... --negative ...`` runs the same; flip metrics
then need a classifier that knows the labels (``--oracle``), otherwise they are reported as
unavailable rather than guessed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..study import metrics as M
from ..interventions.blend import check_blend
from ..views.explorer import write_explorer
from ..views.figures import gate_figure, pairs_figure
from ..interventions.generate import generate
from ..model.lens import load
from ..interventions.steer import Steer
from ..study.declaration import window_layers
from ..world.domain import ENDOSCOPY_CONTEXTS
from ..readouts.vectors import concept_vector, save_vector

__all__ = ["add_demo_arguments", "run_demo"]

#: Demo defaults on the embedded world, as picked by the layer and alpha sweeps (README, Results).
DEFAULT_SOURCE, DEFAULT_TARGET = "polyps", "normal cecum"
DEFAULT_WINDOW = (0.0, 1.0)
DEFAULT_ALPHA = 3.0
DEFAULT_BLEND = 0.0


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="pipeline folder (default: the embedded world)")
    p.add_argument("--lora", default=None, help="peft LoRA adapter folder to merge into the denoiser")
    p.add_argument("--out", default="cache/demo", help="output folder (default: cache/demo)")
    p.add_argument("--source", default=DEFAULT_SOURCE, help="label of the concept to remove")
    p.add_argument("--target", default=DEFAULT_TARGET, help="label of the counterfactual")
    p.add_argument("--positive", nargs="+", help="prompts with the concept (default: contexts × source)")
    p.add_argument("--negative", nargs="+", help="prompts without it (default: contexts × target)")
    p.add_argument("--prompt", default=None, help="generation prompt (default: 'An endoscopic image of SOURCE')")
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


def run_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_blend(args.blend)
    lens = load(args.model, lora=args.lora)
    positive = args.positive or [c.format(args.source) for c in ENDOSCOPY_CONTEXTS]
    negative = args.negative or [c.format(args.target) for c in ENDOSCOPY_CONTEXTS]
    prompt = args.prompt or f"An endoscopic image of {args.source}"
    oracle_source = args.oracle or ("embedded" if args.model == "embedded" else None)

    print(f"[1/3] concept vector: {len(positive)} positive vs {len(negative)} negative prompts × {args.vector_seeds} seeds")
    vector = concept_vector(lens, positive=positive, negative=negative, seeds=list(range(args.vector_seeds)),
                            num_inference_steps=args.steps, guidance_scale=args.guidance, batch_size=8)
    layers = window_layers(tuple(args.window), lens.num_layers)
    steer = Steer(vector, alpha=args.alpha, layers=layers, renormalize=args.renormalize,
                  name=f"{args.source} → {args.target}")
    seeds = [10_000 + i for i in range(args.pairs)]
    print(f"[2/3] {args.pairs} counterfactual pairs, {steer!r}")
    pairs = generate(lens, prompt, seeds=seeds, steer=steer, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, record_gates=True, blend=args.blend, batch_size=8)

    print("[3/3] metrics and figures")
    summary = _measure(pairs, oracle_source, args.source)
    summary.update(
        n_pairs=args.pairs,
        settings={"alpha": args.alpha, "layers": layers, "window": list(args.window),
                  "renormalize": args.renormalize, "blend": args.blend, "num_inference_steps": args.steps,
                  "guidance_scale": args.guidance, "seeds": seeds,
                  "vector_seeds": list(range(args.vector_seeds)), "prompt": prompt,
                  "positive": positive, "negative": negative},
        steer=steer.settings(),
        provenance=lens.provenance(),
        seconds=round(time.perf_counter() - start, 1),
    )
    _write_outputs(out_dir, pairs, vector, summary)
    _print_table(summary, out_dir)
    return 0


def _measure(pairs, oracle_source, source_label) -> dict:
    result: dict = {}
    if oracle_source is None:
        masks_note = "no segmenter: background = whole image"
        background = ~M.segment(pairs, lambda x: np.zeros(x.shape[:3], bool)).any("branch")
        for key in ("flip_rate", "confidence_shift"):
            result[key] = None
            result[f"{key}_status"] = "unavailable: no classifier for this model (pass --oracle)"
    else:
        from ..world import load_oracle, load_segmenter

        oracle, segmenter = load_oracle(oracle_source), load_segmenter(oracle_source)
        probs = M.classify(pairs, oracle)
        masks = M.segment(pairs, segmenter)
        background = M.background_mask(masks)
        masks_note = f"outside the union of both images' lesion masks ({oracle_source} segmenter)"
        for key, values in (("flip_rate", M.flips(probs, source_label)),
                            ("confidence_shift", M.confidence_drop(probs, source_label)),
                            ("unsteered_recognised", 1.0 - M.flips(probs, source_label, branch="unsteered"))):
            est = M.estimate(values)
            result[key], result[f"{key}_ci95"] = est.value, [est.low, est.high]
    for key, values in (("bg_ssim", M.background_ssim(pairs, background)),
                        ("bg_psnr", M.background_psnr(pairs, background).clip(max=100.0))):
        est = M.estimate(values)
        result[key], result[f"{key}_ci95"] = est.value, [est.low, est.high]
    lpips = M.background_lpips(pairs, background)
    result["bg_lpips"] = None if lpips.attrs["status"].startswith("unavailable") else M.estimate(lpips).value
    result["bg_lpips_status"] = lpips.attrs["status"]
    result["background"] = masks_note
    result["metrics_version"] = M.METRICS_VERSION
    result["bg_ssim_definition"] = "7x7 SSIM, window statistics over background pixels only, averaged over them"
    return result


def _write_outputs(out_dir: Path, pairs, vector, summary: dict) -> None:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    pairs_figure(pairs, max_pairs=8).savefig(out_dir / "pairs.png", dpi=110, bbox_inches="tight")
    gate_figure(pairs).savefig(out_dir / "gates.png", dpi=110, bbox_inches="tight")
    write_explorer(pairs, out_dir / "explorer.html")
    vector_path = out_dir / "vector.zarr"
    if vector_path.exists():
        import shutil

        shutil.rmtree(vector_path)  # the demo folder is the demo's own output: rewritten each run
    save_vector(vector, vector_path)


def _print_table(summary: dict, out_dir: Path) -> None:
    def fmt(key: str) -> str:
        value = summary.get(key)
        if value is None:
            return summary.get(f"{key}_status", "unavailable")
        low, high = summary.get(f"{key}_ci95", [value, value])
        return f"{value:.3f}  [{low:.3f}, {high:.3f}]"

    print(f"\n{'metric':22s} value  [95% CI]   (n = {summary['n_pairs']} pairs)")
    for key in ("flip_rate", "confidence_shift", "unsteered_recognised", "bg_ssim", "bg_psnr"):
        if key in summary:
            print(f"{key:22s} {fmt(key)}")
    print(f"{'bg_lpips':22s} {summary['bg_lpips_status']}")
    s = summary["settings"]
    print(f"settings: alpha={s['alpha']} layers={s['layers']} renormalize={s['renormalize']} blend={s['blend']} "
          f"steps={s['num_inference_steps']} guidance={s['guidance_scale']}; {summary['seconds']} s")
    print(f"wrote {out_dir}/summary.json, pairs.png, gates.png, explorer.html, vector.zarr")
