"""Experiments on the embedded world, each with its own small engine, result folder and resumable cells.

- `downstream`: a polyp detector trained on real images plus each method's counterfactual pairs;
- `adaptation`: fine-tuning the shipped model on the world's shifted split, with and without Latent Drifting;
- `adaptation_downstream`: a detector trained on real shifted images plus an adapted model's images;
- `long_tail`: how often a rare class is generated, before and after initial-noise optimisation;
- `folders`: their claimed result folders and sealed cells.

They build on the world (`dit_lens.world`: images, judges, splits), which never imports them.

Examples:
    >>> from dit_lens.experiments import LongTailConfig
    >>> LongTailConfig(label="polyps", count=2).count
    2
    >>> LongTailConfig(label="kidney")
    Traceback (most recent call last):
    ...
    ValueError: LongTailConfig.label 'kidney' is not a world class; choose one of [...]
"""

from .adaptation import FORMS, AdaptationConfig, run_adaptation
from .adaptation_downstream import AdaptedDownstreamConfig, run_adapted_downstream
from .downstream import BASELINES, DownstreamConfig, run_downstream, train_detector
from .long_tail import OBJECTIVES, LongTailConfig, run_long_tail

__all__ = ["AdaptationConfig", "AdaptedDownstreamConfig", "BASELINES", "DownstreamConfig", "FORMS", "LongTailConfig",
           "OBJECTIVES", "run_adaptation", "run_adapted_downstream", "run_downstream", "run_long_tail",
           "train_detector"]
