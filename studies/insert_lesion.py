"""Insert a lesion where asked: from a normal image's seed, the pathology inside a given region and the
anatomy elsewhere (mask-guided attention regulation, `dit_lens.AttentionRegulation`), against plain
re-prompting from the same seed, with the ablation table (each module off in turn).

Regions are boxes or blobs at varied places, one per seed (`dit_lens.methods.insert.placed_region`).
Measured: the oracle reads the pathology (``target_read``); the share of the segmenter's lesion pixels
inside the region (``lesion_inside``; ``inserted_inside`` counts only the pixels the edit added, so a
false lesion the segmenter finds on the original does not count against it) and the lesion's Dice with the region (``region_dice``); SSIM
outside the region (``outside_ssim``). Goal: target_read ≥ 0.9, lesion_inside ≥ 0.9, outside_ssim ≥ 0.9.

    python studies/insert_lesion.py [--quick] [--eval-seed-base 40000] [--places box blob] [--modules default none]
"""

import sys

from dit_lens.methods.insert import MODULES
from dit_lens.study import Study
from dit_lens.study.cli import study_main
from dit_lens.metrics import REGION_METRICS
from dit_lens.world import endoscopy_pair, load_oracle, load_segmenter

STUDY = Study(
    "insert_lesion",
    pairs=(endoscopy_pair("normal cecum", "polyps"), endoscopy_pair("normal z-line", "esophagitis")),
    methods={"regulate": {"place": ("box", "blob"), "modules": MODULES}},
    eval_seeds=64,
    metrics=REGION_METRICS,
    require={"target_read": 0.9, "lesion_inside": 0.9, "outside_ssim": 0.9},
    quick={"modules": ("default", "none"), "place": ("box",), "eval_seeds": 4},
)

if __name__ == "__main__":
    sys.exit(study_main(STUDY, load_oracle=load_oracle, load_segmenter=load_segmenter))
