"""Dye disentanglement: remove the dye from dyed lifted polyps and keep the polyp.

Reports the dye detection rate after steering (lower is better; paper 0.25 vs PnP 0.80) and the
fraction of steered images whose polyp survives (oracle says polyps and the segmenter still finds a
lesion).

Swept with and without latent blending (τ 0.3), which keeps the unstained mucosa around the cushion.

    python studies/dye.py [--quick] [--alphas 1 2 3] [--step-windows 0:1 0.5:1] [--blends 0 0.3]
"""

import sys

from dit_lens.study import Study
from dit_lens.study.cli import study_main
from dit_lens.world import DYE_FLOORS, DYE_METRICS, endoscopy_pair, load_oracle, load_segmenter

STUDY = Study(
    "dye",
    pairs=(endoscopy_pair("dyed lifted polyps", "polyps"),),
    methods={
        "medsteer": {"window": ((0.25, 0.75), (0.0, 1.0)), "alpha": (1.0, 1.5, 2.0, 2.5, 5.0), "blend": (0.0, 0.3),
                     "vector_seeds": (32,)},
        "medsteer_local": {"window": ((0.0, 1.0),), "alpha": (1.5, 2.0), "region": ("lesion", "gate"),
                           "vector_seeds": (32,)},  # steered inside the segmented lesion (or gate region) only
        "reprompt": {"blend": (0.0, 0.3)},
        "pnp": {},  # the inversion-based baselines at their defaults (paper DDR: PnP 0.80, h-Edit 0.90)
        "hedit": {},
    },
    eval_seeds=64,
    metrics=DYE_METRICS,
    require=DYE_FLOORS,
    quick={"alpha": (1.5,), "window": ((0.0, 1.0),), "vector_seeds": (4,), "eval_seeds": 4, "region": ("lesion",),
           "inversion_steps": (10,)},
)

if __name__ == "__main__":
    sys.exit(study_main(STUDY, load_oracle=load_oracle, load_segmenter=load_segmenter))
