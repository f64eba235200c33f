import pytest

from dit_lens.apps.cli import main
from dit_lens.study import ConceptPair, Study
from dit_lens.study.cli import declared, find_study, parser

STUDY = Study("s", pairs=(ConceptPair("polyps", "normal cecum"),), alphas=(1.0, 2.0),
              quick={"alphas": (3.0,), "eval_seeds": 2})


def test_flags_override_the_declaration():
    args = parser(STUDY).parse_args(["--alphas", "0.5", "4", "--windows", "0:0.5", "0.5:1", "--eval-seeds", "5"])
    s = declared(STUDY, args)
    assert s.alphas == (0.5, 4.0) and s.windows == ((0.0, 0.5), (0.5, 1.0)) and s.eval_seeds == 5
    assert s.pairs == STUDY.pairs


def test_quick_applies_the_study_overrides_then_flags():
    s = declared(STUDY, parser(STUDY).parse_args(["--quick", "--eval-seeds", "7"]))
    assert s.name == "s-quick" and s.alphas == (3.0,) and s.eval_seeds == 7


def test_pairs_flag_and_validation():
    s = declared(STUDY, parser(STUDY).parse_args(["--pairs", "esophagitis>normal z-line"]))
    assert s.pairs[0].source == "esophagitis" and s.pairs[0].target == "normal z-line"
    with pytest.raises(SystemExit):
        parser(STUDY).parse_args(["--windows", "0.5"])
    with pytest.raises(SystemExit):
        parser(STUDY).parse_args(["--alpha", "2"])  # not a field of the declaration
    with pytest.raises(ValueError, match="windows"):
        declared(STUDY, parser(STUDY).parse_args(["--windows", "0.6:0.2"]))


def test_every_shipped_study_declares_a_valid_study():
    import runpy

    for name in ("layer_sweep", "alpha_sweep", "seed_count", "concept_pairs", "dye"):
        module = runpy.run_path(str(find_study(name)))
        study = module["STUDY"]
        assert isinstance(study, Study) and study.name == name
        quick = study.quick_version()
        assert quick.eval_seeds <= 8 and max(quick.vector_seeds) <= 8
    assert "downstream" in str(find_study("downstream"))


def test_unknown_study_is_a_clear_error(capsys):
    assert main(["study", "no_such_study"]) == 2
    assert "known studies" in capsys.readouterr().err


def test_a_study_runs_end_to_end_and_shows_the_picked_setting(tiny_pipeline, tmp_path, capsys):
    from dit_lens.study.cli import study_main

    tiny_pipeline.save_pretrained(tmp_path / "model")
    study = Study("e2e", pairs=(ConceptPair("polyps", "normal cecum", contexts=("An image of {}",)),),
                  alphas=(0.0, 3.0), vector_seeds=(2,), eval_seeds=2, num_inference_steps=3)
    assert study_main(study, ["--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "picked per pair" in printed and "gate explorer of the picked setting" in printed
    assert (tmp_path / "out" / "best_p0.html").stat().st_size > 100_000  # plotly.js inlined
    for name in ("best_p0.png", "e2e.png", "result.zarr"):
        assert (tmp_path / "out" / name).exists()
