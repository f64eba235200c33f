"""dit-lens: look inside diffusion transformers and steer them.

The public API is re-exported here; nothing is loaded or computed at import time.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dit-lens")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

from .model.builders import PIXART_ALPHA_512, PixArtSpec, build_pixart
from .model.sana import SanaSpec, build_sana
from .model.flux import FluxSpec, build_flux
from .model.sd3 import SD3Spec, build_sd3
from . import methods
from .interventions.base import EditContext, Intervention, LatentEdit, SiteEdit, UnverifiedWarning
from .interventions.reweight import Reweight
from .interventions.base import from_dict as intervention_from_dict
from .interventions.blend import Blend, blend_latents
from .interventions.drift import LatentDrift
from .interventions.inject import Inject
from .interventions.noise import OptimizedNoise, attention_concentration, class_probability, optimize_noise
from .interventions.region import Confine, Region
from .interventions.regulate import AttentionRegulation, EnergyGuidance, GateSelfAttention, RegionReweight
from .trace.capture import CaptureSettings, capture
from .views.explorer import write_explorer
from .views.figures import gate_figure, pairs_figure
from .interventions.generate import generate, reprompt
from .methods import ConceptPair, Method, MethodContext
from .model.lens import Lens, load
from .model.sites import FAMILIES, Family
from .interventions.steer import Steer, steer_tokens
from .study.cells import DamagedCellError
from .storage import BusyError, DamagedError, FolderClaimError, StorageError
from .trace.store import CaptureStoreError, DamagedStoreError
from .study import Metric, Study, pick_settings, run_study
from .readouts.attention_maps import attention_maps
from .inversion import edit, invert, regenerate
from .trace.tokens import word_tokens
from .validate import NonFiniteError
from .views.attention import attention_figure
from .readouts.vectors import (concept_vector, export_authors, import_authors, load_vector, normalize_vector,
                               save_vector)
from .training import FinetuneConfig, TrainingImages, finetune, read_image_folder, write_image_folder
from .world import load_anatomy_segmenter, load_oracle, load_segmenter

__all__ = [
    "__version__",
    "attention_figure",
    "attention_maps",
    "edit",
    "invert",
    "regenerate",
    "word_tokens",
    "AttentionRegulation",
    "Blend",
    "Confine",
    "EditContext",
    "EnergyGuidance",
    "GateSelfAttention",
    "Inject",
    "OptimizedNoise",
    "attention_concentration",
    "class_probability",
    "optimize_noise",
    "Region",
    "RegionReweight",
    "Intervention",
    "LatentDrift",
    "LatentEdit",
    "Reweight",
    "SiteEdit",
    "intervention_from_dict",
    "BusyError",
    "DamagedError",
    "CaptureSettings",
    "DamagedCellError",
    "DamagedStoreError",
    "FolderClaimError",
    "NonFiniteError",
    "UnverifiedWarning",
    "normalize_vector",
    "ConceptPair",
    "Method",
    "MethodContext",
    "Metric",
    "Study",
    "methods",
    "pick_settings",
    "run_study",
    "CaptureStoreError",
    "FAMILIES",
    "Family",
    "Lens",
    "PIXART_ALPHA_512",
    "PixArtSpec",
    "SanaSpec",
    "SD3Spec",
    "FluxSpec",
    "Steer",
    "StorageError",
    "blend_latents",
    "build_pixart",
    "build_sana",
    "build_sd3",
    "build_flux",
    "capture",
    "concept_vector",
    "export_authors",
    "finetune",
    "FinetuneConfig",
    "TrainingImages",
    "read_image_folder",
    "write_image_folder",
    "gate_figure",
    "generate",
    "import_authors",
    "load",
    "load_anatomy_segmenter",
    "load_oracle",
    "load_segmenter",
    "load_vector",
    "pairs_figure",
    "reprompt",
    "save_vector",
    "steer_tokens",
    "write_explorer",
]
