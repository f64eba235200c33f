"""Inversion-based editing: DDIM inversion of images, and the editors that run on inverted trajectories."""

from .editors import EDITORS, HEdit, PnP, edit
from .trajectory import invert, regenerate
from ..sampling.ddim import ddim_scheduler
from ..sampling.images import check_images

__all__ = ["EDITORS", "HEdit", "PnP", "edit", "check_images", "ddim_scheduler", "invert", "regenerate"]
