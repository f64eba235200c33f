"""Re-check the demo's figures printed in RESULTS.md against a fresh run of the same commands.

Runs ``dit-lens demo`` and ``dit-lens demo --window 0 0.25 --alpha 4 --blend 0.3`` in temporary folders
with a fresh cache, reads each ``summary.json``, and compares every figure the paragraph of RESULTS.md on
that command prints (flip, confidence shift, unsteered recognised, Bg-SSIM with its interval, Bg-PSNR),
at the precision printed. Exit status 1 names each figure that no longer holds.

Usage:
    python benchmarks/demo_figures.py [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "RESULTS.md"
COMMANDS = {"`dit-lens demo` (defaults": [], "`dit-lens demo --window 0 0.25 --alpha 4 --blend 0.3`":
            ["--window", "0", "0.25", "--alpha", "4", "--blend", "0.3"]}
#: Words of RESULTS.md → summary.json key.
FIGURES = {"flip": "flip_rate", "confidence shift": "confidence_shift",
           "unsteered images recognised as polyps": "unsteered_recognised", "Bg-SSIM": "bg_ssim", "Bg-PSNR": "bg_psnr"}


def printed(paragraph: str) -> dict[str, tuple[str, list[str]]]:
    """Each figure the paragraph prints: (value, [low, high] when given), as text."""
    found = {}
    for words, key in FIGURES.items():
        match = re.search(rf"{re.escape(words)} ([0-9.]+)(?: dB)?(?:\s+\[([0-9.]+), ([0-9.]+)\])?", paragraph)
        if match:
            found[key] = (match.group(1), [g for g in match.groups()[1:] if g])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    text = RESULTS.read_text()
    wrong = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DIT_LENS_CACHE": str(Path(tmp) / "cache"), "TQDM_DISABLE": "1"}
        for start, flags in COMMANDS.items():
            paragraph = text[text.index(start):][:700]
            out = Path(tmp) / f"demo{len(flags)}"
            threads = ["--threads", str(args.threads)] if args.threads else []
            subprocess.run(["dit-lens", "demo", *threads, *flags, "--out", str(out)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            summary = json.loads((out / "summary.json").read_text())
            for key, (value, interval) in printed(paragraph).items():
                digits = len(value.split(".")[1]) if "." in value else 0
                got = [summary[key], *(summary[f"{key}_ci95"] if interval else [])]
                shown = [f"{v:.{digits}f}" for v in got]
                status = "ok" if shown == [value, *interval] else "CHANGED"
                print(f"{status:7s} {' '.join(flags) or 'defaults'}: {key} was {[value, *interval]}, now {shown}")
                if status != "ok":
                    wrong.append(key)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
