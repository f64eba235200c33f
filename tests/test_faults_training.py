"""Fine-tunes tried as a hostile or unlucky user would: crafted, truncated and NaN checkpoints, two
fine-tunes into one folder at once, damaged or edited adapters, adapters loaded onto other models,
16-bit and damaged training images, and the command line's one-line refusals."""

import json
import os
import time
import zlib

import numpy as np
import pytest
import torch

import children
from dit_lens import load
from dit_lens.apps.cli import main
from dit_lens.model.builders import PixArtSpec, build_pixart
from dit_lens.storage import DamagedError, MissingError, load_torch, save_torch
from dit_lens.training import TrainingImages, finetune, read_image_folder, read_record, write_image_folder
from dit_lens.training.trainer import _Trainer
from dit_lens.validate import NonFiniteError

FAST = dict(steps=6, batch_size=4, lr=1e-2, warmup=1, checkpoint_every=3, progress=False)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (4, 16, 16, 3)).astype(np.float32)
    return TrainingImages.from_arrays(images, ["An image of polyps"] * 2 + ["An image of normal cecum"] * 2, "test")


def _killed(lens, data, out, monkeypatch, **settings):
    """A fine-tune stopped by Ctrl-C after its checkpoint at step 3."""
    calls, real = {"n": 0}, _Trainer.loss

    def dies_at_step_five(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_Trainer, "loss", dies_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        finetune(lens, data, out, **{**FAST, **settings})
    monkeypatch.setattr(_Trainer, "loss", real)
    assert (out / "checkpoint.pt").is_file()
    return out / "checkpoint.pt"


class _RunsCode:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('the pickle ran')",)


def test_a_crafted_pickle_checkpoint_is_refused_and_its_code_never_runs(tiny_lens, data, tmp_path, monkeypatch):
    checkpoint = _killed(tiny_lens, data, tmp_path / "run", monkeypatch)
    ran = tmp_path / "ran.txt"
    torch.save({"identity": _RunsCode(ran), "step": 3}, checkpoint)
    with pytest.raises(DamagedError, match=r"checkpoint\.pt holds objects other than tensors.*refused unread") as err:
        finetune(tiny_lens, data, tmp_path / "run", **FAST)
    assert not ran.exists()
    assert "delete" in str(err.value) and "\n" not in str(err.value)


def test_a_truncated_or_nan_checkpoint_names_the_file_and_the_remedy(tiny_lens, data, tmp_path, monkeypatch):
    checkpoint = _killed(tiny_lens, data, tmp_path / "run", monkeypatch)
    state = load_torch(checkpoint, what="checkpoint")
    whole = checkpoint.read_bytes()
    checkpoint.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DamagedError, match=r"checkpoint\.pt is unreadable or truncated .*; delete .*checkpoint\.pt "
                                           r"to start this fine-tune over") as err:
        finetune(tiny_lens, data, tmp_path / "run", **FAST)
    assert "lower lr" not in str(err.value) and "\n" not in str(err.value)
    state["params"] = {k: torch.full_like(v, float("nan")) for k, v in state["params"].items()}
    save_torch(checkpoint, state)  # a checkpoint with a valid digest, holding NaN
    with pytest.raises(DamagedError, match=r"checkpoint\.pt holds NaN or inf values.*delete") as err:
        finetune(tiny_lens, data, tmp_path / "run", **FAST)
    assert "lower lr" not in str(err.value)
    checkpoint.unlink()  # the remedy: the run starts over and finishes
    assert read_record(finetune(tiny_lens, data, tmp_path / "run", **FAST))["steps_done"] == 6


def test_divergence_says_so_and_never_claims_a_checkpoint_that_does_not_exist(tiny_lens, data, tmp_path):
    with pytest.raises(NonFiniteError, match=r"diverged: .* with lr 1e\+12; lower lr \(--lr\); no checkpoint was "
                                             r"written") as err:
        finetune(tiny_lens, data, tmp_path / "none", **{**FAST, "lr": 1e12})
    assert "is kept" not in str(err.value)
    assert not (tmp_path / "none").exists()  # nothing kept: the folder can be used with a lower lr
    assert read_record(finetune(tiny_lens, data, tmp_path / "none", **FAST))["steps_done"] == 6
    with pytest.raises(NonFiniteError, match=r"checkpoint\.pt \(step 1, before it diverged\) is kept"):
        finetune(tiny_lens, data, tmp_path / "kept", **{**FAST, "lr": 1e12, "checkpoint_every": 1})
    assert load_torch(tmp_path / "kept" / "checkpoint.pt", what="checkpoint")["step"] == 1


_RACER = """
import sys, time
from pathlib import Path
gate = Path(sys.argv[1])
if gate.name != "-":  # hold the run at its first step until the test opens the gate
    from dit_lens.training.trainer import _Trainer
    real = _Trainer.loss
    def gated(self, *args, **kwargs):
        while not gate.exists():
            time.sleep(0.05)
        return real(self, *args, **kwargs)
    _Trainer.loss = gated
from dit_lens.apps.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _wait_for(condition, what, seconds=180):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_two_fine_tunes_into_one_folder_at_once_one_wins_whole(tiny_pipeline, data, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "model")
    write_image_folder(tmp_path / "data", data.images, data.texts)
    (tmp_path / "racer.py").write_text(_RACER)
    out, gate = tmp_path / "out", tmp_path / "gate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(steps, gated=False):  # a process of its own, forked from a warm interpreter
        return children.start(tmp_path / "racer.py", str(gate) if gated else "-", "finetune", "--model",
                              str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--out", str(out),
                              "--steps", str(steps), "--batch-size", "2", "--quiet", env=env)

    first = start(4, gated=True)
    runs = [first]
    try:
        _wait_for(lambda: (out / ".dit-lens").is_file() or first.poll() is not None, "the first run to claim --out")
        other, same = start(5), start(4)
        runs += [other, same]
        assert other.wait(timeout=180) == 2  # refused at once, while the first still runs
        lines = other.stderr_file.read_text().splitlines()
        errors = [line for line in lines if line.startswith("dit-lens: error: ")]
        assert len(errors) == 1 and not any("Traceback" in line for line in lines)
        assert "is being written by another fine-tune" in errors[0] and "config.steps: 4 there, 5 now" in errors[0]
        _wait_for(lambda: "waiting" in same.stderr_file.read_text(), "the same run to wait for the lock")
        gate.write_text("go")
        assert first.wait(timeout=180) == 0
        stamp = (out / "finetune.json").stat().st_mtime_ns
        assert same.wait(timeout=180) == 0 and "use it" in same.communicate()[0]  # it waited, then reused the result
        assert (out / "finetune.json").stat().st_mtime_ns == stamp
        assert read_record(out)["config"]["steps"] == 4
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
            run.wait()


def _no_hub(monkeypatch):
    """Record every call of peft's loader (which falls back to a model hub for a path it cannot find)."""
    from peft import PeftModel

    calls = []
    real = PeftModel.from_pretrained.__func__

    def spy(cls, model, model_id, *args, **kwargs):
        calls.append(model_id)
        return real(cls, model, model_id, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "from_pretrained", classmethod(spy))
    return calls


def test_deleted_adapter_weights_are_refused_as_damaged_and_never_sent_to_a_hub(tiny_lens, tiny_spec, data, tmp_path,
                                                                                monkeypatch):
    out = finetune(tiny_lens, data, tmp_path / "lora", **FAST)
    (out / "adapter_model.safetensors").unlink()
    calls = _no_hub(monkeypatch)
    with pytest.raises(DamagedError, match=r"adapter_model\.safetensors is missing: the fine-tune folder .* is damaged"
                                           r".*delete .* and run the same fine-tune again"):
        finetune(tiny_lens, data, out, **FAST)
    with pytest.raises(DamagedError, match=r"adapter_model\.safetensors is missing"):
        load(build_pixart(tiny_spec, seed=0), lora=out)
    killed = _killed(tiny_lens, data, tmp_path / "unfinished", monkeypatch).parent
    calls = _no_hub(monkeypatch)
    with pytest.raises(MissingError, match="is not a finished dit-lens fine-tune .* run the same fine-tune again to finish it"):
        load(build_pixart(tiny_spec, seed=0), lora=killed)
    plain = tmp_path / "plain"  # a peft folder of someone else's, its weights missing
    plain.mkdir()
    (plain / "adapter_config.json").write_text((out / "adapter_config.json").read_text())
    with pytest.raises(MissingError, match=r"adapter_model\.safetensors does not exist.*never fetches"):
        load(build_pixart(tiny_spec, seed=0), lora=plain)
    assert calls == []


def test_an_edited_adapter_fails_its_digest(tiny_lens, tiny_spec, data, tmp_path):
    from safetensors.torch import load_file, save_file

    out = finetune(tiny_lens, data, tmp_path / "lora", **FAST)
    written = (out / "adapter_model.safetensors").read_bytes()
    weights = load_file(out / "adapter_model.safetensors")
    name = sorted(weights)[0]
    save_file({**weights, name: weights[name] * 50}, out / "adapter_model.safetensors")
    with pytest.raises(DamagedError, match=r"adapter_model\.safetensors fails its digest"):
        load(build_pixart(tiny_spec, seed=0), lora=out)
    with pytest.raises(DamagedError, match=r"adapter_model\.safetensors fails its digest"):
        finetune(tiny_lens, data, out, **FAST)
    config = out / "adapter_config.json"
    (out / "adapter_model.safetensors").write_bytes(written)  # back as dit-lens wrote it: accepted again
    assert load(build_pixart(tiny_spec, seed=0), lora=out).lora == str(out)
    original = config.read_text()
    config.write_text(original.replace('"r": 8', '"r": 4'))
    with pytest.raises(DamagedError, match=r"adapter_config\.json fails its digest"):
        load(build_pixart(tiny_spec, seed=0), lora=out)
    config.write_text(original[: len(original) // 2])
    with pytest.raises(DamagedError, match=r"adapter_config\.json fails its digest"):
        load(build_pixart(tiny_spec, seed=0), lora=out)


def test_a_plain_peft_folder_with_an_edited_rank_or_a_truncated_config_is_one_clear_line(tiny_lens, tiny_spec, data,
                                                                                         tmp_path):
    out = finetune(tiny_lens, data, tmp_path / "lora", **FAST)
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (plain / name).write_bytes((out / name).read_bytes())
    assert load(build_pixart(tiny_spec, seed=0), lora=plain).lora == str(plain)  # someone else's adapter: merged
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    with pytest.raises(ValueError, match=r"this adapter is for another model: .*plain does not fit") as err:
        load(build_pixart(tiny_spec, seed=0), lora=plain)
    assert "\n" not in str(err.value)
    (plain / "adapter_config.json").write_text(json.dumps(config)[:40])
    with pytest.raises(DamagedError, match=r"peft adapter config .*adapter_config\.json is unreadable or truncated"):
        load(build_pixart(tiny_spec, seed=0), lora=plain)


def test_an_adapter_loaded_onto_another_base_or_another_model_is_refused(tiny_lens, tiny_spec, data, tmp_path):
    from dit_lens.model.sana import SanaSpec, build_sana

    out = finetune(tiny_lens, data, tmp_path / "lora", **FAST)
    with pytest.raises(ValueError, match=r"trained on another base model of this architecture .*finetune\.json.*"
                                         r"allow_other_base=True"):
        load(build_pixart(tiny_spec, seed=1), lora=out)
    other = load(build_pixart(tiny_spec, seed=1), lora=out, allow_other_base=True)
    assert other.lora == str(out) and other.fingerprint != load(build_pixart(tiny_spec, seed=1)).fingerprint
    with pytest.raises(ValueError, match=r"this adapter is for another model \(.* trained on a "
                                         r"PixArtTransformer2DModel with 3 layers of width 16; this pipeline's "
                                         r"denoiser is a SanaTransformer2DModel\)"):
        load(build_sana(SanaSpec(), seed=0), lora=out, allow_other_base=True)
    full = finetune(tiny_lens, data, tmp_path / "full", method="full", **{**FAST, "steps": 2})
    smaller = PixArtSpec(num_layers=2, num_heads=2, head_dim=8, sample_size=8, patch_size=2)
    with pytest.raises(ValueError, match=r"this adapter is for another model .*PixArtTransformer2DModel of another "
                                         r"size"):
        load(build_pixart(smaller, seed=0), lora=full, allow_other_base=True)


def _png16(path, rgb):
    """A real 16-bit RGB PNG (Pillow writes 16-bit greyscale only)."""
    import struct

    h, w, _ = rgb.shape
    raw = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_pngs_are_scaled_by_their_bit_depth(tmp_path):
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    grey = np.full((16, 16), 16384, np.uint16)  # a quarter of the 16-bit range
    Image.fromarray(grey).save(folder / "grey.png")
    with Image.open(folder / "grey.png") as image:
        assert image.mode == "I;16"  # a real 16-bit greyscale PNG
    _png16(folder / "rgb.png", np.full((16, 16, 3), 49152, np.uint16))  # three quarters
    (folder / "metadata.jsonl").write_text('{"file_name": "grey.png", "text": "a"}\n'
                                           '{"file_name": "rgb.png", "text": "b"}\n')
    images = read_image_folder(folder, size=16).images
    np.testing.assert_allclose(images[0], 0.25, atol=1e-3)  # not almost all white
    np.testing.assert_allclose(images[1], 0.75, atol=1 / 255)


def test_a_truncated_image_or_a_latin_1_metadata_file_is_named(tmp_path, data):
    folder = write_image_folder(tmp_path / "data", data.images, data.texts)
    png = (folder / "00001.png").read_bytes()
    (folder / "00001.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(ValueError, match=r"00001\.png \(line 2 of metadata\.jsonl\) cannot be read as an image"):
        read_image_folder(folder, size=16)
    (folder / "00001.png").write_bytes(png)
    (folder / "metadata.jsonl").write_bytes('{"file_name": "00000.png", "text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"metadata\.jsonl is not UTF-8 text .*; save it as UTF-8"):
        read_image_folder(folder, size=16)


def test_a_truncated_or_garbage_record_is_named(tiny_lens, tiny_spec, data, tmp_path):
    out = finetune(tiny_lens, data, tmp_path / "lora", **FAST)
    record = out / "finetune.json"
    text = record.read_text()
    for damaged in (text[: len(text) // 2], "garbage"):
        record.write_text(damaged)
        for attempt in (lambda: finetune(tiny_lens, data, out, **FAST), lambda: read_record(out),
                        lambda: load(build_pixart(tiny_spec, seed=0), lora=out)):
            with pytest.raises(DamagedError, match=r"fine-tune record .*finetune\.json is unreadable or truncated"):
                attempt()


def _cli(tmp_path, *flags):
    return ["finetune", "--model", "model", "--data", str(tmp_path / "data"), "--steps", "6", "--batch-size", "2",
            "--checkpoint-every", "3", "--quiet", *flags]


def _kill(monkeypatch, argv):
    """Run the command line, stopped by Ctrl-C after its checkpoint at step 3."""
    calls, real = {"n": 0}, _Trainer.loss

    def dies_at_step_five(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(_Trainer, "loss", dies_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(_Trainer, "loss", real)


def _error(capsys):
    """The one error line (loading progress bars aside) and no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dit-lens: error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    return errors[0]


def test_the_command_line_resumes_whatever_the_model_path_and_names_where_the_adapter_is(
        tiny_pipeline, data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny_pipeline.save_pretrained(tmp_path / "model")
    write_image_folder(tmp_path / "data", data.images, data.texts)
    _kill(monkeypatch, _cli(tmp_path, "--out", "first"))  # the model as a relative path
    calls, real = [], _Trainer.loss
    monkeypatch.setattr(_Trainer, "loss", lambda self, *args: calls.append(1) or real(self, *args))
    absolute = [str(tmp_path / "model") if flag == "model" else flag for flag in _cli(tmp_path, "--out", "first")]
    assert main(absolute) == 0  # the same model as an absolute path: resumed at step 3
    assert len(calls) == 3
    moved = tmp_path / "moved"
    (tmp_path / "first").rename(moved)
    capsys.readouterr()
    assert main(_cli(tmp_path, "--out", str(moved))) == 0  # finished: checked and named where it is now
    printed = capsys.readouterr().out
    assert f"use it: dit_lens.load('model', lora={str(moved)!r})" in printed and "'first'" not in printed


def test_the_command_line_refuses_each_fault_in_one_line(tiny_pipeline, data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny_pipeline.save_pretrained(tmp_path / "model")
    write_image_folder(tmp_path / "data", data.images, data.texts)
    assert main(_cli(tmp_path, "--out", "done")) == 0
    assert main(_cli(tmp_path, "--out", "done", "--lr", "0.01")) == 2
    assert "other settings or data (config.lr: 0.001 there, 0.01 now)" in _error(capsys)
    assert main(_cli(tmp_path, "--out", "wild", "--lr", "1e12")) == 2
    err = _error(capsys)
    assert "diverged" in err and "no checkpoint was written" in err and not (tmp_path / "wild").exists()
    assert main(_cli(tmp_path, "--out", "big", "--seed", str(2**64))) == 2
    assert "--seed must be a whole number" in _error(capsys) and not (tmp_path / "big").exists()
    (tmp_path / "done" / "adapter_model.safetensors").unlink()
    assert main(_cli(tmp_path, "--out", "done")) == 2
    assert "adapter_model.safetensors is missing" in _error(capsys)
    _kill(monkeypatch, _cli(tmp_path, "--out", "killed"))
    torch.save({"identity": _RunsCode(tmp_path / "ran.txt")}, tmp_path / "killed" / "checkpoint.pt")
    capsys.readouterr()
    assert main(_cli(tmp_path, "--out", "killed")) == 2
    assert "checkpoint.pt holds objects other than tensors" in _error(capsys) and not (tmp_path / "ran.txt").exists()
