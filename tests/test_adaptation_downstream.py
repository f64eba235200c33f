"""The adapted-model downstream test at its smallest: generated sets laid out as documented, paired gains,
cells reused, bad names and changed settings refused."""

import json

import numpy as np
import pytest

from dit_lens import LatentDrift, generate, load
from dit_lens.storage import FolderClaimError
from dit_lens.experiments.adaptation_downstream import AdaptedDownstreamConfig, run_adapted_downstream
from dit_lens.world.procedural import caption

SMALL = AdaptedDownstreamConfig(synthetic_per_class=2, synthetic_seed_base=5, train_seeds=(0, 1), test_per_class=4,
                                detector_steps=3, num_inference_steps=2)


def test_arms_gains_and_reuse(tmp_path):
    lens = load("embedded")
    result = run_adapted_downstream({"shipped": (lens, 0.0), "drifted": (lens, 0.1)}, SMALL, tmp_path, progress=False)
    assert list(result["arms"]) == ["real", "shipped", "drifted"]
    made = generate(lens, [caption("polyps"), caption("normal cecum")], seeds=[5, 6], num_inference_steps=2,
                    edits=[LatentDrift(0.1, steps=None)], progress=False)["image"].sel(branch="edited").values
    np.testing.assert_array_equal(np.load(tmp_path / "synthetic" / "drifted.npy"), made)  # (prompt, seed, H, W, 3)
    assert not np.array_equal(np.load(tmp_path / "synthetic" / "shipped.npy"), made)
    arms = result["arms"]
    assert arms["drifted"]["drift"] == LatentDrift(0.1, steps=None).to_dict()
    for arm in ("shipped", "drifted"):
        gain = np.array(arms[arm]["auc_per_seed"]) - np.array(arms["real"]["auc_per_seed"])
        assert arms[arm]["gain_vs_real"]["value"] == pytest.approx(gain.mean())
    assert "gain_vs_shipped" in arms["drifted"] and "gain_vs_shipped" not in arms["shipped"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")}
    assert len(stamps) == 6
    again = run_adapted_downstream({"shipped": (lens, 0.0), "drifted": (lens, 0.1)}, SMALL, tmp_path, progress=False)
    assert again == result and {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")} == stamps
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))
    with pytest.raises(FolderClaimError, match="made for other settings"):
        run_adapted_downstream({}, AdaptedDownstreamConfig(**{**SMALL.to_dict(), "detector_steps": 4}), tmp_path)
    with pytest.raises(ValueError, match="identifiers other than 'real'"):
        run_adapted_downstream({"real": (lens, 0.0)}, SMALL, tmp_path / "other")
