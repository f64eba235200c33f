"""dit-lens: look inside diffusion transformers and steer them.

The public API is re-exported here, each name imported on first use: nothing is loaded or computed
at import time.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .version import __version__

#: Each public name: (module, its name there when it differs; "" for the module itself). Imported on
#: first use (PEP 562), so ``import dit_lens`` and ``dit-lens --help`` load neither torch nor diffusers.
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "PIXART_ALPHA_512": ("dit_lens.model.builders", None),
    "PixArtSpec": ("dit_lens.model.builders", None),
    "build_pixart": ("dit_lens.model.builders", None),
    "SanaSpec": ("dit_lens.model.sana", None),
    "build_sana": ("dit_lens.model.sana", None),
    "FluxSpec": ("dit_lens.model.flux", None),
    "build_flux": ("dit_lens.model.flux", None),
    "SD3Spec": ("dit_lens.model.sd3", None),
    "build_sd3": ("dit_lens.model.sd3", None),
    "methods": ("dit_lens.methods", ""),
    "metrics": ("dit_lens.metrics", ""),
    "EditContext": ("dit_lens.interventions.base", None),
    "Intervention": ("dit_lens.interventions.base", None),
    "LatentEdit": ("dit_lens.interventions.base", None),
    "SiteEdit": ("dit_lens.interventions.base", None),
    "UnverifiedWarning": ("dit_lens.interventions.base", None),
    "Reweight": ("dit_lens.interventions.reweight", None),
    "intervention_from_dict": ("dit_lens.interventions.base", 'from_dict'),
    "Blend": ("dit_lens.interventions.blend", None),
    "blend_latents": ("dit_lens.interventions.blend", None),
    "LatentDrift": ("dit_lens.interventions.drift", None),
    "Inject": ("dit_lens.interventions.inject", None),
    "OptimizedNoise": ("dit_lens.interventions.noise", None),
    "attention_concentration": ("dit_lens.interventions.noise", None),
    "class_probability": ("dit_lens.interventions.noise", None),
    "optimize_noise": ("dit_lens.interventions.noise", None),
    "Confine": ("dit_lens.interventions.region", None),
    "Region": ("dit_lens.interventions.region", None),
    "AttentionRegulation": ("dit_lens.interventions.regulate", None),
    "EnergyGuidance": ("dit_lens.interventions.regulate", None),
    "GateSelfAttention": ("dit_lens.interventions.regulate", None),
    "RegionReweight": ("dit_lens.interventions.regulate", None),
    "CaptureSettings": ("dit_lens.trace.capture", None),
    "capture": ("dit_lens.trace.capture", None),
    "write_explorer": ("dit_lens.views.explorer", None),
    "gate_figure": ("dit_lens.views.figures", None),
    "pairs_figure": ("dit_lens.views.figures", None),
    "generate": ("dit_lens.interventions.generate", None),
    "reprompt": ("dit_lens.interventions.generate", None),
    "ConceptPair": ("dit_lens.methods", None),
    "Method": ("dit_lens.methods", None),
    "MethodContext": ("dit_lens.methods", None),
    "Lens": ("dit_lens.model.lens", None),
    "load": ("dit_lens.model.lens", None),
    "FAMILIES": ("dit_lens.model.sites", None),
    "Family": ("dit_lens.model.sites", None),
    "Steer": ("dit_lens.interventions.steer", None),
    "steer_tokens": ("dit_lens.interventions.steer", None),
    "DamagedCellError": ("dit_lens.study.cells", None),
    "BusyError": ("dit_lens.storage", None),
    "DamagedError": ("dit_lens.storage", None),
    "FolderClaimError": ("dit_lens.storage", None),
    "StorageError": ("dit_lens.storage", None),
    "CaptureStoreError": ("dit_lens.trace.store", None),
    "DamagedStoreError": ("dit_lens.trace.store", None),
    "Metric": ("dit_lens.study", None),
    "Study": ("dit_lens.study", None),
    "pick_settings": ("dit_lens.study", None),
    "run_study": ("dit_lens.study", None),
    "attention_maps": ("dit_lens.readouts.attention_maps", None),
    "patching": ("dit_lens.readouts.patching", None),
    "attribution_patching": ("dit_lens.readouts.attribution", None),
    "class_logprob": ("dit_lens.readouts.attribution", None),
    "x0_lens": ("dit_lens.readouts.x0_lens", None),
    "patching_figure": ("dit_lens.views.patching", None),
    "x0_lens_figure": ("dit_lens.views.x0", None),
    "edit": ("dit_lens.inversion", None),
    "invert": ("dit_lens.inversion", None),
    "regenerate": ("dit_lens.inversion", None),
    "word_tokens": ("dit_lens.model.tokens", None),
    "NonFiniteError": ("dit_lens.validate", None),
    "attention_figure": ("dit_lens.views.attention", None),
    "concept_vector": ("dit_lens.readouts.vectors", None),
    "export_authors": ("dit_lens.readouts.vectors", None),
    "import_authors": ("dit_lens.readouts.vectors", None),
    "load_vector": ("dit_lens.readouts.vectors", None),
    "normalize_vector": ("dit_lens.readouts.vectors", None),
    "save_vector": ("dit_lens.readouts.vectors", None),
    "FinetuneConfig": ("dit_lens.training", None),
    "TrainingImages": ("dit_lens.training", None),
    "finetune": ("dit_lens.training", None),
    "read_image_folder": ("dit_lens.training", None),
    "write_image_folder": ("dit_lens.training", None),
    "load_anatomy_segmenter": ("dit_lens.world", None),
    "load_oracle": ("dit_lens.world", None),
    "load_segmenter": ("dit_lens.world", None),
}

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
    "patching",
    "reprompt",
    "save_vector",
    "steer_tokens",
    "write_explorer",
    "metrics",
    "attribution_patching",
    "class_logprob",
    "x0_lens",
    "patching_figure",
    "x0_lens_figure",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dit_lens' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    loaded = import_module(module)
    value = loaded if attribute == "" else getattr(loaded, attribute or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .model.builders import PIXART_ALPHA_512
    from .model.builders import PixArtSpec
    from .model.builders import build_pixart
    from .model.sana import SanaSpec
    from .model.sana import build_sana
    from .model.flux import FluxSpec
    from .model.flux import build_flux
    from .model.sd3 import SD3Spec
    from .model.sd3 import build_sd3
    from . import methods
    from . import metrics
    from .interventions.base import EditContext
    from .interventions.base import Intervention
    from .interventions.base import LatentEdit
    from .interventions.base import SiteEdit
    from .interventions.base import UnverifiedWarning
    from .interventions.reweight import Reweight
    from .interventions.base import from_dict as intervention_from_dict
    from .interventions.blend import Blend
    from .interventions.blend import blend_latents
    from .interventions.drift import LatentDrift
    from .interventions.inject import Inject
    from .interventions.noise import OptimizedNoise
    from .interventions.noise import attention_concentration
    from .interventions.noise import class_probability
    from .interventions.noise import optimize_noise
    from .interventions.region import Confine
    from .interventions.region import Region
    from .interventions.regulate import AttentionRegulation
    from .interventions.regulate import EnergyGuidance
    from .interventions.regulate import GateSelfAttention
    from .interventions.regulate import RegionReweight
    from .trace.capture import CaptureSettings
    from .trace.capture import capture
    from .views.explorer import write_explorer
    from .views.figures import gate_figure
    from .views.figures import pairs_figure
    from .interventions.generate import generate
    from .interventions.generate import reprompt
    from .methods import ConceptPair
    from .methods import Method
    from .methods import MethodContext
    from .model.lens import Lens
    from .model.lens import load
    from .model.sites import FAMILIES
    from .model.sites import Family
    from .interventions.steer import Steer
    from .interventions.steer import steer_tokens
    from .study.cells import DamagedCellError
    from .storage import BusyError
    from .storage import DamagedError
    from .storage import FolderClaimError
    from .storage import StorageError
    from .trace.store import CaptureStoreError
    from .trace.store import DamagedStoreError
    from .study import Metric
    from .study import Study
    from .study import pick_settings
    from .study import run_study
    from .readouts.attention_maps import attention_maps
    from .readouts.patching import patching
    from .readouts.attribution import attribution_patching
    from .readouts.attribution import class_logprob
    from .readouts.x0_lens import x0_lens
    from .views.patching import patching_figure
    from .views.x0 import x0_lens_figure
    from .inversion import edit
    from .inversion import invert
    from .inversion import regenerate
    from .model.tokens import word_tokens
    from .validate import NonFiniteError
    from .views.attention import attention_figure
    from .readouts.vectors import concept_vector
    from .readouts.vectors import export_authors
    from .readouts.vectors import import_authors
    from .readouts.vectors import load_vector
    from .readouts.vectors import normalize_vector
    from .readouts.vectors import save_vector
    from .training import FinetuneConfig
    from .training import TrainingImages
    from .training import finetune
    from .training import read_image_folder
    from .training import write_image_folder
    from .world import load_anatomy_segmenter
    from .world import load_oracle
    from .world import load_segmenter
