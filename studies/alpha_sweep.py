"""How strong must the steering be? α sweep for both update variants (paper and authors' renorm).

Paper (layers 8–16 of 28): α = 0.5/1/2/2.5/3 → flip 0.012/0.038/0.513/0.800/0.700.

    python studies/alpha_sweep.py [--quick] [--windows 0.25:0.75] [--alphas 1 2 3]
"""

import sys

from dit_lens.study import Study
from dit_lens.study.cli import study_main
from dit_lens.world import endoscopy_pair, load_oracle, load_segmenter

STUDY = Study(
    "alpha_sweep",
    pairs=(endoscopy_pair("polyps", "normal cecum"),),
    methods={"medsteer": {"window": ((0.25, 0.75), (0.0, 1.0)), "alpha": (1.0, 2.0, 3.0, 5.0, 7.5, 10.0),
                          "renormalize": (False, True), "vector_seeds": (32,)}},
    eval_seeds=64,
    quick={"alpha": (1.0, 3.0, 7.5), "window": ((0.0, 1.0),), "vector_seeds": (4,), "eval_seeds": 4},
)

if __name__ == "__main__":
    sys.exit(study_main(STUDY, load_oracle=load_oracle, load_segmenter=load_segmenter))
