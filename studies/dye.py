"""Dye disentanglement: remove the dye from dyed lifted polyps and keep the polyp.

Reports the dye detection rate after steering (lower is better; paper 0.25 vs PnP 0.80) and the
fraction of steered images whose polyp survives (oracle says polyps and the segmenter still finds a
lesion).

Swept with and without latent blending (τ 0.3), which keeps the unstained mucosa around the cushion.

    python studies/dye.py [--quick] [--alphas 1 2 3] [--step-windows 0:1 0.5:1] [--blends 0 0.3]
"""

import sys

from dit_lens.study import ConceptPair, Study
from dit_lens.study.cli import study_main

STUDY = Study(
    "dye",
    pairs=(ConceptPair("dyed lifted polyps", "polyps"),),
    windows=((0.25, 0.75), (0.0, 1.0)),
    alphas=(1.0, 1.5, 2.0, 2.5, 5.0),
    blends=(0.0, 0.3),
    vector_seeds=(32,),
    eval_seeds=64,
    baselines=("reprompt",),
    dye=True,
    quick={"alphas": (1.5,), "windows": ((0.0, 1.0),), "vector_seeds": (8,), "eval_seeds": 8},
)

if __name__ == "__main__":
    sys.exit(study_main(STUDY))
