"""Training images with captions, in the Hugging Face ``imagefolder`` layout.

A folder holds the images and a ``metadata.jsonl`` with one JSON object per line, ``{"file_name":
"0001.png", "text": "An endoscopic image of polyps"}`` (``file_name`` relative to the folder). That is
what `datasets.load_dataset("imagefolder", data_dir=...)` reads, and what `write_image_folder` writes.

Examples:
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp()) / "data"
    >>> _ = write_image_folder(folder, np.zeros((2, 8, 8, 3), np.float32), ["a", "b"])
    >>> data = read_image_folder(folder, size=8)
    >>> data.images.shape, data.texts
    ((2, 8, 8, 3), ('a', 'b'))
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["TrainingImages", "read_image_folder", "write_image_folder"]

METADATA = "metadata.jsonl"


@dataclass(frozen=True, eq=False)
class TrainingImages:
    """Images and their captions, ready to train on.

    Attributes:
        images: ``(N, H, W, 3)`` float32 in [0, 1].
        texts: One caption per image.
        source: Where they came from (a folder path, or a description).
        digest: SHA-256 over every image's bytes and caption, in order: the same data gives the same
            digest, and a fine-tune records it.
    """

    images: np.ndarray
    texts: tuple[str, ...]
    source: str
    digest: str

    def __post_init__(self) -> None:
        images = np.asarray(self.images)
        if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
            raise ValueError(f"training images must be (N, H, W, 3) with N >= 1, got shape {images.shape}")
        if len(self.texts) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.texts)} captions; give one caption per image")
        if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise ValueError("training images must be finite and in [0, 1]")

    def __len__(self) -> int:
        return len(self.images)

    def summary(self) -> dict:
        """What a fine-tune records about its data: source, digest, count and images per caption."""
        return {"source": self.source, "digest": self.digest, "images": len(self),
                "size": list(self.images.shape[1:3]), "per_caption": dict(Counter(self.texts))}

    @classmethod
    def from_arrays(cls, images: np.ndarray, texts: Sequence[str], source: str = "arrays") -> "TrainingImages":
        """Wrap in-memory images ``(N, H, W, 3)`` in [0, 1] and their captions; the digest is computed."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        texts = tuple(str(t) for t in texts)
        digest = hashlib.sha256()
        for image, text in zip(images, texts):
            digest.update(image.tobytes())
            digest.update(text.encode() + b"\0")
        return cls(images, texts, source, digest.hexdigest())


def _resize(image, size: int):
    """Centre-crop to a square, then resize to `size` × `size` (bicubic), as diffusers' training scripts do."""
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), Image.BICUBIC)


def _pixels(file: Path, where: str, size: int) -> np.ndarray:
    """One image ``(size, size, 3)`` in [0, 1], scaled by its real bit depth (16-bit PNGs too)."""
    from PIL import Image

    try:
        with Image.open(file) as image:
            image.load()
            if image.mode.startswith("I"):  # 16-bit greyscale ("I;16", or "I" as PNG decoders give it)
                grey = np.asarray(image, dtype=np.float64)  # (H, W)
                if grey.min() < 0 or grey.max() > 65535:
                    raise ValueError(f"{file} ({where}) holds {image.mode} pixel values outside 0..65535; save it as "
                                     f"an 8- or 16-bit PNG")
                resized = np.asarray(_resize(Image.fromarray((grey / 65535).astype(np.float32), mode="F"), size))
                return np.repeat(np.clip(resized, 0, 1)[..., None], 3, axis=-1)  # (size, size, 3)
            if image.mode == "F":
                raise ValueError(f"{file} ({where}) is a floating-point image, whose range is unknown; save it as an "
                                 f"8- or 16-bit PNG")
            return np.asarray(_resize(image.convert("RGB"), size), dtype=np.float32) / 255.0  # (size, size, 3)
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{file} ({where}) cannot be read as an image ({' '.join(str(err).split())}); replace "
                         f"it, or remove its line") from None


def read_image_folder(path: str | Path, *, size: int) -> TrainingImages:
    """The images and captions of an ``imagefolder`` folder, each centre-cropped and resized to `size`.

    Images are scaled by their bit depth: 8-bit images by 255, 16-bit greyscale PNGs by 65535.

    Args:
        path: A folder with ``metadata.jsonl`` (``file_name`` and ``text`` on every line).
        size: The model's image side in pixels.

    Raises:
        FileNotFoundError: no folder, no ``metadata.jsonl``, or a listed image is missing.
        ValueError: ``metadata.jsonl`` is not UTF-8, a line is not JSON or lacks ``file_name`` or
            ``text``, an image cannot be read, or the folder lists no image.
    """
    folder = Path(path)
    meta = folder / METADATA
    if not folder.is_dir():
        raise FileNotFoundError(f"no such training data folder: {folder}")
    if not meta.is_file():
        raise FileNotFoundError(f"{folder} has no {METADATA}; write one line per image such as "
                                '{"file_name": "0001.png", "text": "An endoscopic image of polyps"}')
    images, texts = [], []
    try:
        text = meta.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{meta} is not UTF-8 text (byte {err.start} is {meta.read_bytes()[err.start:err.start + 1]!r}, "
                         f"as latin-1 or another encoding writes it); save it as UTF-8") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta} line {number} is not JSON ({err.msg}): {line[:80]!r}") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get("text"), str):
            raise ValueError(f"{meta} line {number} needs a string 'file_name' and a string 'text', got {line[:80]!r}")
        file = folder / row["file_name"]
        if not file.is_file():
            raise FileNotFoundError(f"{meta} line {number} names {row['file_name']!r}, which is not in {folder}")
        images.append(_pixels(file, f"line {number} of {METADATA}", size))
        texts.append(row["text"])
    if not images:
        raise ValueError(f"{meta} lists no images")
    data = TrainingImages.from_arrays(np.stack(images), texts, source=str(folder.resolve()))
    return data


def write_image_folder(path: str | Path, images: np.ndarray, texts: Sequence[str]) -> Path:
    """Write images ``(N, H, W, 3)`` in [0, 1] as PNGs with their captions in ``metadata.jsonl``.

    Refuses a folder that exists and is not empty (nothing is overwritten).
    """
    from PIL import Image

    folder = Path(path)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty; write the training data to a new folder")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(texts):
        raise ValueError(f"expected images (N, H, W, 3) and N captions, got {images.shape} and {len(texts)}")
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, text) in enumerate(zip(images, texts)):
        name = f"{i:05d}.png"
        Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": str(text)}))
    (folder / METADATA).write_text("\n".join(lines) + "\n")
    return folder
