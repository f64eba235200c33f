"""The `dit-lens` command line.

Its help and its checks of flags load no model code (torch and diffusers are imported when a command
runs), so ``dit-lens --help`` answers at once.

A user error (a bad value, a missing or damaged pipeline folder, an output or cache folder that is a
file or cannot be written, a run that diverged) prints one line naming what to fix and exits with
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from ..validate import USER_ERRORS

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _world(args: argparse.Namespace) -> int:
    from ..world.build import build_world

    build_world(args)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .finetune import run_finetune

    return run_finetune(args)


def _world_data(args: argparse.Namespace) -> int:
    from .finetune import run_world_data

    return run_world_data(args)


def _study(args: argparse.Namespace) -> int:
    from ..study.cli import run_study_file

    return run_study_file(args.name, args.rest)


class ShowDefaults(argparse.RawDescriptionHelpFormatter):
    """``--help`` shows each flag's default, unless it has none or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == argparse.SUPPRESS or \
                not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the flag and where to read more (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def parser() -> argparse.ArgumentParser:
    from ..version import __version__

    p = Parser(prog="dit-lens", description=__doc__)
    p.add_argument("--version", action="version", version=f"dit-lens {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    debug = Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
    debug.add_argument("--threads", type=int, default=argparse.SUPPRESS, help=THREADS_HELP)

    demo = sub.add_parser("demo", parents=[debug], formatter_class=ShowDefaults, help="counterfactual pairs on the embedded world (or --model)")
    from .demo import add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(func=_demo)

    study = sub.add_parser("study", parents=[debug], help="run studies/<name>.py (flags go to the study)")
    study.add_argument("name", help="a file of studies/: layer_sweep, alpha_sweep, seed_count, concept_pairs, dye, "
                                           "insert_lesion, downstream, drift, long_tail")
    study.add_argument("rest", nargs=argparse.REMAINDER, help="the study's own flags, e.g. --quick")
    study.set_defaults(func=_study)

    from .finetune import add_finetune_arguments, add_world_data_arguments

    finetune = sub.add_parser("finetune", parents=[debug], formatter_class=ShowDefaults, help="fine-tune the denoiser (LoRA or full, optional "
                                                                "Latent Drifting) on an imagefolder")
    add_finetune_arguments(finetune)
    finetune.set_defaults(func=_finetune)

    world = sub.add_parser("world", help="the embedded endoscopy world")
    world_sub = world.add_subparsers(dest="world_command", required=True)
    build = world_sub.add_parser("build", parents=[debug], formatter_class=ShowDefaults, help="rebuild the shipped world from seeded code")
    build.add_argument("--out", default=None, help="where to write (default: the package)")
    build.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (checks only)")
    build.add_argument("--device", default="cpu", help="where to train: cpu (default) or cuda")
    build.add_argument("--set", nargs="+", default=None, metavar="STAGE.FIELD=VALUE",
                       help="change the recipe, e.g. transformer.steps=3000 train_text_encoder=true")
    build.set_defaults(func=_world)
    data = world_sub.add_parser("data", parents=[debug], formatter_class=ShowDefaults, help="write a split of the world as an imagefolder")
    add_world_data_arguments(data)
    data.set_defaults(func=_world_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.debug and args.command == "study":
        args.rest = ["--debug", *args.rest]
    try:
        use_threads(args.threads)  # a study run from here runs in this process, with these threads
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"dit-lens: error: {error_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return 2


THREADS_ENV = "DIT_LENS_THREADS"
THREADS_HELP = (f"torch CPU threads (default: ${THREADS_ENV}, else torch's own choice); on a CPU shared with other "
                f"work, try 1")


def use_threads(threads: int | None) -> int | None:
    """Set torch's CPU threads from `threads` (the flag) or ``$DIT_LENS_THREADS``; returns what was set."""
    import os

    flag = "--threads"
    if threads is None and os.environ.get(THREADS_ENV):
        threads, flag = os.environ[THREADS_ENV], f"${THREADS_ENV}"
        try:
            threads = int(threads)
        except ValueError:
            raise ValueError(f"{flag} must be a whole number of threads such as 1, got {threads!r}") from None
    if threads is None:
        return None
    if threads < 1:
        raise ValueError(f"{flag} must be a whole number of threads >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
    return threads


def error_line(err: BaseException) -> str:
    """An error as one line: its message, or for OS errors without one, the kind and the path."""
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return text or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
