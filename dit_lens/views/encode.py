"""What the interactive pages share: images as PNG data URIs, integer axis ticks, the page style, and writing a
page (atomically, through `dit_lens.storage`: a page is never left half-written).

Examples:
    >>> import numpy as np
    >>> png_uri(np.zeros((2, 2, 3))).startswith("data:image/png;base64,")
    True
    >>> int_ticks(list(range(30)))
    [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from ..storage import write_atomic

__all__ = ["PAGE_STYLE", "int_ticks", "png_uri", "write_page"]

#: The style every explorer page opens with (inside its ``<head>``).
PAGE_STYLE = """<style>
 body { font-family: system-ui, sans-serif; margin: 1em; }
 .controls { display: flex; gap: 2em; align-items: center; flex-wrap: wrap; }
 label { font-size: 0.9em; } output { font-weight: bold; }
</style>"""


def png_uri(image: np.ndarray) -> str:
    """An (H, W, 3) image in [0, 1] as a PNG data URI (8 bits per channel, compressed losslessly)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def int_ticks(values: list[int], most: int = 12) -> list[int]:
    """Integer ticks: every value, or every k-th from the first when there are more than `most`."""
    return values[::-(-len(values) // most)]


def write_page(path: str | Path, page: str) -> Path:
    """Write the HTML `page` to `path` atomically (parent folders are created); returns the path."""
    path = Path(path)
    write_atomic(path, page.encode("utf-8"))
    return path
