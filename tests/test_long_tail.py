"""The long-tail study on the embedded world, at its smallest: the rare class's reads before and after
optimize_noise match the oracle on the plain runs, cells are kept and reused, and bad settings are refused."""

import json

import pytest

from dit_lens import generate, load, load_oracle
from dit_lens.storage import FolderClaimError
from dit_lens.experiments.long_tail import LongTailConfig, run_long_tail
from dit_lens.world.procedural import caption

SMALL = LongTailConfig(label="polyps", count=1, per_class=1, steps=2, seeds=2, seed_base=7, guidance_scales=(1.0,),
                       iterations=1, num_inference_steps=3)


def test_the_study_reads_the_class_before_and_after_and_reuses_its_cells(tmp_path):
    result = run_long_tail(SMALL, tmp_path, progress=False)
    assert [(c["guidance_scale"], c["objective"]) for c in result["cells"]] == [
        (1.0, "class_probability"), (1.0, "attention_concentration")]
    assert result["adapter"]["per_caption"][caption("polyps")] == 1
    oracle = load_oracle()
    shipped = generate(load("embedded"), caption("polyps"), seeds=[7, 8], num_inference_steps=3, guidance_scale=1.0,
                       progress=False)["image"].sel(prompt=caption("polyps"), branch="original").values
    want = (oracle(shipped).argmax(1) == oracle.labels.index("polyps")).mean()
    cell = json.loads((tmp_path / "cells" / "attention_concentration_g1.json").read_text())
    for c in result["cells"]:
        assert c["shipped"]["value"] == want and c["n"] == 2
        assert 0 <= c["before"]["low"] <= c["before"]["value"] <= c["before"]["high"] <= 1
        assert c["norm_ratio_range"][0] == pytest.approx(1.0, abs=1e-5)
    assert cell["objective"].startswith("attention_concentration(['polyps']")
    assert all(a >= b for a, b in zip(cell["objective_after"], cell["objective_before"]))
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")}
    assert run_long_tail(SMALL, tmp_path, progress=False)["cells"] == result["cells"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")} == stamps
    with pytest.raises(FolderClaimError, match="made for other settings"):
        run_long_tail(LongTailConfig(**{**SMALL.to_dict(), "seeds": 3}), tmp_path, progress=False)


@pytest.mark.parametrize("change, match", [
    ({"label": "ulcers"}, "not a world class"),
    ({"count": 0}, "count must be between 1"),
    ({"objectives": ("brightness",)}, "objectives must be among"),
    ({"target": 1.5}, "probability in"),
])
def test_bad_settings_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        LongTailConfig(**change)


def test_the_study_reads_its_flags_into_the_config():
    import runpy

    from dit_lens.study.cli import find_study

    parse = runpy.run_path(str(find_study("long_tail")))["parse"]
    cfg, out = parse(["--label", "polyps", "--guidance-scales", "1", "2", "--objectives", "attention_concentration"])
    assert cfg.label == "polyps" and cfg.guidance_scales == (1.0, 2.0) and cfg.objectives == ("attention_concentration",)
    assert out.name.startswith("long_tail-") and parse([])[0] == LongTailConfig()
    with pytest.raises(SystemExit):
        parse(["--count", "0"])
