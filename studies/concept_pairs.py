"""The counterfactual table: three concept pairs, MedSteer vs re-prompting (same seed, target prompt).

Each pair is swept over layer windows (where), step windows (when: every step, the second half, the
last quarter) and α, with the authors' renormalised update, which does not overshoot at the larger α
the way the paper update does here; the printout ends with the setting picked for each pair (the best
Bg-SSIM among settings that flip at least 0.9).

Paper flips: polyp → normal cecum 0.800, ulcerative colitis → normal cecum 0.925,
esophagitis → normal z-line 0.950.

    python studies/concept_pairs.py [--quick] [--alphas 2.5] [--windows 0.25:0.75] [--step-windows 0.5:1]
"""

import sys

from dit_lens.study import ConceptPair, Study
from dit_lens.study_cli import study_main

STUDY = Study(
    "concept_pairs",
    pairs=(
        ConceptPair("polyps", "normal cecum"),
        ConceptPair("ulcerative colitis", "normal cecum"),
        ConceptPair("esophagitis", "normal z-line"),
    ),
    windows=((0.0, 0.5), (0.25, 0.75), (0.0, 1.0)),
    step_windows=((0.0, 1.0), (0.5, 1.0), (0.75, 1.0)),
    alphas=(1.75, 2.5),
    renormalize=(True,),
    vector_seeds=(32,),
    eval_seeds=64,
    baselines=("reprompt",),
    quick={"alphas": (2.5,), "step_windows": ((0.5, 1.0),), "windows": ((0.0, 0.5),), "vector_seeds": (8,),
           "eval_seeds": 8},
)

if __name__ == "__main__":
    sys.exit(study_main(STUDY))
