"""The command line: help without model code, --version, one-line errors naming flags, paths checked
before any model loads."""

import subprocess
import sys

import pytest

from dit_lens import __version__
from dit_lens.apps.cli import main

COMMANDS = [[], ["demo"], ["finetune"], ["world", "build"], ["world", "data"], ["study"]]


def test_help_of_every_command_loads_no_model_code():
    script = ("import sys\nfrom dit_lens.apps.cli import main\n"
              f"for argv in {COMMANDS!r}:\n"
              "    try:\n        main([*argv, '--help'])\n    except SystemExit:\n        pass\n"
              "print(sorted(m for m in ('torch', 'diffusers', 'nnsight', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"dit-lens {__version__}"


@pytest.mark.parametrize("argv, says", [
    (["demo", "--steps", "x"], "dit-lens demo: error: argument --steps: invalid int value: 'x' (see `dit-lens demo --help`)"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus (see `dit-lens --help`)"),
    (["world", "data", "--out", "o", "--per-class", "-3"], "--per-class must be an integer >= 1, got -3"),
])
def test_bad_flags_are_one_line_naming_the_flag(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as done:
        code = done.code
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, says", [
    (["demo", "--lora", "{tmp}/nowhere"], "--lora {tmp}/nowhere is not a folder"),
    (["finetune", "--data", "{tmp}/nowhere", "--out", "{tmp}/out"], "--data {tmp}/nowhere is not a folder"),
    (["finetune", "--data", "{tmp}", "--validation", "{tmp}/nowhere", "--out", "{tmp}/out"],
     "--validation {tmp}/nowhere is not a folder"),
])
def test_missing_folders_are_refused_before_any_model_loads(argv, says, capsys, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr("dit_lens.model.lens.load", no_model)
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path / "cache"))
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert says.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_threads_come_from_the_flag_or_the_environment(monkeypatch, tmp_path, capsys):
    import torch

    from dit_lens.apps.cli import use_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("DIT_LENS_THREADS", "2")
        assert use_threads(None) == 2 and torch.get_num_threads() == 2
        assert use_threads(1) == 1 and torch.get_num_threads() == 1  # the flag wins
        monkeypatch.setenv("DIT_LENS_THREADS", "many")
        assert main(["world", "data", "--out", str(tmp_path / "o")]) == 2
        assert "$DIT_LENS_THREADS must be a whole number of threads such as 1, got 'many'" in capsys.readouterr().err
        monkeypatch.delenv("DIT_LENS_THREADS")
        assert main(["world", "data", "--threads", "0", "--out", str(tmp_path / "o")]) == 2
        assert "--threads must be a whole number of threads >= 1, got 0" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("flags, says", [
    (["--eval-seeds", "0"], "dit-lens study layer_sweep: error: --eval-seeds must be an integer >= 1, got 0"),
    (["--windows", "0.5:0.2"], "dit-lens study layer_sweep: error: --windows: a window is fractions"),
    (["--steps", "x"], "dit-lens study layer_sweep: error: argument --steps: invalid int value: 'x' "
                       "(see `dit-lens study layer_sweep --help`)"),
])
def test_a_study_names_its_flags_in_errors(flags, says, capsys):
    assert main(["study", "layer_sweep", *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and "Study." not in err and len(err.strip().splitlines()) == 1


def test_study_help_offers_debug_and_threads(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: dit-lens study") and "--debug" in text and "--threads" in text
