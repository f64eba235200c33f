"""Fine-tuning: the drifted loss, adapters that load and change the model, determinism, resuming a killed
run bit for bit, the data folder and refusals that keep the user's files."""

import json

import numpy as np
import pytest
import torch

from dit_lens import LatentDrift, generate, load
from dit_lens.apps.cli import main
from dit_lens.model.builders import build_pixart
from dit_lens.storage import FolderClaimError, load_torch
from dit_lens.training import TrainingImages, finetune, read_image_folder, read_record, write_image_folder
from dit_lens.training.trainer import _Trainer
from dit_lens.training.inputs import drifted_training_pair

FAST = dict(steps=6, batch_size=4, lr=1e-2, warmup=1, checkpoint_every=3, progress=False)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (6, 16, 16, 3)).astype(np.float32)
    return TrainingImages.from_arrays(images, ["An image of polyps"] * 3 + ["An image of normal cecum"] * 3, "test")


def _weights(lens):
    return {k: v.clone() for k, v in lens.pipeline.transformer.state_dict().items()}


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_the_drifted_pair_is_the_forward_process_with_drifted_noise(kind):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(prediction_type=kind)
    x0, eps = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0)), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy, target = drifted_training_pair(sched, x0, eps, t, 0.1)
    torch.testing.assert_close(noisy, ab.sqrt() * x0 + (1 - ab).sqrt() * (eps + 0.1))
    expected = {"epsilon": eps + 0.1, "v_prediction": ab.sqrt() * (eps + 0.1) - (1 - ab).sqrt() * x0, "sample": x0}[kind]
    torch.testing.assert_close(target, expected)
    plain_noisy, plain_target = drifted_training_pair(sched, x0, eps, t, 0.0)
    assert torch.equal(plain_noisy, sched.add_noise(x0, eps, t))  # delta = 0: the plain loss, bit for bit
    assert torch.equal(plain_target, {"epsilon": eps, "v_prediction": sched.get_velocity(x0, eps, t), "sample": x0}[kind])


def test_a_lora_adapter_trains_loads_and_leaves_the_base_lens_alone(tiny_lens, tiny_spec, data, tmp_path):
    before = _weights(tiny_lens)
    out = finetune(tiny_lens, data, tmp_path / "lora", drift=0.05, **FAST)
    assert all(torch.equal(before[k], v) for k, v in tiny_lens.pipeline.transformer.state_dict().items())
    assert not any(p.requires_grad for p in tiny_lens.pipeline.transformer.parameters())
    assert (out / "adapter_config.json").is_file() and not (out / "checkpoint.pt").exists()
    record = read_record(out)
    assert record["config"]["method"] == "lora" and record["config"]["drift"] == 0.05 == record["drift"]
    assert record["data"]["digest"] == data.digest and record["data"]["images"] == 6
    assert record["data"]["per_caption"] == {"An image of polyps": 3, "An image of normal cecum": 3}
    assert record["base"]["fingerprint"] == tiny_lens.fingerprint and record["steps_done"] == 6
    adapted = load(build_pixart(tiny_spec, seed=0), lora=out)
    assert adapted.lora == str(out) and adapted.fingerprint != tiny_lens.fingerprint
    kw = dict(seeds=[0], num_inference_steps=2, progress=False)
    plain = generate(tiny_lens, "An image of polyps", **kw)["image"].values
    mine = generate(adapted, "An image of polyps", **kw)["image"].values
    assert not np.array_equal(plain, mine)
    drifted = generate(adapted, "An image of polyps", edits=[LatentDrift(record["drift"])], **kw)
    np.testing.assert_allclose(drifted["image"].sel(branch="original").values, mine[:, :, 0], atol=1e-5)
    assert not np.allclose(drifted["image"].sel(branch="edited").values, mine[:, :, 0], atol=1e-3)


def test_attn2_adapts_only_cross_attention_and_full_trains_every_weight(tiny_lens, tiny_spec, data, tmp_path):
    from safetensors.torch import load_file

    attn2 = finetune(tiny_lens, data, tmp_path / "attn2", method="attn2", **FAST)
    keys = load_file(attn2 / "adapter_model.safetensors").keys()
    assert keys and all(".attn2." in k for k in keys)
    full = finetune(tiny_lens, data, tmp_path / "full", method="full", **{**FAST, "lr": 1e-3})
    assert (full / "transformer" / "config.json").is_file()
    loaded = load(build_pixart(tiny_spec, seed=0), lora=full)
    changed = [k for k, v in loaded.pipeline.transformer.state_dict().items() if not torch.equal(v, _weights(tiny_lens)[k])]
    assert len(changed) > 0.8 * len(_weights(tiny_lens))  # (nearly) every tensor moved, not only adapters


def test_a_text_encoder_lora_is_saved_and_merged(tiny_lens, tiny_spec, data, tmp_path):
    out = finetune(tiny_lens, data, tmp_path / "te", text_encoder=True, **FAST)
    assert (out / "text_encoder" / "adapter_config.json").is_file()
    loaded = load(build_pixart(tiny_spec, seed=0), lora=out)
    base = tiny_lens.pipeline.text_encoder.state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in loaded.pipeline.text_encoder.state_dict().items())


def test_the_same_seed_gives_the_same_adapter_and_a_killed_run_resumes_bit_for_bit(tiny_lens, data, tmp_path,
                                                                                     monkeypatch):
    from safetensors.torch import load_file

    whole = finetune(tiny_lens, data, tmp_path / "whole", **FAST)
    again = finetune(tiny_lens, data, tmp_path / "again", **FAST)
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = load_file(finetune(tiny_lens, data, tmp_path / "seed1", seed=1, **FAST) / "adapter_model.safetensors")
    assert not all(torch.equal(a[k], other[k]) for k in a)

    calls = {"n": 0}
    real_loss = _Trainer.loss

    def dies_at_step_five(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the user's Ctrl-C, after the checkpoint at step 3
        return real_loss(self)

    monkeypatch.setattr(_Trainer, "loss", dies_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_lens, data, tmp_path / "killed", **FAST)
    assert load_torch(tmp_path / "killed" / "checkpoint.pt", what="checkpoint")["step"] == 3
    monkeypatch.setattr(_Trainer, "loss", real_loss)
    resumed = finetune(tiny_lens, data, tmp_path / "killed", **FAST)
    c = load_file(resumed / "adapter_model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert read_record(resumed)["losses"] == read_record(whole)["losses"]
    stamp = (resumed / "finetune.json").stat().st_mtime_ns
    assert finetune(tiny_lens, data, tmp_path / "killed", **FAST) == resumed  # finished: returned as it is
    assert (resumed / "finetune.json").stat().st_mtime_ns == stamp


def test_refusals_keep_the_user_s_files(tiny_lens, data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FolderClaimError, match="is not empty and was not made by dit-lens"):
        finetune(tiny_lens, data, mine, **FAST)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    done = finetune(tiny_lens, data, tmp_path / "done", **FAST)
    with pytest.raises(FolderClaimError, match=r"other settings or data \(config.steps: 6 there, 7 now\)"):
        finetune(tiny_lens, data, done, **{**FAST, "steps": 7})
    with pytest.raises(ValueError, match="method must be one of"):
        finetune(tiny_lens, data, tmp_path / "x", method="dreambooth")
    with pytest.raises(ValueError, match="drift must be a finite number"):
        finetune(tiny_lens, data, tmp_path / "x", drift=float("nan"))
    small = TrainingImages.from_arrays(np.zeros((1, 8, 8, 3), np.float32), ["a"])
    with pytest.raises(ValueError, match="8x8 px but the model makes 16x16"):
        finetune(tiny_lens, small, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        finetune(tiny_lens, data, tmp_path / "y", mixed_precision="fp16", **FAST)


def test_the_image_folder_round_trips_and_bad_folders_say_what_is_wrong(tmp_path, data):
    folder = write_image_folder(tmp_path / "data", data.images, data.texts)
    back = read_image_folder(folder, size=16)
    assert back.texts == data.texts and back.images.shape == (6, 16, 16, 3)
    assert np.abs(back.images - data.images).max() <= 0.5 / 255 + 1e-6  # 8-bit PNGs
    assert read_image_folder(folder, size=16).digest == back.digest
    assert read_image_folder(folder, size=8).images.shape == (6, 8, 8, 3)  # resized to the model's size
    with pytest.raises(FileExistsError, match="not empty"):
        write_image_folder(folder, data.images, data.texts)
    meta = folder / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join(lines[:-1] + ['{"file_name": "00005.png", "text": "another caption"}']) + "\n")
    assert read_image_folder(folder, size=16).digest != back.digest  # a caption is part of the data
    meta.write_text(lines[0] + "\nnot json\n")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_image_folder(folder, size=16)
    meta.write_text('{"file_name": "missing.png", "text": "x"}\n')
    with pytest.raises(FileNotFoundError, match="names 'missing.png'"):
        read_image_folder(folder, size=16)
    meta.write_text('{"file_name": "00000.png"}\n')
    with pytest.raises(ValueError, match="needs a string 'file_name' and a string 'text'"):
        read_image_folder(folder, size=16)
    meta.unlink()
    with pytest.raises(FileNotFoundError, match="has no metadata.jsonl"):
        read_image_folder(folder, size=16)


def test_the_command_line_fine_tunes_a_pipeline_folder(tiny_pipeline, data, tmp_path, capsys):
    tiny_pipeline.save_pretrained(tmp_path / "model")
    write_image_folder(tmp_path / "data", data.images, data.texts)
    args = ["finetune", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--out",
            str(tmp_path / "adapter"), "--steps", "2", "--batch-size", "2", "--drift", "0.1", "--quiet",
            "--validation", str(tmp_path / "data"), "--validate-every", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "LatentDrift(0.1, steps=None) (z_T only, as it was trained)" in printed and "held-out loss" in printed
    assert read_record(tmp_path / "adapter")["config"]["steps"] == 2
    assert main(["finetune", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "b"), "--quiet"]) == 2
    assert "is not a folder; pass an imagefolder" in capsys.readouterr().err


def test_the_world_writes_its_shifted_split_as_training_data(tmp_path):
    from dit_lens.world import LABELS

    assert main(["world", "data", "--out", str(tmp_path / "w"), "--per-class", "2", "--count", "esophagitis=1"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "w" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(LABELS) - 1
    assert sum(r["text"] == "An endoscopic image of esophagitis" for r in rows) == 1
    assert main(["world", "data", "--out", str(tmp_path / "w2"), "--count", "esophagitis"]) == 2


def test_validation_records_the_held_out_loss_and_changes_no_weight(tiny_lens, data, tmp_path):
    from safetensors.torch import load_file

    held = TrainingImages.from_arrays(data.images[::-1].copy(), data.texts[::-1], "held out")
    plain = finetune(tiny_lens, data, tmp_path / "plain", **FAST)
    watched = finetune(tiny_lens, data, tmp_path / "watched", validation=held, validate_every=2, **FAST)
    curve = read_record(watched)["validation"]
    assert [step for step, _ in curve] == [0, 2, 4, 6] and all(np.isfinite(v) for _, v in curve)
    assert read_record(plain)["validation"] == []
    a, b = load_file(plain / "adapter_model.safetensors"), load_file(watched / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # its draws are its own: training is unchanged
    assert len({v for _, v in curve}) > 1  # the held-out loss moves as the adapter trains
    with pytest.raises(FolderClaimError, match="other settings or data"):  # other validation data: another run
        finetune(tiny_lens, data, watched, validation=data, validate_every=2, **FAST)
