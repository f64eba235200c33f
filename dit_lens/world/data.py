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

import os
from pathlib import Path
from typing import Mapping, Sequence

from ..training.data import TrainingImages, write_image_folder
from ..validate import check_seed
from .procedural import LABELS, SIZE, SPLITS, caption, render

#: Bytes rendering one image takes while a split is made (float64 drawing and stacking, float32 result).
BYTES_PER_IMAGE = SIZE * SIZE * 3 * (8 + 8 + 4)

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
        ValueError: an unknown split or label, a count below 0 (or below 1 for `per_class`), a `seed_base`
            whose seeds leave [0, 2**63), or more images than this machine's memory holds (checked before
            rendering any).
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
    total = sum(counts.get(label, per_class) for label in labels)
    if not total:
        raise ValueError("no images chosen: every count is 0")
    check_seed(seed_base, "seed_base (`--seed-base`)")
    most = max(counts.get(label, per_class) for label in labels)
    if seed_base + most - 1 >= 2**63:
        raise ValueError(f"seed_base (`--seed-base`) {seed_base} with {most} images of a class runs past the largest "
                         f"seed, 2**63 - 1; lower it")
    _check_memory(total)
    chosen = [(label, seed_base + i) for label in labels for i in range(counts.get(label, per_class))]
    samples = render([label for label, _ in chosen], [seed for _, seed in chosen], split=split)
    what = ", ".join(f"{label} {counts.get(label, per_class)}" for label in labels)
    return TrainingImages.from_arrays(samples.images, [caption(label) for label, _ in chosen],
                                      source=f"world {split} split, seeds {seed_base}+ ({what})")


def _check_memory(images: int) -> None:
    """Refuse, before rendering, a split that cannot fit in this machine's memory."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # the platform does not say
        return
    need = images * BYTES_PER_IMAGE
    if need > memory:
        raise ValueError(f"{images} images of {SIZE}x{SIZE} need about {need / 2**30:,.0f} GiB of memory to render "
                         f"in one go, more than this machine's {memory / 2**30:,.0f} GiB; ask for fewer "
                         f"(`--per-class`, `--count`)")


def write_world_split(out: str | Path, split: str = "shifted", *, per_class: int = 20, seed_base: int = 0,
                      counts: Mapping[str, int] | None = None, labels: Sequence[str] = LABELS) -> Path:
    """`world_split` written to the new folder `out` as PNGs and ``metadata.jsonl``."""
    data = world_split(split, per_class=per_class, seed_base=seed_base, counts=counts, labels=labels)
    return write_image_folder(out, data.images, data.texts)
