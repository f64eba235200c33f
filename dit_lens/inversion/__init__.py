"""Inversion-based editing: DDIM inversion of images, and the editors that run on inverted trajectories."""

from .editors import EDITORS, HEdit, PnP, edit
from .trajectory import invert, regenerate
from .sampler import check_images, ddim_scheduler

__all__ = ["EDITORS", "HEdit", "PnP", "edit", "check_images", "ddim_scheduler", "invert", "regenerate"]
