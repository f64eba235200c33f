"""The embedded world: procedural samples, training loop, judges and the shipped files."""

import json

import numpy as np
import pytest
import torch

import dit_lens
from dit_lens.world import LABELS, load_anatomy_segmenter, load_oracle, load_segmenter, render
from dit_lens.world.judges import (EMBEDDED_JUDGES, Oracle, OracleNet, Segmenter, SegmenterNet, save_judge,
                                   train_segmenter)
from dit_lens.world.build import build_anatomy_segmenter, finetune_transformer
from dit_lens.world.stages import BUILD_STAGES, recipe
from dit_lens.world.train import StageConfig, fit, train_transformer

shipped = pytest.mark.skipif(not (EMBEDDED_JUDGES / "world.json").is_file(), reason="embedded world not built")


def test_labels_are_the_eight_kvasir_classes():
    assert LABELS == ("normal cecum", "normal pylorus", "normal z-line", "polyps", "dyed lifted polyps",
                      "dyed resection margins", "esophagitis", "ulcerative colitis")


def test_render_is_a_pure_function_of_label_seed_split():
    a = render(["polyps", "esophagitis"], [5, 6])
    b = render(["polyps", "esophagitis"], [5, 6])
    assert np.array_equal(a.images, b.images) and np.array_equal(a.lesion, b.lesion)
    other_seed = render(["polyps"], [7]).images[0]
    shifted = render(["polyps"], [5], split="shifted").images[0]
    assert not np.array_equal(a.images[0], other_seed)
    assert not np.array_equal(a.images[0], shifted)
    assert a.captions == ("An endoscopic image of polyps", "An endoscopic image of esophagitis")


def test_lesion_masks_empty_exactly_for_normal_classes():
    s = render(list(LABELS) * 4, [i for i in range(4) for _ in LABELS])
    for label, lesion, anatomy, image in zip(s.labels, s.lesion, s.anatomy, s.images):
        assert lesion.any() == (not label.startswith("normal")), label
        assert anatomy.any(), label
        assert image.min() >= 0 and image.max() <= 1


def test_dye_is_blue_and_appears_with_and_without_a_polyp():
    s = render(["dyed lifted polyps", "dyed resection margins", "polyps"] * 8, [i for i in range(8) for _ in range(3)])

    def fractions(label):  # per image: share of lesion pixels that are indigo stain, and red polyp
        chosen = [(img, m) for img, m, l in zip(s.images, s.lesion, s.labels) if l == label]
        stain = np.array([((img[..., 2] - img[..., 0])[m] > 0.1).mean() for img, m in chosen])
        polyp = np.array([((img[..., 0] - img[..., 2])[m] > 0.2).mean() for img, m in chosen])
        return stain, polyp

    stain, polyp = fractions("dyed lifted polyps")  # the same red polyp, on a stained cushion
    assert stain.min() > 0.3 and polyp.min() > 0.2
    stain, polyp = fractions("dyed resection margins")  # stain without a polyp
    assert stain.min() > 0.3 and polyp.max() < 0.02
    stain, polyp = fractions("polyps")  # a polyp without stain
    assert stain.max() < 0.02 and polyp.min() > 0.8


def test_shifted_split_changes_lighting_statistics():
    labels = list(LABELS) * 8
    seeds = [i for i in range(8) for _ in LABELS]
    train, shifted = render(labels, seeds).images, render(labels, seeds, split="shifted").images
    assert shifted.mean() < train.mean() - 0.03
    assert (shifted[..., 2] - shifted[..., 0]).mean() > (train[..., 2] - train[..., 0]).mean()


def test_render_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown label 'polyp'"):
        render(["polyp"], [0])
    with pytest.raises(ValueError, match="one seed per label"):
        render(["polyps"], [0, 1])
    with pytest.raises(ValueError, match="split"):
        render(["polyps"], [0], split="test")


def test_stage_config_validates():
    with pytest.raises(ValueError, match="steps"):
        StageConfig(steps=0, batch_size=4, lr=1e-3)
    with pytest.raises(ValueError, match="ema"):
        StageConfig(steps=1, batch_size=4, lr=1e-3, ema=1.5)


def test_fit_lowers_the_loss_and_is_seeded():
    x = torch.randn(64, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5])

    def run():
        torch.manual_seed(1)
        net = torch.nn.Linear(3, 1)
        torch.nn.init.zeros_(net.weight)
        cfg = StageConfig(steps=150, batch_size=16, lr=5e-2, warmup=5, seed=0, ema=0.9)
        trained = fit(net, cfg, lambda idx, gen: ((net(x[idx])[:, 0] - y[idx]) ** 2).mean(), 64, log=lambda _: None)
        return trained.weight.detach().clone(), float(((trained(x)[:, 0] - y) ** 2).mean())

    (w1, loss1), (w2, _) = run(), run()
    assert loss1 < 0.05 * float((y**2).mean())
    assert torch.equal(w1, w2)
    assert not w1.requires_grad


def test_recipe_overrides_are_parsed_and_validated():
    stages = recipe(["transformer.steps=10", "transformer.lr=2e-4", "train_text_encoder=false"])
    assert stages["transformer"].steps == 10 and stages["transformer"].lr == 2e-4
    assert stages["train_text_encoder"] is False
    assert stages["vae"] == BUILD_STAGES["vae"] and BUILD_STAGES["transformer"].steps != 10
    assert recipe(scale=0.5)["oracle"].steps == BUILD_STAGES["oracle"].steps // 2
    for bad, match in [("transformer.depth=3", "no field 'depth'"), ("colour=red", "stage.field=value"),
                       ("train_text_encoder=3", "takes a bool"), ("transformer=5", "stage.field=value"),
                       ("transformer.steps", "stage.field=value")]:
        with pytest.raises(ValueError, match=match):
            recipe([bad])


@pytest.mark.parametrize("joint", [False, True])
def test_transformer_training_moves_the_text_encoder_only_when_asked(tiny_pipeline, joint):
    pipe = tiny_pipeline
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    blocks_before = pipe.transformer.transformer_blocks[0].attn2.to_out[0].weight.clone()
    gen = torch.Generator().manual_seed(0)
    size = pipe.transformer.config.sample_size
    mean, std = torch.randn(8, 4, size, size, generator=gen), torch.rand(8, 4, size, size, generator=gen) * 0.1
    cfg = StageConfig(steps=3, batch_size=4, lr=1e-2, warmup=1, seed=0)
    train_transformer(pipe, mean, std, torch.tensor([[0], [1]] * 4), ["a polyp", "a cecum"], cfg,
                      train_text_encoder=joint, log=lambda _: None)
    changed = any(not torch.equal(before[k], v) for k, v in pipe.text_encoder.state_dict().items())
    assert changed == joint
    assert not torch.equal(blocks_before, pipe.transformer.transformer_blocks[0].attn2.to_out[0].weight)
    assert not pipe.transformer.training and not pipe.text_encoder.training
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())


def test_judges_round_trip_and_check_images(tmp_path):
    torch.manual_seed(0)
    oracle = Oracle(OracleNet(width=4))
    save_judge(oracle, tmp_path / "o")
    loaded = load_oracle(tmp_path / "o")
    images = render(["polyps", "normal cecum"], [0, 1]).images
    assert loaded.labels == LABELS
    assert np.allclose(loaded(images), oracle(images))
    assert loaded(images).shape == (2, 8)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        loaded(images[0])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        loaded(images * 255)
    with pytest.raises(FileNotFoundError, match="no oracle"):
        load_oracle(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a segmenter"):
        load_segmenter(tmp_path / "o")


def test_segmenter_learns_lesions_quickly():
    s = render(["polyps", "dyed resection margins", "normal cecum"] * 24, [i for i in range(24) for _ in range(3)])
    seg = train_segmenter(s.images, s.lesion, StageConfig(steps=60, batch_size=16, lr=3e-3, warmup=5),
                          log=lambda _: None)
    pred = seg(s.images)
    assert pred.shape == s.lesion.shape and pred.dtype == bool
    dice = 2 * (pred & s.lesion).sum() / (pred.sum() + s.lesion.sum())
    assert dice > 0.6


def test_anatomy_segmenter_round_trips_and_refuses_bad_input_and_the_wrong_kind(tmp_path):
    torch.manual_seed(0)
    anatomy, lesion = Segmenter(SegmenterNet(width=4), "anatomy"), Segmenter(SegmenterNet(width=4))
    save_judge(anatomy, tmp_path / "a")
    save_judge(lesion, tmp_path / "l")
    loaded = load_anatomy_segmenter(tmp_path / "a")
    images = render(["normal z-line", "normal pylorus"], [0, 1]).images
    assert loaded.target == "anatomy" and np.array_equal(loaded(images), anatomy(images))
    assert loaded(images).shape == (2, 64, 64) and loaded(images).dtype == bool
    with pytest.raises(ValueError, match=r"the anatomy segmenter takes images of shape \(N, H, W, 3\)"):
        loaded(images[0])
    with pytest.raises(ValueError, match=r"the anatomy segmenter takes images in \[0, 1\]"):
        loaded(images * 255)
    with pytest.raises(ValueError, match="holds a lesion segmenter, not an anatomy segmenter"):
        load_anatomy_segmenter(tmp_path / "l")
    with pytest.raises(ValueError, match=r"holds an anatomy segmenter, not a lesion segmenter.*load_anatomy_segmenter"):
        load_segmenter(tmp_path / "a")
    save_judge(Oracle(OracleNet(width=4)), tmp_path / "o")
    with pytest.raises(ValueError, match="not a segmenter"):
        load_anatomy_segmenter(tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="no anatomy segmenter"):
        load_anatomy_segmenter(tmp_path / "missing")
    with pytest.raises(ValueError, match="target must be one of"):
        Segmenter(SegmenterNet(width=4), "organ")
    with pytest.raises(ValueError, match="one \\(H, W\\) mask per image"):
        train_segmenter(images, np.zeros((3, 64, 64), bool), StageConfig(steps=1, batch_size=2, lr=1e-3),
                        target="anatomy", log=lambda _: None)


def test_anatomy_stage_trains_alone_on_a_built_world(tmp_path, tiny_pipeline):
    tiny_pipeline.vae.save_pretrained(tmp_path / "pipeline" / "vae")
    record = {"stages": {"images_per_class": 2}, "seconds": {"total": 1.0}}
    (tmp_path / "world.json").write_text(json.dumps(record))
    folder = build_anatomy_segmenter(tmp_path, overrides=["anatomy.steps=2", "anatomy.batch_size=4"])
    assert folder == tmp_path / "anatomy"
    assert json.loads((folder / "judge.json").read_text())["target"] == "anatomy"
    assert load_anatomy_segmenter(folder)(render(["polyps"], [0]).images).shape == (1, 64, 64)
    written = json.loads((tmp_path / "world.json").read_text())
    assert written["stages"]["anatomy"]["steps"] == 2 and written["seconds"]["total"] == 1.0
    assert written["seconds"]["anatomy"] > 0 and "anatomy_built_on" in written
    assert not (tmp_path / "oracle").exists() and not (tmp_path / "segmenter").exists()
    with pytest.raises(FileNotFoundError, match="no built world"):
        build_anatomy_segmenter(tmp_path / "nothing")


def test_finetune_continues_the_transformer_into_a_new_world(tmp_path, tiny_pipeline):
    from diffusers import PixArtTransformer2DModel

    world = tmp_path / "world"
    tiny_pipeline.save_pretrained(world / "pipeline")
    save_judge(Oracle(OracleNet(width=4)), world / "oracle")
    (world / "world.json").write_text(json.dumps({"stages": {"images_per_class": 1, "train_text_encoder": False}}))
    cfg = StageConfig(steps=1, batch_size=4, lr=1e-2, warmup=1, seed=0)
    with pytest.raises(ValueError, match="class_weights"):
        finetune_transformer(world, tmp_path / "bad", cfg, class_weights={"normal cecum": 0})
    with pytest.raises(FileExistsError, match="new world"):
        finetune_transformer(world, world, cfg)
    out = finetune_transformer(world, tmp_path / "tuned", cfg, class_weights={"normal cecum": 2})
    before = PixArtTransformer2DModel.from_pretrained(world / "pipeline" / "transformer").state_dict()
    after = PixArtTransformer2DModel.from_pretrained(out / "pipeline" / "transformer").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert np.allclose(load_oracle(out / "oracle")(render(["polyps"], [0]).images),
                       load_oracle(world / "oracle")(render(["polyps"], [0]).images))
    record = json.loads((out / "world.json").read_text())["finetune"]
    assert record["class_weights"] == {"normal cecum": 2} and record["stage"]["steps"] == 1


@shipped
def test_shipped_world_loads_and_is_deterministic():
    lens = dit_lens.load("embedded")
    assert lens.num_layers >= 12 and lens.pipeline_kwargs["height"] >= 64
    assert type(lens.pipeline).__name__ == "PixArtAlphaPipeline"
    assert lens.pipeline.transformer.config.norm_type == "ada_norm_single"
    a = lens.plain("An endoscopic image of polyps", seed=3, num_inference_steps=4)
    b = lens.plain("An endoscopic image of polyps", seed=3, num_inference_steps=4)
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    record = json.loads((EMBEDDED_JUDGES / "world.json").read_text())
    assert record["spec"]["num_layers"] == lens.num_layers and "built_on" in record


@shipped
def test_shipped_judges_recognise_held_out_images():
    s = render(list(LABELS) * 4, [100_000 + i for i in range(4) for _ in LABELS])
    probs = load_oracle("embedded")(s.images)
    assert (probs.argmax(1) == np.arange(len(s.labels)) % 8).mean() >= 0.9
    masks = load_segmenter("embedded")(s.images)
    assert 2 * (masks & s.lesion).sum() / (masks.sum() + s.lesion.sum()) > 0.8


@shipped
def test_shipped_files_fit_the_budget():
    size = sum(f.stat().st_size for f in EMBEDDED_JUDGES.rglob("*") if f.is_file())
    assert size <= 40 * 2**20


@shipped
def test_shipped_anatomy_segmenter_finds_landmarks_on_fresh_images():
    s = render(list(LABELS) * 6, [300_000 + i for i in range(6) for _ in LABELS])  # seeds no stage trained on
    masks = load_anatomy_segmenter("embedded")(s.images)
    inter, total = (masks & s.anatomy).sum((1, 2)), masks.sum((1, 2)) + s.anatomy.sum((1, 2))
    dice = 2 * inter / total  # (N,): every class has a landmark, so no image has an empty truth
    assert dice.mean() > 0.85
    assert min(dice[np.array(s.labels) == label].mean() for label in LABELS) > 0.75


def test_lumen_tint_touches_only_dark_pixels_of_half_the_batch():
    import torch

    from dit_lens.world.judges import tint_lumen

    x = torch.full((64, 3, 8, 8), 0.6) * 2 - 1  # bright everywhere (in [-1, 1])
    x[:, :, :2, :2] = -1.0  # a black lumen in one corner
    out = tint_lumen(x, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, 2:], x[:, :, 2:]) and torch.equal(out[:, :, :, 2:], x[:, :, :, 2:])
    tinted = (out[:, 0, :2, :2] > -1.0).flatten(1).any(1)  # red raised in the lumen
    assert 16 < int(tinted.sum()) < 48
    again = tint_lumen(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
