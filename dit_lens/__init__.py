"""dit-lens: look inside diffusion transformers and steer them.

The public API is re-exported here, each name imported on first use: nothing is loaded or computed
at import time.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from . import accessors  # registers ds.lens and result.study on xarray (loads xarray, not torch)
from .version import __version__

del accessors  # reached as dit_lens.accessors on first use, as the other modules

#: Each public name: (module, its name there when it differs; "" for the module itself). Imported on
#: first use (PEP 562), so ``import dit_lens`` and ``dit-lens --help`` load neither torch nor diffusers.
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "methods": ("dit_lens.methods", ""),
    "metrics": ("dit_lens.metrics", ""),
    "Reweight": ("dit_lens.interventions.reweight", None),
    "intervention_from_dict": ("dit_lens.interventions.base", 'from_dict'),
    "Blend": ("dit_lens.interventions.blend", None),
    "LatentDrift": ("dit_lens.interventions.drift", None),
    "Inject": ("dit_lens.interventions.inject", None),
    "optimize_noise": ("dit_lens.optimize.noise", None),
    "Confine": ("dit_lens.interventions.region", None),
    "Region": ("dit_lens.interventions.region", None),
    "AttentionRegulation": ("dit_lens.interventions.regulate", None),
    "capture": ("dit_lens.trace.capture", None),
    "write_explorer": ("dit_lens.views.explorer", None),
    "gate_figure": ("dit_lens.views.figures", None),
    "pairs_figure": ("dit_lens.views.figures", None),
    "generate": ("dit_lens.interventions.generate", None),
    "reprompt": ("dit_lens.interventions.generate", None),
    "ConceptPair": ("dit_lens.methods", None),
    "Lens": ("dit_lens.model.lens", None),
    "load": ("dit_lens.model.lens", None),
    "Steer": ("dit_lens.interventions.steer", None),
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
    "attention_figure": ("dit_lens.views.attention", None),
    "concept_vector": ("dit_lens.readouts.vectors", None),
    "load_vector": ("dit_lens.readouts.vector_files", None),
    "save_vector": ("dit_lens.readouts.vector_files", None),
    "finetune": ("dit_lens.training", None),
    "load_anatomy_segmenter": ("dit_lens.world", None),
    "load_oracle": ("dit_lens.world", None),
    "load_segmenter": ("dit_lens.world", None),
    "concept_maps": ("dit_lens.readouts.concept_maps", None),
    "segmentation_scores": ("dit_lens.metrics.segmentation", None),
    "probe": ("dit_lens.readouts.probes", None),
    "train_sae": ("dit_lens.features.train", None),
    "sae_features": ("dit_lens.features.maps", None),
    "FeatureEdit": ("dit_lens.interventions.feature", None),
}

#: Subpackages and modules reachable as attributes on first use, beside the exports (not in ``__all__``).
_PACKAGES = frozenset({"accessors", "apps", "experiments", "features", "interventions", "inversion", "model", "optimize",
                       "readouts", "sampling", "scale", "storage", "study", "testing", "trace", "training", "validate",
                       "views", "world"})

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
    "Inject",
    "optimize_noise",
    "Region",
    "LatentDrift",
    "Reweight",
    "intervention_from_dict",
    "ConceptPair",
    "Study",
    "methods",
    "pick_settings",
    "run_study",
    "Lens",
    "Steer",
    "capture",
    "concept_vector",
    "finetune",
    "gate_figure",
    "generate",
    "load",
    "load_anatomy_segmenter",
    "load_oracle",
    "load_segmenter",
    "load_vector",
    "pairs_figure",
    "patching",
    "reprompt",
    "save_vector",
    "write_explorer",
    "metrics",
    "attribution_patching",
    "class_logprob",
    "x0_lens",
    "patching_figure",
    "x0_lens_figure",
    "concept_maps",
    "segmentation_scores",
    "probe",
    "train_sae",
    "sae_features",
    "FeatureEdit",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        if name in _PACKAGES:  # a subpackage or module, on first use (dit_lens.testing.build_pixart)
            value = import_module(f"{__name__}.{name}")
            globals()[name] = value
            return value
        raise AttributeError(f"module 'dit_lens' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    loaded = import_module(module)
    value = loaded if attribute == "" else getattr(loaded, attribute or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from . import methods
    from . import metrics
    from .interventions.reweight import Reweight
    from .interventions.base import from_dict as intervention_from_dict
    from .interventions.blend import Blend
    from .interventions.drift import LatentDrift
    from .interventions.inject import Inject
    from .optimize.noise import optimize_noise
    from .interventions.region import Confine
    from .interventions.region import Region
    from .interventions.regulate import AttentionRegulation
    from .trace.capture import capture
    from .views.explorer import write_explorer
    from .views.figures import gate_figure
    from .views.figures import pairs_figure
    from .interventions.generate import generate
    from .interventions.generate import reprompt
    from .methods import ConceptPair
    from .model.lens import Lens
    from .model.lens import load
    from .interventions.steer import Steer
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
    from .views.attention import attention_figure
    from .readouts.vectors import concept_vector
    from .readouts.vector_files import load_vector
    from .readouts.vector_files import save_vector
    from .training import finetune
    from .world import load_anatomy_segmenter
    from .world import load_oracle
    from .world import load_segmenter
    from .readouts.concept_maps import concept_maps
    from .metrics.segmentation import segmentation_scores
    from .readouts.probes import probe
    from .features.train import train_sae
    from .features.maps import sae_features
    from .interventions.feature import FeatureEdit
