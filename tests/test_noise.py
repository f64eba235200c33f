"""optimize_noise / OptimizedNoise: the differentiable run against generate, the optimisation against the
real run, the sphere and trust region, determinism, untouched weights, round trips and refusals."""

import json
import math

import numpy as np
import pytest
import torch

from dit_lens import generate, intervention_from_dict
from dit_lens.interventions.base import EditContext, Intervention
from dit_lens.optimize import OptimizedNoise, class_probability, optimize_noise
from dit_lens.trace.runner import initial_noise
from dit_lens.world.judges import Oracle, OracleNet

T, PROMPT, LABELS = 3, "a polyp", ("polyps", "normal cecum", "esophagitis")


@pytest.fixture
def oracle():
    """A small seeded judge on the tiny pipeline's 16×16 images (an untrained OracleNet, weights grad-enabled
    as a freshly built torch module's are)."""
    torch.manual_seed(0)
    return Oracle(OracleNet(width=8, num_classes=len(LABELS)), LABELS)


def optimise(lens, objective, seeds=(0, 1, 2), **settings):
    settings = {"iterations": 4, "lr": 0.2, "max_angle": 0.6, "num_inference_steps": T, "progress": False, **settings}
    return optimize_noise(lens, PROMPT, seeds=list(seeds), objective=objective, **settings)


def pairs(lens, z, seeds=(0, 1, 2), guidance_scale=4.5):
    out = generate(lens, PROMPT, seeds=list(seeds), edits=[z], num_inference_steps=T, guidance_scale=guidance_scale,
                   progress=False)
    return out["image"].sel(prompt=PROMPT)  # (seed, branch, y, x, rgb)


def log_p(oracle, images, label="esophagitis"):
    return np.log(oracle(images)[:, oracle.labels.index(label)])


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_the_differentiable_run_is_the_run_generate_makes(tiny_lens, oracle, guidance_scale):
    objective = class_probability(oracle, "esophagitis")
    z = optimise(tiny_lens, objective, iterations=0, guidance_scale=guidance_scale)
    images = pairs(tiny_lens, z, guidance_scale=guidance_scale).sel(branch="original").values
    np.testing.assert_allclose(z.before, log_p(oracle, images), atol=1e-4, rtol=0)


def test_optimised_noise_raises_the_objective_of_the_real_run(tiny_lens, oracle):
    z = optimise(tiny_lens, class_probability(oracle, "esophagitis"))
    assert all(after > before + 0.05 for before, after in zip(z.before, z.after)), (z.before, z.after)
    image = pairs(tiny_lens, z)
    edited = log_p(oracle, image.sel(branch="edited").values)
    original = log_p(oracle, image.sel(branch="original").values)
    np.testing.assert_allclose(z.after, edited, atol=1e-4, rtol=0)  # what was optimised is what generate makes
    assert (edited > original + 0.05).all()


def test_a_shorter_differentiable_run_still_optimises_it(tiny_lens, oracle):
    z = optimise(tiny_lens, class_probability(oracle, "esophagitis"), num_inference_steps=4, grad_steps=2)
    assert z.grad_steps == 2 and all(a > b for b, a in zip(z.before, z.after))


def test_no_step_leaves_every_seed_its_own_noise(tiny_lens, oracle):
    objective = class_probability(oracle, "esophagitis")
    own = initial_noise(tiny_lens, [0, 1, 2]).numpy()
    for z in (optimise(tiny_lens, objective, iterations=0), optimise(tiny_lens, objective, lr=0.0),
              optimise(tiny_lens, objective, target=-1e9)):  # a target every seed already meets
        assert np.array_equal(z.noise, own) and z.best_iteration == (0, 0, 0) and z.before == z.after
        image = pairs(tiny_lens, z)
        assert np.array_equal(image.sel(branch="edited").values, image.sel(branch="original").values)


def test_a_seed_stops_at_the_target_and_one_already_there_is_left_alone(tiny_lens, oracle):
    objective = class_probability(oracle, "esophagitis")
    before = np.array(optimise(tiny_lens, objective, iterations=0).before)
    target = float(np.sort(before)[1])  # the middle seed meets it, the lowest does not
    z = optimise(tiny_lens, objective, target=target, iterations=8)
    own = initial_noise(tiny_lens, [0, 1, 2]).numpy()
    np.testing.assert_allclose(z.before, before, atol=1e-6, rtol=0)
    for i, b in enumerate(before):
        if b >= target:
            assert np.array_equal(z.noise[i], own[i]) and z.best_iteration[i] == 0
        else:
            assert z.after[i] >= target and 0 < z.best_iteration[i] < 8  # reached it, and stopped there


@pytest.mark.parametrize("max_angle", [0.3, None])
def test_noise_stays_on_its_sphere_and_in_its_trust_region(tiny_lens, oracle, max_angle):
    z = optimise(tiny_lens, class_probability(oracle, "esophagitis"), iterations=6, lr=0.25, max_angle=max_angle)
    own = initial_noise(tiny_lens, [0, 1, 2]).double().flatten(1)
    new = torch.tensor(z.noise).double().flatten(1)
    np.testing.assert_allclose(new.norm(dim=1) / own.norm(dim=1), 1.0, atol=1e-5, rtol=0)
    np.testing.assert_allclose(z.norm_ratio, 1.0, atol=1e-5, rtol=0)
    cosine = torch.nn.functional.cosine_similarity(new, own, dim=1).numpy()
    np.testing.assert_allclose(z.cosine, cosine, atol=1e-9, rtol=0)
    assert (cosine < 1 - 1e-4).all()  # it did move
    if max_angle is not None:
        assert (cosine >= math.cos(max_angle) - 1e-6).all()
        assert np.isclose(cosine, math.cos(max_angle), atol=1e-6).any()  # the trust region did bind
    report = z.report()
    assert set(report.data_vars) >= {"ks_pvalue", "entry_mean", "entry_std", "neighbour_correlation", "cosine"}
    assert report.sizes == {"seed": 3} and ((report["ks_pvalue"] >= 0) & (report["ks_pvalue"] <= 1)).all()


def test_same_inputs_give_bit_identical_noise(tiny_lens, oracle):
    runs = [optimise(tiny_lens, class_probability(oracle, "esophagitis"), batch_size=2, checkpoint=c)
            for c in (True, True, False)]
    for other in runs[1:]:
        assert np.array_equal(runs[0].noise, other.noise) and runs[0].after == other.after


def test_weights_get_no_gradient_and_their_state_is_put_back(tiny_lens, oracle):
    transformer = tiny_lens.pipeline.transformer
    transformer.train()
    first = next(transformer.parameters())
    first.requires_grad_(True)  # a user training it: the call must not add gradients or change the flag
    flags = {id(p): p.requires_grad for p in tiny_lens.pipeline.vae.parameters()}
    optimise(tiny_lens, class_probability(oracle, "esophagitis"), iterations=2)
    assert transformer.training and first.requires_grad
    assert all(p.grad is None for m in (transformer, tiny_lens.pipeline.vae, oracle.net) for p in m.parameters())
    assert flags == {id(p): p.requires_grad for p in tiny_lens.pipeline.vae.parameters()}
    assert not tiny_lens.pipeline.vae.training and not oracle.net.training

    def broken(images):
        raise RuntimeError("objective failed")

    with pytest.raises(RuntimeError, match="objective failed"):
        optimise(tiny_lens, broken)
    assert transformer.training and first.requires_grad and first.grad is None  # also after an error


def test_generate_starts_the_edited_branch_from_the_stored_noise(tiny_lens, oracle):
    z = optimise(tiny_lens, class_probability(oracle, "esophagitis"), seeds=(4, 1))
    image = pairs(tiny_lens, z, seeds=(1, 4))  # another order than the noise is stored in
    pipe = tiny_lens.pipeline
    for seed in (1, 4):
        latents = torch.tensor(z.noise[z.seeds.index(seed)][None])
        plain = pipe([PROMPT], generator=tiny_lens.generator(seed), num_inference_steps=T, guidance_scale=4.5,
                     latents=latents, output_type="np", **tiny_lens.pipeline_kwargs).images[0]
        np.testing.assert_allclose(image.sel(seed=seed, branch="edited").values, plain, atol=1e-5, rtol=0)
        own = pipe([PROMPT], generator=tiny_lens.generator(seed), num_inference_steps=T, guidance_scale=4.5,
                   output_type="np", **tiny_lens.pipeline_kwargs).images[0]
        np.testing.assert_allclose(image.sel(seed=seed, branch="original").values, own, atol=1e-5, rtol=0)
        assert not np.allclose(plain, own, atol=1e-3)


def test_round_trip_settings_and_save(tiny_lens, oracle, tmp_path):
    z = optimise(tiny_lens, class_probability(oracle, "esophagitis"), iterations=2)
    back = intervention_from_dict(json.loads(json.dumps(z.to_dict())))
    assert isinstance(back, OptimizedNoise) and np.array_equal(back.noise, z.noise)
    assert back.to_dict() == z.to_dict() and repr(back) == repr(z)
    settings = z.settings()
    assert "noise" not in settings and settings["noise_shape"] == [3, 4, 8, 8] and settings["grad_steps"] == T
    assert settings["objective"].startswith("class_probability('esophagitis', log=True, oracle=")
    loaded = Intervention.load(z.save(tmp_path / "noise.json"))
    assert np.array_equal(loaded.noise, z.noise) and loaded.after == z.after
    data = z.to_dict()
    data["noise"][0][0][0][0] += 1.0
    with pytest.raises(ValueError, match="does not match its digest"):
        OptimizedNoise.from_dict(data)
    with pytest.raises(ValueError, match="read-only"):
        z.noise[0, 0, 0, 0] = 0.0


@pytest.mark.parametrize("change, match", [
    ({"seeds": []}, "seeds is empty"),
    ({"iterations": -1}, "iterations must be an integer >= 0"),
    ({"iterations": 2.5}, "iterations must be an integer"),
    ({"lr": -0.1}, "lr is an angle in radians"),
    ({"lr": math.nan}, "lr is an angle in radians"),
    ({"lr": 4.0}, "lr is an angle in radians"),
    ({"max_angle": 0.0}, "max_angle is an angle in radians"),
    ({"target": math.inf}, "target must be a finite number"),
    ({"grad_steps": 5}, "grad_steps=5 is more than num_inference_steps=3"),
    ({"grad_steps": 0}, "grad_steps must be a positive integer"),
    ({"guidance_scale": 0.5}, "guidance_scale must be a finite number >= 1"),
    ({"objective": "esophagitis"}, "objective must be a callable"),
    ({"objective": lambda x: x.mean()}, r"one score per image, shape \(3,\); got \(\)"),
    ({"objective": lambda x: x.mean((1, 2, 3)).detach().numpy()}, "torch tensor with one score per image"),
    ({"objective": lambda x: x.mean((1, 2, 3)) * math.nan}, r"NaN or inf for seeds \[0, 1, 2\]"),
    ({"objective": lambda x: x.detach().mean((1, 2, 3))}, "do not depend on the images through torch"),
])
def test_bad_inputs_are_refused_with_a_fix(tiny_lens, oracle, change, match):
    settings = {"objective": class_probability(oracle, "esophagitis"), **change}
    seeds = settings.pop("seeds", (0, 1, 2))
    with pytest.raises(ValueError, match=match):
        optimise(tiny_lens, seeds=seeds, **settings)


def test_bad_uses_of_the_noise_are_refused(tiny_lens, oracle):
    with pytest.raises(ValueError, match=r"'ulcers' is not a class of the oracle; choose one of \['polyps'"):
        class_probability(oracle, "ulcers")
    with pytest.raises(ValueError, match="needs a judge with a torch module"):
        class_probability(lambda images: images, "polyps")
    z = optimise(tiny_lens, class_probability(oracle, "esophagitis"), iterations=1)
    with pytest.raises(ValueError, match=r"no optimised noise for seeds \[7\]"):
        generate(tiny_lens, PROMPT, seeds=[0, 7], edits=[z], num_inference_steps=T, progress=False)
    with pytest.raises(ValueError, match="optimised for the prompt 'a polyp'"):
        generate(tiny_lens, "the cecum", seeds=[0], edits=[z], num_inference_steps=T, progress=False)
    with pytest.raises(ValueError, match="needs the run's seeds"):
        z.apply_initial(torch.zeros(1, 4, 8, 8), EditContext(0, -1, "", ("cond",), 1, original=None))
    with pytest.raises(ValueError, match="this model starts from"):
        OptimizedNoise(PROMPT, (0,), np.zeros((1, 4, 4, 4))).check(tiny_lens, T)
    with pytest.raises(ValueError, match="one row per seed"):
        OptimizedNoise(PROMPT, (0, 1), np.zeros((1, 4, 8, 8)))
    with pytest.raises(ValueError, match="NaN or inf"):
        OptimizedNoise(PROMPT, (0,), np.full((1, 4, 8, 8), np.nan))
