import pytest

from dit_lens.apps.cli import main
from dit_lens.study import ConceptPair, Study
from dit_lens.study.cli import declared, find_study, parser

PAIR = ConceptPair("polyps", "normal cecum", contexts=("An endoscopic image of {}",))
STUDY = Study("s", pairs=(PAIR,), methods={"medsteer": {"alpha": (1.0, 2.0)}, "reprompt": {}},
              quick={"alpha": (3.0,), "eval_seeds": 2})


def test_flags_override_the_declaration():
    args = parser(STUDY).parse_args(["--alphas", "0.5", "4", "--windows", "0:0.5", "0.5:1", "--eval-seeds", "5"])
    s = declared(STUDY, args)
    medsteer = s.methods["medsteer"]
    assert medsteer["alpha"] == (0.5, 4.0) and medsteer["window"] == ((0.0, 0.5), (0.5, 1.0)) and s.eval_seeds == 5
    assert s.pairs == STUDY.pairs and s.methods["reprompt"] == STUDY.methods["reprompt"]


def test_a_shared_axis_flag_sets_every_method_that_has_it():
    s = declared(STUDY, parser(STUDY).parse_args(["--blends", "0", "0.3", "--step-windows", "0.5:1"]))
    assert s.methods["medsteer"]["blend"] == s.methods["reprompt"]["blend"] == (0.0, 0.3)
    assert s.methods["medsteer"]["steps"] == ((0.5, 1.0),)


def test_the_methods_flag_picks_methods_and_an_axis_needs_a_method_that_has_it():
    only = declared(STUDY, parser(STUDY).parse_args(["--methods", "reprompt", "--blends", "0.2"]))
    assert only.methods == {"reprompt": {"blend": (0.2,)}}
    with pytest.raises(ValueError, match="no declared method has an axis 'alpha'"):
        declared(STUDY, parser(STUDY).parse_args(["--methods", "reprompt", "--alphas", "2"]))
    with pytest.raises(SystemExit):
        parser(STUDY).parse_args(["--methods", "sdedit"])


def test_a_method_added_by_flag_takes_the_studys_vector_seeds_and_the_flag_sets_both():
    study = Study("v", pairs=(PAIR,), methods={"medsteer": {"vector_seeds": (32,)}})
    both = declared(study, parser(study).parse_args(["--methods", "medsteer", "sae_steer"]))
    assert both.methods["medsteer"]["vector_seeds"] == both.methods["sae_steer"]["vector_seeds"] == (32,)
    fewer = declared(study, parser(study).parse_args(["--methods", "medsteer", "sae_steer", "--vector-seeds", "8"]))
    assert fewer.methods["medsteer"]["vector_seeds"] == fewer.methods["sae_steer"]["vector_seeds"] == (8,)
    assert declared(study, parser(study).parse_args(["--methods", "sae_steer"])).methods["sae_steer"][
        "vector_seeds"] == (32,)


def test_quick_applies_the_study_overrides_then_flags():
    s = declared(STUDY, parser(STUDY).parse_args(["--quick", "--eval-seeds", "7"]))
    assert s.name == "s-quick" and s.methods["medsteer"]["alpha"] == (3.0,) and s.eval_seeds == 7


def test_pairs_flag_and_validation():
    s = declared(STUDY, parser(STUDY).parse_args(["--pairs", "esophagitis>normal z-line"]))
    assert s.pairs[0].source == "esophagitis" and s.pairs[0].target == "normal z-line"
    assert s.pairs[0].contexts == PAIR.contexts  # the declared phrasings
    with pytest.raises(SystemExit):
        parser(STUDY).parse_args(["--windows", "0.5"])
    with pytest.raises(SystemExit):
        parser(STUDY).parse_args(["--alpha", "2"])  # the flag is --alphas
    with pytest.raises(ValueError, match="window"):
        declared(STUDY, parser(STUDY).parse_args(["--windows", "0.6:0.2"]))


def test_every_shipped_study_declares_a_valid_study():
    import runpy

    from dit_lens.world import ENDOSCOPY_CONTEXTS

    for name in ("layer_sweep", "alpha_sweep", "seed_count", "concept_pairs", "dye"):
        module = runpy.run_path(str(find_study(name)))
        study = module["STUDY"]
        assert isinstance(study, Study) and study.name == name
        assert all(p.contexts == ENDOSCOPY_CONTEXTS for p in study.pairs)
        quick = study.quick_version()
        assert quick.eval_seeds <= 8 and quick.vector_seeds() <= 8
    assert "downstream" in str(find_study("downstream")) and "drift" in str(find_study("drift"))


def test_unknown_study_is_a_clear_error(capsys):
    assert main(["study", "no_such_study"]) == 2
    assert "known studies" in capsys.readouterr().err


def test_a_study_runs_end_to_end_and_shows_the_picked_setting(tiny_pipeline, tmp_path, capsys):
    import numpy as np

    from dit_lens.study.cli import study_main

    class BrightnessOracle:
        labels = ["normal cecum", "polyps"]

        def __call__(self, images):
            p = 1 / (1 + np.exp(-(images.mean(axis=(1, 2, 3)) - 0.5) * 40))
            return np.stack([1 - p, p], axis=1)

    tiny_pipeline.save_pretrained(tmp_path / "model")
    study = Study("e2e", pairs=(ConceptPair("polyps", "normal cecum", contexts=("An image of {}",)),),
                  methods={"medsteer": {"alpha": (0.0, 3.0), "vector_seeds": (2,)}, "reprompt": {}},
                  eval_seeds=2, num_inference_steps=3)
    loaded = []
    status = study_main(study, ["--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")],
                        load_oracle=lambda name: loaded.append(name) or BrightnessOracle(),
                        load_segmenter=lambda name: lambda images: images[..., 0] > images[..., 1] + 0.2)
    assert status == 0 and loaded == ["embedded"]
    printed = capsys.readouterr().out
    assert "picked per pair and method" in printed and "gate explorer of the picked medsteer setting" in printed
    assert "reprompt" in printed.split("picked per pair")[0]  # the baseline's row in the table
    assert (tmp_path / "out" / "best_p0.html").stat().st_size > 100_000  # plotly.js inlined
    for name in ("best_p0.png", "e2e.png", "result.zarr"):
        assert (tmp_path / "out" / name).exists()


def test_require_sets_the_floors_and_help_shows_the_declared_values(capsys):
    s = declared(STUDY, parser(STUDY).parse_args(["--require", "flip_rate=0.8", "target_rate=0.9"]))
    assert s.require == {"flip_rate": 0.8, "target_rate": 0.9}
    with pytest.raises(SystemExit):
        parser(STUDY).parse_args(["--require", "target_rate"])
    with pytest.raises(ValueError, match="names metrics"):
        declared(STUDY, parser(STUDY).parse_args(["--require", "polyp_kept=0.9"]))
    with pytest.raises(SystemExit):
        parser(STUDY).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(declared: {STUDY.eval_seeds})" in text and "declared: flip_rate=0.9" in text
