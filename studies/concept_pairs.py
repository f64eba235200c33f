"""The counterfactual table: three concept pairs, MedSteer vs re-prompting (same seed, target prompt) and the
inversion-based editors PnP and h-Edit (which edit the original image of the same seed), and localised
MedSteer (steered only inside the segmented lesion or the gate map's region, the original kept outside).

Each pair is swept over layer windows (where: the first quarter of the depth, which carries the
concepts in the embedded world, and the whole depth), α, and latent blending (0 = off, the paper's
method; τ > 0 pulls the steered latent back to the unsteered one where steering changed it little,
`dit_lens.interventions.blend`); the printout ends with the setting picked for each pair (the best Bg-SSIM among
settings that flip at least 0.9).

Paper flips: polyp → normal cecum 0.800, ulcerative colitis → normal cecum 0.925,
esophagitis → normal z-line 0.950; on polyps → normal cecum PnP 0.627 and h-Edit 0.714, Bg-SSIM
PnP 0.851, h-Edit 0.822, MedSteer 0.895.

    python studies/concept_pairs.py [--quick] [--alphas 2.5] [--windows 0:0.25] [--blends 0 0.3]

``--quick`` runs every method on the first pair only (``--pairs`` adds others), with 10-step inversions.
"""

import sys

from dit_lens.study import Study
from dit_lens.study.cli import study_main
from dit_lens.world import endoscopy_pair, load_oracle, load_segmenter

BLENDS = (0.0, 0.2, 0.3)

PAIRS = (
    endoscopy_pair("polyps", "normal cecum"),
    endoscopy_pair("ulcerative colitis", "normal cecum"),
    endoscopy_pair("esophagitis", "normal z-line"),
)

STUDY = Study(
    "concept_pairs",
    pairs=PAIRS,
    methods={
        "medsteer": {"window": ((0.0, 0.25), (0.0, 1.0)), "alpha": (2.0, 3.0, 4.0), "blend": BLENDS,
                     "vector_seeds": (32,)},
        "medsteer_local": {"window": ((0.0, 0.25), (0.0, 1.0)), "alpha": (2.0, 3.0, 4.0), "region": ("lesion", "gate"),
                           "vector_seeds": (32,)},  # steered inside the lesion (or gate) region, original kept outside
        "reprompt": {"blend": BLENDS},  # the baseline, blended the same way
        "pnp": {},  # at their defaults (dit_lens.methods.inversion)
        "hedit": {},
    },
    eval_seeds=64,
    quick={"pairs": PAIRS[:1], "alpha": (2.0,), "window": ((0.0, 1.0),), "blend": (0.0, 0.3), "vector_seeds": (4,),
           "eval_seeds": 4, "region": ("lesion",), "inversion_steps": (10,)},  # every method on the first pair
)

if __name__ == "__main__":
    sys.exit(study_main(STUDY, load_oracle=load_oracle, load_segmenter=load_segmenter))
