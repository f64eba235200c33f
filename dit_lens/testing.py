"""Genuine diffusers pipelines of any size with seeded random weights, for tests, examples and benchmarks:
PixArt (`PixArtSpec`, `build_pixart`; `PIXART_ALPHA_512` is PixArt-alpha's 512-pixel shape), SANA, SD3 and
Flux. Nothing is downloaded; the weights are drawn from the seed.

Examples:
    >>> from dit_lens import load
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> lens.num_layers
    2
"""

from .model.builders import PIXART_ALPHA_512, PixArtSpec, build_pixart
from .model.flux import FluxSpec, build_flux
from .model.sana import SanaSpec, build_sana
from .model.sd3 import SD3Spec, build_sd3

__all__ = ["PIXART_ALPHA_512", "FluxSpec", "PixArtSpec", "SD3Spec", "SanaSpec", "build_flux", "build_pixart",
           "build_sana", "build_sd3"]
