"""Which layer window carries the concept? Steer polyps → normal cecum in each quarter of the depth.

Paper (PixArt-alpha, 28 blocks): the middle window 8–16 flips 0.800, windows outside it ~0.02.

    python studies/layer_sweep.py [--quick] [--alphas 2.5] [--windows 0:0.25 0.25:0.5 ...]
"""

import sys

from dit_lens.study import Study
from dit_lens.study.cli import study_main
from dit_lens.world import endoscopy_pair, load_oracle, load_segmenter

STUDY = Study(
    "layer_sweep",
    pairs=(endoscopy_pair("polyps", "normal cecum"),),
    methods={"medsteer": {"window": ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0), (0.25, 0.75), (0.0, 1.0)),
                          "alpha": (3.0,), "vector_seeds": (32,)}},
    eval_seeds=64,
    quick={"vector_seeds": (4,), "eval_seeds": 4},  # every window, fewer seeds
)

if __name__ == "__main__":
    sys.exit(study_main(STUDY, load_oracle=load_oracle, load_segmenter=load_segmenter))
