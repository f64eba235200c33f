"""How many seeds does a stable vector need? Cosine to the largest-seed vector, and flip.

Paper: 30/50/80/100 seeds → flip 0.762/0.800/0.793/0.791.

    python studies/seed_count.py [--quick] [--vector-seeds 4 8 16 32 64]
"""

import sys

from dit_lens.study import ConceptPair, Study
from dit_lens.study.cli import study_main

STUDY = Study(
    "seed_count",
    pairs=(ConceptPair("polyps", "normal cecum"),),
    windows=((0.0, 1.0),),
    alphas=(3.0,),
    vector_seeds=(2, 4, 8, 16, 32, 64),
    eval_seeds=64,
    quick={"vector_seeds": (2, 4, 8), "eval_seeds": 8},
)

if __name__ == "__main__":
    sys.exit(study_main(STUDY))
