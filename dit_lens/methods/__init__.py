"""Methods: named recipes that turn a concept pair into counterfactual pairs (`registry`), each in
its own module (`medsteer`, `local`: MedSteer in a region, `insert`: a pathology put in a region, `reprompt`, `inversion`: PnP and h-Edit), with their setting axes (`axes`) and the `ConceptPair`
they take (`pair`). A new method is one module that calls `register`."""

from .axes import BLEND, Axis, window_label, window_layers, window_steps
from .pair import ConceptPair
from .registry import METHODS, VECTOR_SEEDS, Method, MethodContext, Vectors, get, names, register, unregister
from . import medsteer, local, insert, reprompt, inversion, sae_steer  # noqa: E402,F401  (the built-in methods register themselves)

__all__ = ["Axis", "BLEND", "ConceptPair", "METHODS", "Method", "MethodContext", "VECTOR_SEEDS", "Vectors", "get",
           "names", "register", "unregister", "window_label", "window_layers", "window_steps"]
