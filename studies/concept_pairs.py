"""The counterfactual table: three concept pairs, MedSteer vs re-prompting (same seed, target prompt).

Each pair is swept over layer windows (where: the first quarter of the depth, which carries the
concepts in the embedded world, and the whole depth), α, and latent blending (0 = off, the paper's
method; τ > 0 pulls the steered latent back to the unsteered one where steering changed it little,
`dit_lens.interventions.blend`); the printout ends with the setting picked for each pair (the best Bg-SSIM among
settings that flip at least 0.9).

Paper flips: polyp → normal cecum 0.800, ulcerative colitis → normal cecum 0.925,
esophagitis → normal z-line 0.950.

    python studies/concept_pairs.py [--quick] [--alphas 2.5] [--windows 0:0.25] [--blends 0 0.3]
"""

import sys

from dit_lens.study import ConceptPair, Study
from dit_lens.study.cli import study_main

STUDY = Study(
    "concept_pairs",
    pairs=(
        ConceptPair("polyps", "normal cecum"),
        ConceptPair("ulcerative colitis", "normal cecum"),
        ConceptPair("esophagitis", "normal z-line"),
    ),
    windows=((0.0, 0.25), (0.0, 1.0)),
    alphas=(2.0, 3.0, 4.0),
    blends=(0.0, 0.2, 0.3),
    vector_seeds=(32,),
    eval_seeds=64,
    baselines=("reprompt",),
    quick={"alphas": (2.0,), "windows": ((0.0, 1.0),), "blends": (0.0, 0.3), "vector_seeds": (8,), "eval_seeds": 8},
)

if __name__ == "__main__":
    sys.exit(study_main(STUDY))
