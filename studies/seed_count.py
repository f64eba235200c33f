"""How many seeds does a stable vector need? Cosine to the largest-seed vector, and flip.

Paper: 30/50/80/100 seeds → flip 0.762/0.800/0.793/0.791.

    python studies/seed_count.py [--quick] [--vector-seeds 4 8 16 32 64]
"""

import sys

from dit_lens.study import Study
from dit_lens.study.cli import study_main
from dit_lens.world import endoscopy_pair, load_oracle, load_segmenter

STUDY = Study(
    "seed_count",
    pairs=(endoscopy_pair("polyps", "normal cecum"),),
    methods={"medsteer": {"window": ((0.0, 1.0),), "alpha": (3.0,), "vector_seeds": (2, 4, 8, 16, 32, 64)}},
    eval_seeds=64,
    quick={"vector_seeds": (2, 4), "eval_seeds": 4},
)

if __name__ == "__main__":
    sys.exit(study_main(STUDY, load_oracle=load_oracle, load_segmenter=load_segmenter))
