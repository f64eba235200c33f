"""The demo names what it steered from the prompts it was given, generates from them, and reports the
target rate beside the flip rate (and the dye metrics for a dye removal)."""

import json
import re

import pytest

from dit_lens.apps.cli import main
from dit_lens.apps.demo import resolve_concept
from dit_lens.world.procedural import LABELS


def test_custom_prompts_name_the_concept_and_the_generation_prompt():
    c = resolve_concept(None, None, ["An endoscopic image of dyed lifted polyps"], ["An endoscopic image of polyps"],
                        None, LABELS)
    assert (c["source"], c["target"]) == ("dyed lifted polyps", "polyps")  # the longest class named, not "polyps"
    assert c["name"] == "dyed lifted polyps -> polyps" and c["prompt"] == "An endoscopic image of dyed lifted polyps"
    c = resolve_concept(None, None, ["a photo of a cat"], ["a photo of a dog", "a dog"], None, LABELS)
    assert (c["source"], c["target"]) == (None, None)
    assert c["name"] == "'a photo of a cat' -> 'a photo of a dog' (+1 more)" and c["prompt"] == "a photo of a cat"
    c = resolve_concept(None, None, None, None, None, LABELS)
    assert c["name"] == "polyps -> normal cecum" and c["prompt"] == "An endoscopic image of polyps"
    assert len(c["positive"]) > 1 and all("polyps" in p for p in c["positive"])
    c = resolve_concept("esophagitis", None, None, None, "my prompt", LABELS)
    assert c["target"] == "normal cecum" and c["prompt"] == "my prompt" and "esophagitis" in c["positive"][0]
    with pytest.raises(ValueError, match="'ulcers' is not a class of the classifier"):
        resolve_concept("ulcers", None, None, None, None, LABELS)
    c = resolve_concept(None, None, ["a photo of a cat"], None, None, ())  # no classifier: no class is inferred
    assert (c["source"], c["target"]) == (None, "normal cecum")


def test_a_dye_demo_reports_target_rate_and_dye_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--positive", "An endoscopic image of dyed lifted polyps", "--negative",
                 "An endoscopic image of polyps", "--steps", "2", "--pairs", "2", "--vector-seeds", "1",
                 "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steer"]["name"] == "dyed lifted polyps -> polyps"
    assert summary["settings"]["prompt"] == "An endoscopic image of dyed lifted polyps"
    for key in ("flip_rate", "target_rate", "dye_detection_rate", "polyp_kept"):
        assert 0 <= summary[key] <= 1 and len(summary[f"{key}_ci95"]) == 2
    assert summary["steer"]["vector_source"]["positive_prompts"] == ["An endoscopic image of dyed lifted polyps"]
    assert "MedSteer 'dyed lifted polyps -> polyps'" in summary["steer_description"]
    printed = capsys.readouterr().out
    assert "target_rate" in printed and "polyp_kept" in printed and "α=3 at attn2, layers 0-11, all steps" in printed


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "steering strength (default: 3.0)" in text and "(default: 0.0 1.0)" in text
    assert "(default: None)" not in text and "off, the paper's method) (default: 0.0)" in text


def test_the_demo_writes_into_the_cache_and_explains_its_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    code = main(["demo", "--steps", "2", "--pairs", "2", "--vector-seeds", "1"])
    assert code == 0
    assert (tmp_path / "cache" / "demo" / "summary.json").is_file() and not (tmp_path / "cache" / "captures").is_file()
    assert not (tmp_path / "cache" / "demo" / "cache").exists()
    printed = capsys.readouterr().out
    assert "confidence_shift: mean drop of the oracle's probability" in printed
    assert "unsteered_recognised: share of unsteered images" in printed
    assert re.search(r"finished in \d+ s \(\d+\.\d min\)", printed)
