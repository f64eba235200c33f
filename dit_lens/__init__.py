"""dit-lens: look inside diffusion transformers and steer them.

The public API is re-exported here; nothing is loaded or computed at import time.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dit-lens")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

from .architectures import PIXART_ALPHA_512, PixArtSpec, build_pixart
from .lens import Lens, load
from .sites import FAMILIES, Family

__all__ = [
    "__version__",
    "FAMILIES",
    "Family",
    "Lens",
    "PIXART_ALPHA_512",
    "PixArtSpec",
    "build_pixart",
    "load",
]
