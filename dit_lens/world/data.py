"""The world's splits as fine-tuning data: captioned images, in memory or as an ``imagefolder``.

The shipped model was trained on the ``"train"`` split; the ``"shifted"`` split (other lighting and
texture) plays a new domain to adapt it to (`dit_lens.finetune`). Every image is captioned with its
class's canonical caption (``"An endoscopic image of <label>"``), the prompt a user samples with.

Examples:
    >>> data = world_split("shifted", per_class=2, counts={"polyps": 1})
    >>> len(data), data.texts[:3]
    (15, ('An endoscopic image of normal cecum', 'An endoscopic image of normal cecum', 'An endoscopic image of normal pylorus'))
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from ..training.data import TrainingImages, write_image_folder
from .procedural import LABELS, SPLITS, caption, render

__all__ = ["parse_counts", "world_split", "write_world_split"]


def parse_counts(items: Sequence[str]) -> dict[str, int]:
    """``["esophagitis=3", ...]`` (a ``--count`` flag) as ``{"esophagitis": 3}``."""
    counts = {}
    for item in items:
        label, sep, n = str(item).rpartition("=")
        if not sep or not n.isdigit():
            raise ValueError(f"--count takes LABEL=N such as esophagitis=3, got {item!r}")
        counts[label] = int(n)
    return counts


def world_split(split: str = "shifted", *, per_class: int = 20, seed_base: int = 0,
                counts: Mapping[str, int] | None = None, labels: Sequence[str] = LABELS) -> TrainingImages:
    """`per_class` images of each label of `split` (seeds ``seed_base …``), or ``counts[label]`` of some.

    Raises:
        ValueError: an unknown split or label, or a count below 0 (or below 1 for `per_class`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    counts = dict(counts or {})
    for label in list(labels) + list(counts):
        if label not in LABELS:
            raise ValueError(f"unknown label {label!r}; the world's labels are {list(LABELS)}")
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a whole number >= 1, got {per_class!r}")
    for label, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"counts[{label!r}] must be a whole number >= 0, got {n!r}")
    chosen = [(label, seed_base + i) for label in labels for i in range(counts.get(label, per_class))]
    if not chosen:
        raise ValueError("no images chosen: every count is 0")
    samples = render([label for label, _ in chosen], [seed for _, seed in chosen], split=split)
    what = ", ".join(f"{label} {counts.get(label, per_class)}" for label in labels)
    return TrainingImages.from_arrays(samples.images, [caption(label) for label, _ in chosen],
                                      source=f"world {split} split, seeds {seed_base}+ ({what})")


def write_world_split(out: str | Path, split: str = "shifted", *, per_class: int = 20, seed_base: int = 0,
                      counts: Mapping[str, int] | None = None, labels: Sequence[str] = LABELS) -> Path:
    """`world_split` written to the new folder `out` as PNGs and ``metadata.jsonl``."""
    data = world_split(split, per_class=per_class, seed_base=seed_base, counts=counts, labels=labels)
    return write_image_folder(out, data.images, data.texts)
