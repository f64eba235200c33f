"""``dit-lens finetune``: make an adapter from an ``imagefolder`` of captioned images, and ``dit-lens world
data``: write a split of the embedded world as one.

    dit-lens world data --split shifted --per-class 20 --out data/shifted
    dit-lens finetune --data data/shifted --out cache/adapters/shifted --method lora --drift 0.05

The finetune flags are `FinetuneConfig`'s fields; a killed run resumes when the same command is run again,
and a finished one is checked and named again. Every refusal (a folder holding something else or
another fine-tune, a damaged adapter or checkpoint, a run that diverged) is one line, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..training.config import FinetuneConfig, METHODS
from ..validate import check_int, check_pipeline_folder

__all__ = ["add_finetune_arguments", "add_world_data_arguments", "run_finetune", "run_world_data"]

_HELP = {
    "method": f"what trains: {', '.join(METHODS)} (LoRA on every block, LoRA on cross-attention, every weight)",
    "rank": "LoRA rank", "steps": "optimiser steps", "lr": "learning rate (default: 1e-3 LoRA, 1e-4 full)",
    "batch_size": "images per step", "drift": "Latent Drifting delta of the forward process (0 = off)",
    "text_encoder": "also adapt the text encoder", "seed": "seeds the initialisation and every draw",
    "caption_dropout": "share of captions dropped for guidance", "warmup": "linear warm-up steps",
    "checkpoint_every": "steps between checkpoints (a killed run resumes from the last)",
    "validate_every": "steps between held-out loss measurements (with --validation)",
    "mixed_precision": "bf16 or fp16 (fp16 on CUDA only)",
}


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="imagefolder: images + metadata.jsonl (file_name, text)")
    p.add_argument("--out", required=True, help="the adapter folder to write (new, or a run to resume)")
    p.add_argument("--validation", default=None, help="held-out imagefolder: its loss is recorded as training goes")
    p.add_argument("--model", default="embedded", help="pipeline folder to fine-tune (default: the embedded world)")
    p.add_argument("--lora", default=None, help="an adapter merged into the model before fine-tuning")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for f in dataclasses.fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=_HELP[f.name])
        elif f.name == "method":
            p.add_argument(flag, default=f.default, choices=METHODS, help=_HELP[f.name])
        elif f.name == "mixed_precision":
            p.add_argument(flag, default=None, choices=("bf16", "fp16"), help=_HELP[f.name])
        else:
            kind = int if f.name in ("rank", "steps", "batch_size", "seed", "warmup", "checkpoint_every",
                                     "validate_every") else float
            default = "" if f.default is None else f" (default: {f.default})"
            p.add_argument(flag, type=kind, default=f.default, help=_HELP[f.name] + default)


def run_finetune(args: argparse.Namespace) -> int:
    from ..model.lens import load
    from ..training.trainer import finetune, read_record
    from ..training.folder import use_line

    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)}
    try:
        FinetuneConfig(**settings)
    except ValueError as err:  # "seed must be ..." as "--seed must be ...": the flag the user typed
        name, _, rest = str(err).partition(" ")
        if name not in settings:
            raise
        raise ValueError(f"--{name.replace('_', '-')} {rest}") from None
    for flag, folder in (("--data", args.data), ("--validation", args.validation), ("--lora", args.lora)):
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise ValueError(f"{flag} {folder} is not a folder; pass an imagefolder (images and metadata.jsonl)"
                             if flag != "--lora" else f"--lora {folder} is not a folder; pass an adapter folder")
    if args.model != "embedded":
        check_pipeline_folder(args.model)
    lens = load(args.model, lora=args.lora, device=args.device)
    out = finetune(lens, args.data, args.out, validation=args.validation, device=args.device,
                   progress=not args.quiet, **settings)
    record = read_record(out)
    print(f"wrote {out} ({record['steps_done']} steps, {record['train_seconds']:.0f} s of training, "
          f"data {record['data']['digest'][:12]}, {record['data']['images']} images)")
    if record["validation"]:
        best = min(record["validation"], key=lambda v: v[1])
        print(f"held-out loss {record['validation'][0][1]:.4f} at the start, {record['validation'][-1][1]:.4f} at the "
              f"end, lowest {best[1]:.4f} at step {best[0]}")
    print(f"use it: {use_line(out, args.model, record['drift'])}")
    return 0


def add_world_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="a new folder for the images and metadata.jsonl")
    p.add_argument("--split", default="shifted", choices=("train", "shifted"), help="the world's split")
    p.add_argument("--per-class", type=int, default=20, help="images per class")
    p.add_argument("--seed-base", type=int, default=0, help="the first image seed")
    p.add_argument("--count", nargs="+", default=(), metavar="LABEL=N",
                   help='fewer (or more) images of some classes, e.g. "esophagitis=3"')


def run_world_data(args: argparse.Namespace) -> int:
    from ..world.data import parse_counts, write_world_split

    check_int(args.per_class, "--per-class", minimum=1)
    counts = parse_counts(args.count)
    out = write_world_split(args.out, split=args.split, per_class=args.per_class, seed_base=args.seed_base,
                            counts=counts)
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    print(f"wrote {len(meta)} images of the {args.split} split to {out}")
    return 0
