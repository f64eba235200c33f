import json

import numpy as np
import pytest
import torch

from dit_lens import load
from dit_lens.testing import PixArtSpec, build_pixart


def test_loaded_pipeline_is_in_eval_mode_and_described(tiny_lens):
    assert tiny_lens.num_layers == 3
    assert tiny_lens.width == 16
    assert tiny_lens.token_grid == (4, 4)
    for module in tiny_lens.pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            assert not any(m.training for m in module.modules())


def test_plain_call_with_pipeline_kwargs_is_deterministic(tiny_lens):
    def call(seed):
        return tiny_lens.pipeline(
            "An endoscopic image of polyps",
            generator=torch.Generator("cpu").manual_seed(seed),
            num_inference_steps=3,
            guidance_scale=4.5,
            output_type="np",
            **tiny_lens.pipeline_kwargs,
        ).images

    a, b, c = call(0), call(0), call(1)
    assert a.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_folder_round_trip_gives_identical_images(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    from_object = load(tiny_pipeline)
    from_folder = load(tmp_path / "pipe")
    assert from_folder.source == str(tmp_path / "pipe")
    assert from_folder.fingerprint == from_object.fingerprint
    np.testing.assert_array_equal(
        from_object.plain("a polyp", seed=3, num_inference_steps=3),
        from_folder.plain("a polyp", seed=3, num_inference_steps=3),
    )


def test_fingerprint_tracks_weights(tiny_spec):
    a = load(build_pixart(tiny_spec, seed=0)).fingerprint
    b = load(build_pixart(tiny_spec, seed=1)).fingerprint
    assert a != b


def test_fingerprint_tracks_scheduler_settings(tiny_spec):
    from diffusers import DPMSolverMultistepScheduler

    pipe = build_pixart(tiny_spec, seed=0)
    before = load(pipe).fingerprint
    pipe.scheduler = DPMSolverMultistepScheduler(prediction_type="v_prediction")
    assert load(pipe).fingerprint != before


def test_sigma_pipelines_load(tmp_path):
    lens = load(build_pixart(PixArtSpec(num_layers=2, sigma=True)))
    assert type(lens.pipeline).__name__ == "PixArtSigmaPipeline"
    assert lens.plain("a polyp", seed=0, num_inference_steps=2).shape == (16, 16, 3)


def test_lora_adapter_is_merged(tiny_spec, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = build_pixart(tiny_spec, seed=0)
    peft_model = get_peft_model(
        base.transformer, LoraConfig(r=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "lora")
    expected = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}

    lens = load(build_pixart(tiny_spec, seed=0), lora=tmp_path / "lora")
    got = lens.denoiser.state_dict()
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    plain = load(build_pixart(tiny_spec, seed=0))
    assert lens.fingerprint != plain.fingerprint
    assert lens.lora == str(tmp_path / "lora")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such pipeline folder"):
        load(tmp_path / "nope")


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="model_index.json"):
        load(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid"):
        load(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    with pytest.raises(ValueError, match="NoSuchPipeline"):
        load(tmp_path)


def test_denoiser_that_is_not_a_cross_attention_dit(tmp_path):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel, AutoencoderKL

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    )
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler())
    with pytest.raises(TypeError, match="DiTTransformer2DModel, which is not a supported DiT; "
                                        "supported: PixArtTransformer2DModel"):
        load(pipe)
    pipe.save_pretrained(tmp_path / "dit")
    with pytest.raises(TypeError, match="DiTTransformer2DModel"):
        load(tmp_path / "dit")


def test_bad_lora_folder(tiny_pipeline, tmp_path):
    with pytest.raises(FileNotFoundError, match="LoRA"):
        load(tiny_pipeline, lora=tmp_path / "missing")
    with pytest.raises(ValueError, match="adapter_config.json"):
        load(tiny_pipeline, lora=tmp_path)


def test_a_lens_prints_as_one_line(tiny_lens):
    text = repr(tiny_lens)
    assert text == "Lens(PixArtTransformer2DModel, source='<object>', 3 layers × width 16, tokens 4×4, cpu, float32)"
