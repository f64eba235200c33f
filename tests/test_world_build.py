"""`dit-lens world build`: overall progress, and finished stages kept for a build stopped later."""

import argparse

import pytest

import dit_lens.world.build as build


def tiny(out):
    return argparse.Namespace(out=str(out), scale=0.0001, set=["images_per_class=1"], device="cpu")


def test_a_stopped_build_resumes_after_its_finished_stages(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path / "cache"))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    real_oracle = build.train_oracle
    monkeypatch.setattr(build, "train_oracle", stopped)
    with pytest.raises(KeyboardInterrupt):
        build.build_world(tiny(tmp_path / "world"))
    first = capsys.readouterr().out
    assert "[2/6 vae]" in first and "[3/6 transformer]" in first and "[4/6 oracle]" in first
    assert not (tmp_path / "world").exists()

    def retrained(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(build, "train_oracle", real_oracle)
    monkeypatch.setattr(build, "train_vae", retrained)
    monkeypatch.setattr(build, "train_transformer", retrained)
    out = build.build_world(tiny(tmp_path / "world"))
    again = capsys.readouterr().out
    assert "reusing vae, transformer" in again and "[3/6 transformer] kept from an earlier build" in again
    assert all((out / name).exists() for name in ("pipeline", "oracle", "segmenter", "anatomy", "world.json"))
    from dit_lens import load
    from dit_lens.world import load_oracle

    assert load(str(out / "pipeline")).num_layers == 12 and load_oracle(out / "oracle").labels


def test_a_kept_stage_whose_files_changed_is_built_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path / "cache"))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "train_transformer", stopped)
    with pytest.raises(KeyboardInterrupt):
        build.build_world(tiny(tmp_path / "world"))
    weights = next((tmp_path / "cache" / "world-build").glob("*/after_vae/vae/*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(KeyboardInterrupt):
        build.build_world(tiny(tmp_path / "world"))
    printed = capsys.readouterr().out
    assert "the kept vae stage is not used" in printed and "fails its digest" in printed
    assert printed.count("[2/6 vae] ") == 2 and "kept from an earlier build" not in printed
