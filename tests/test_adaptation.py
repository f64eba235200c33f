"""The adaptation study on the embedded world, at its smallest: adapters fine-tuned, δ picked by the
smallest distance of the sweep and confirmed on other seeds, cells kept and reused."""

import json

import pytest

from dit_lens.storage import FolderClaimError
from dit_lens.experiments.adaptation import AdaptationConfig, run_adaptation

SMALL = AdaptationConfig(schemes=("lora",), train_drifts=(0.0,), deltas=(0.0, 0.2), forms=("every", "initial"),
                         steps=2, per_class=1, sweep_seeds=1, confirm_seeds=1, held_out=2, num_inference_steps=2)


def test_the_study_picks_the_closest_drift_confirms_it_and_reuses_its_cells(tmp_path):
    result = run_adaptation(SMALL, tmp_path, progress=False)
    (adapter,) = result["adapters"]
    sweep = adapter["sweep"]
    assert [(c["form"], c["delta"]) for c in sweep] == [("every", 0.0), ("every", 0.2), ("initial", 0.2)]
    best = min(sweep, key=lambda c: c["frechet"]["value"])
    assert adapter["picked"] == {"form": best["form"], "delta": best["delta"]}
    assert adapter["confirm_picked"]["frechet"]["n"] == 8 == 8 * SMALL.confirm_seeds  # 8 classes x 1 seed
    assert len({c["frechet"]["value"] for c in sweep}) == 3  # drift and its form change the images
    assert set(result["floor"]) == {"sweep", "confirm"} and result["floor"]["sweep"]["frechet"]["value"] > 0
    assert (tmp_path / "adapters" / "lora_d0" / "finetune.json").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")}
    again = run_adaptation(SMALL, tmp_path, progress=False)
    assert again["adapters"][0]["sweep"] == sweep
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").glob("*.json")} == stamps
    assert json.loads((tmp_path / "result.json").read_text())["adapters"][0]["picked"] == adapter["picked"]
    with pytest.raises(FolderClaimError, match="made for other settings"):
        run_adaptation(AdaptationConfig(**{**SMALL.to_dict(), "steps": 4}), tmp_path, progress=False)
    with pytest.raises(ValueError, match="forms must be among"):
        AdaptationConfig(forms=("sometimes",))


def test_the_drift_study_reads_its_flags_into_the_config():
    import runpy

    from dit_lens.study.cli import find_study

    parse = runpy.run_path(str(find_study("drift")))["parse"]
    cfg, out, quick, detector = parse(["--quick", "--count", "esophagitis=3", "--deltas", "0", "0.1", "--forms", "initial"])
    assert quick and detector is None and parse(["--downstream", "--downstream-seeds", "4"])[3] == {
        "seeds": 4, "adapters": None} and cfg.schemes == ("lora",) and cfg.deltas == (0.0, 0.1) and cfg.forms == ("initial",)
    assert cfg.counts == {"esophagitis": 3} and out.parent.name == "studies" and out.name.startswith("drift-")
    assert parse([])[0] == AdaptationConfig()  # no flags: the declared defaults
    with pytest.raises(SystemExit):
        parse(["--count", "esophagitis"])
