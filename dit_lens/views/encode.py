"""What the interactive pages share: images as PNG data URIs and integer axis ticks.

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

import numpy as np

__all__ = ["int_ticks", "png_uri"]


def png_uri(image: np.ndarray) -> str:
    """An (H, W, 3) image in [0, 1] as a PNG data URI (8 bits per channel, compressed losslessly)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def int_ticks(values: list[int], most: int = 12) -> list[int]:
    """Integer ticks: every value, or every k-th from the first when there are more than `most`."""
    return values[::-(-len(values) // most)]
