"""`dit-lens demo`: concept vector → counterfactual pairs → metrics, figures and the explorer.

On the embedded world with no arguments it removes polyps (polyps → normal cecum). On a user's
checkpoint, ``--model DIR [--lora DIR] --positive ... --negative ...`` runs the same; flip metrics
then need a classifier that knows the labels (``--oracle``), otherwise they are reported as
unavailable rather than guessed.

The output folder is claimed through `dit_lens.storage.claim` (kind ``"demo"``): a new or empty
``--out`` is marked as the demo's, and every output is recorded in that sealed marker before it is
written; a folder holding anything else is refused untouched, and an earlier demo's results are
replaced only with ``--overwrite`` (and then only the entries dit-lens recorded, inside the folder).
A run that fails before writing any output leaves no claimed, empty folder behind. Every setting is
checked before the model is loaded. What it measures, writes and prints is `dit_lens.apps.demo_report`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..storage import MARKER, Claim, FolderClaimError, claim, exclusive
from ..validate import (check_guidance, check_int, check_pipeline_folder, check_real, check_seed, check_steps,
                        check_window, check_writable_folder)
from .demo_report import OUTPUTS, measure_pairs, print_summary, write_outputs

# The model, metrics and figures are imported where they are used, so `dit-lens demo --help` and the
# checks of its flags load neither torch nor diffusers.

__all__ = ["MARKER", "OUTPUTS", "add_demo_arguments", "claim_output_folder", "run_demo"]

#: Demo defaults on the embedded world, as picked by the layer and alpha sweeps (RESULTS.md).
DEFAULT_SOURCE, DEFAULT_TARGET = "polyps", "normal cecum"
DEFAULT_WINDOW = (0.0, 1.0)
DEFAULT_ALPHA = 3.0
DEFAULT_BLEND = 0.0
#: The first seed of the counterfactual pairs (the vector's seeds start at 0).
PAIR_SEED_BASE = 10_000


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="pipeline folder (default: the embedded world)")
    p.add_argument("--lora", default=None, help="peft LoRA adapter folder to merge into the denoiser")
    p.add_argument("--out", default=None,
                   help="output folder, new or empty or an earlier demo's (default: demo/ in the cache: "
                        "$DIT_LENS_CACHE, else the checkout's cache/, else ~/.cache/dit-lens)")
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
    from ..interventions.blend import check_blend

    check_real(args.alpha, "--alpha")
    check_window(args.window, "--window")
    check_guidance(args.guidance, name="--guidance")
    check_steps(args.steps, name="--steps")
    check_int(args.pairs, "--pairs", minimum=1)
    check_int(args.vector_seeds, "--vector-seeds", minimum=1)
    for flag, first, count in (("--pairs", PAIR_SEED_BASE, args.pairs), ("--vector-seeds", 0, args.vector_seeds)):
        try:  # its seeds run from `first`; the last one must be a seed too
            check_seed(first + count - 1, "seed")
        except ValueError:
            raise ValueError(f"{flag} {count} asks for seeds up to {first + count - 1}, but seeds are integers in "
                             f"[0, 2**63); pass a smaller {flag}") from None
    try:
        check_blend(args.blend)
    except ValueError as err:
        raise ValueError(f"--blend: {err}") from None
    if args.model != "embedded":
        check_pipeline_folder(args.model)
    if args.lora is not None and not Path(args.lora).expanduser().is_dir():
        raise ValueError(f"--lora {args.lora} is not a folder; pass the folder a fine-tune wrote (`dit-lens finetune "
                         f"--out`) or a peft adapter folder")


def run_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    _check_arguments(args)
    from ..trace.store import CACHE_ENV, cache_root

    check_writable_folder(cache_root(), "the cache folder",
                          f"set {CACHE_ENV} to a writable folder (it holds the captures)")
    if args.out is None:
        args.out = str(cache_root() / "demo")
    made = not Path(args.out).exists()
    with exclusive(Path(args.out)):  # a second demo into this folder waits for this one
        out = claim_output_folder(Path(args.out), overwrite=args.overwrite, identity=_identity(args))
        try:
            return _run(args, out, start)
        except BaseException:
            _release_if_empty(out, made)
            raise


def _identity(args: argparse.Namespace) -> dict:
    """What a demo folder was made for: every flag but the folder itself (folders as resolved paths, however
    they were spelled)."""
    identity = {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "overwrite", "debug", "func", "command")}
    for key in ("model", "lora", "oracle"):
        if identity.get(key) not in (None, "embedded"):
            identity[key] = str(Path(identity[key]).expanduser().resolve())
    return identity


def _release_if_empty(out: Claim, made: bool) -> None:
    """After a failed run: unmark a folder it claimed new and wrote nothing into, and remove it if it made it."""
    if out.state != "new" or out.files or any(p.name != MARKER for p in out.path.iterdir()):
        return
    (out.path / MARKER).unlink(missing_ok=True)
    if made:
        out.path.rmdir()


def _run(args: argparse.Namespace, out: Claim, start: float) -> int:
    from ..interventions.generate import generate
    from ..interventions.steer import Steer
    from ..model.lens import load
    from ..readouts.attention_maps import attention_maps
    from ..readouts.vectors import concept_vector
    from ..study.declaration import window_layers
    from ..views.describe import describe_result

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
    seeds = [PAIR_SEED_BASE + i for i in range(args.pairs)]
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
    summary = measure_pairs(pairs, oracle_source, concept["source"], concept["target"])
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
    judge = segmenter = None
    if oracle_source is not None:
        from ..world import load_oracle, load_segmenter

        judge, segmenter = load_oracle(oracle_source), load_segmenter(oracle_source)
    write_outputs(out, pairs, vector, summary, maps, judge, segmenter)
    print_summary(summary, out.path)
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
    from ..world.domain import ENDOSCOPY_CONTEXTS

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


def claim_output_folder(out_dir: Path, *, overwrite: bool, identity: dict | None = None) -> Claim:
    """Claim `out_dir` for the demo (`dit_lens.storage.claim`): new or empty (marked now), or an earlier demo's.

    Call it holding ``exclusive(out_dir)``. Refuses, untouched: a file, an unwritable folder, a folder
    dit-lens did not mark (whatever it holds, even with `overwrite`), a damaged marker or one naming
    paths outside the folder, files the marker does not record, and an earlier demo's results unless
    `overwrite`. With `overwrite`, only the entries the marker records are removed.
    """
    fix = "pass --out with a new or empty folder"
    try:
        if (out_dir / MARKER).is_file():  # an earlier demo's: its marker checked, nothing changed yet
            foreign = _unrecorded(out_dir, claim(out_dir, "demo", what="--out").files)
            if foreign:
                raise FolderClaimError(f"--out {out_dir} holds files the demo did not write ({', '.join(foreign[:3])}"
                                       f"{', ...' if len(foreign) > 3 else ''}); move them away or {fix} (nothing "
                                       f"was changed)")
        out = claim(out_dir, "demo", identity=identity, overwrite=overwrite, what="--out")
    except FolderClaimError:
        raise
    except OSError as err:
        raise ValueError(f"--out {out_dir} cannot be written ({err.strerror or err}); {fix}") from None
    if out.files:
        if not overwrite:
            raise FolderClaimError(f"--out {out_dir} holds an earlier demo's results; pass --overwrite to replace "
                                   f"them, or {fix} (nothing was changed)")
        out.remove_recorded()
    return out


def _unrecorded(out_dir: Path, files: list[str]) -> list[str]:
    """Files in `out_dir` (at any depth) that its marker does not record: someone else's."""
    found = (p for p in out_dir.rglob("*") if p.is_symlink() or not p.is_dir())
    names = (p.relative_to(out_dir).as_posix() for p in found if not p.name.endswith((".lock", ".tmp")))
    return sorted(n for n in names if n != MARKER and n not in files)


def _source_words(lens, prompt: str, source: str) -> list[str]:
    """The source label as words of the generation prompt, or none when the prompt does not contain it."""
    from ..model.tokens import word_tokens

    try:
        word_tokens(lens, prompt, [source])
    except ValueError:
        return []
    return [source]
