"""The `dit-lens` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _world(args: argparse.Namespace) -> int:
    from ..world.build import build_world

    build_world(args)
    return 0


def _study(args: argparse.Namespace) -> int:
    from ..study.cli import run_study_file

    return run_study_file(args.name, args.rest)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dit-lens", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="counterfactual pairs on the embedded world (or --model)")
    from .demo import add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(func=_demo)

    study = sub.add_parser("study", help="run studies/<name>.py (flags go to the study)")
    study.add_argument("name", help="layer_sweep, alpha_sweep, seed_count, concept_pairs, dye, downstream")
    study.add_argument("rest", nargs=argparse.REMAINDER, help="the study's own flags, e.g. --quick")
    study.set_defaults(func=_study)

    world = sub.add_parser("world", help="the embedded endoscopy world")
    world_sub = world.add_subparsers(dest="world_command", required=True)
    build = world_sub.add_parser("build", help="rebuild the shipped world from seeded code")
    build.add_argument("--out", default=None, help="where to write (default: the package)")
    build.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (checks only)")
    build.add_argument("--device", default="cpu", help="where to train: cpu (default) or cuda")
    build.add_argument("--set", nargs="+", default=None, metavar="STAGE.FIELD=VALUE",
                       help="change the recipe, e.g. transformer.steps=3000 train_text_encoder=true")
    build.set_defaults(func=_world)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"dit-lens: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
