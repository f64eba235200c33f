
import numpy as np
import pytest
import xarray as xr

from dit_lens.interventions.generate import generate, reprompt
from dit_lens.interventions.steer import Steer
from dit_lens.methods import (BLEND, Axis, ConceptPair, Method, MethodContext, Vectors, get, names, register,
                              unregister, window_layers)
from dit_lens.methods.axes import check_real
from dit_lens.study import Study, run_study

PAIR = ConceptPair("polyps", "normal cecum", contexts=("An image of {}", "A photo of {}"))


class BrightnessOracle:
    """A real, simple classifier: bright images read as polyps."""

    labels = ["normal cecum", "polyps"]

    def __call__(self, images):
        p = 1 / (1 + np.exp(-(images.mean(axis=(1, 2, 3)) - 0.5) * 40))
        return np.stack([1 - p, p], axis=1)


def red_segmenter(images):
    return images[..., 0] > images[..., 1] + 0.2


def _reguide(lens, pair, seeds, settings, *, context):
    """A toy method: the counterfactual is the source prompt at another guidance scale."""
    kwargs = dict(seeds=seeds, num_inference_steps=context.num_inference_steps, progress=False)
    original = generate(lens, pair.source_prompt, guidance_scale=context.guidance_scale, **kwargs)
    other = generate(lens, pair.source_prompt, guidance_scale=settings["scale"], **kwargs)
    return xr.concat([original, other], "branch").assign_coords(branch=["original", "edited"])


@pytest.fixture
def reguide():
    method = register(Method("reguide", (Axis("scale", default=(1.0,), parse=float, check=check_real, key="g",
                                              flag="scales", help="guidance of the counterfactual"),), _reguide))
    yield method
    unregister("reguide")


def test_the_registry_names_the_built_in_methods_and_refuses_unknown_ones():
    assert names()[:4] == ["medsteer", "medsteer_local", "regulate", "reprompt"]
    assert [a.name for a in get("medsteer").axes] == ["window", "steps", "alpha", "renormalize", "blend",
                                                      "vector_seeds", "where", "top", "causal_seeds"]
    assert get("reprompt").axis("blend") is BLEND is get("medsteer").axis("blend")  # one axis, one meaning
    with pytest.raises(ValueError, match="unknown method 'sdedit'; registered: \\['medsteer', 'medsteer_local', 'regulate', 'reprompt'"):
        get("sdedit")
    with pytest.raises(ValueError, match="has no setting \\['beta'\\]"):
        get("medsteer").settings({"beta": 1.0})
    with pytest.raises(ValueError, match="setting 'alpha': expected a finite number"):
        get("medsteer").settings({"alpha": float("nan")})


def test_a_method_must_share_an_axis_it_names_like_another(reguide):
    own_blend = Axis("blend", default=(0.5,), parse=float)
    with pytest.raises(ValueError, match="axis 'blend' differs from method 'medsteer'"):
        register(Method("other", (own_blend,), _reguide))
    assert "other" not in names()
    with pytest.raises(ValueError, match="already registered"):
        register(Method("reguide", (), _reguide))


def test_a_registered_method_runs_through_a_study_with_its_own_axes(tiny_lens, reguide, tmp_path):
    s = Study("toy", pairs=(PAIR,), methods={"medsteer": {"alpha": (0.0,), "vector_seeds": (2,)},
                                             "reguide": {"scale": (4.5, 1.0)}},
              eval_seeds=2, num_inference_steps=2)
    result = run_study(s, tiny_lens, oracle=BrightnessOracle(), segmenter=red_segmenter, out=tmp_path, progress=False)
    assert list(result["method"].values) == ["medsteer", "reguide"]
    assert list(result["scale"].values) == [4.5, 1.0]
    assert result["flip_rate"].dims[:2] == ("method", "pair") and "scale" in result["flip_rate"].dims
    names_ = sorted(p.name for p in (tmp_path / "cells").glob("*.json"))
    assert names_ == ["p0_w0-1_t0-1_a0_r0_n2.json", "reguide_p0_g1.json", "reguide_p0_g4.5.json"]
    psnr = result["bg_psnr"].sel({"method": "reguide"}).squeeze()
    assert float(psnr.sel(scale=4.5)) == 100.0  # the same guidance: the identical image
    assert float(psnr.sel(scale=1.0)) < 100.0
    # medsteer does not depend on the toy's axis: its cell fills it
    steered = result["bg_psnr"].sel({"method": "medsteer"}).squeeze()
    assert steered.sel(scale=4.5) == steered.sel(scale=1.0) == 100.0
    # the command line gets a flag from the new axis
    from dit_lens.study.cli import declared, parser

    assert declared(s, parser(s).parse_args(["--scales", "2", "3"])).methods["reguide"]["scale"] == (2.0, 3.0)


def test_a_study_refuses_unknown_methods_and_axes():
    with pytest.raises(ValueError, match="unknown method 'sdedit'"):
        Study("x", pairs=(PAIR,), methods={"sdedit": {}})
    with pytest.raises(ValueError, match="Study.methods\\['reprompt'\\] has no axis \\['alpha'\\]"):
        Study("x", pairs=(PAIR,), methods={"reprompt": {"alpha": (1.0,)}})
    with pytest.raises(ValueError, match="no declared method has an axis 'alpha'"):
        Study("x", pairs=(PAIR,), methods={"reprompt": {}}).with_axis("alpha", (1.0,))


def test_medsteer_equals_a_direct_steered_generate(tiny_lens):
    context = MethodContext(num_inference_steps=3, guidance_scale=4.5, batch_size=2,
                            vectors=Vectors(tiny_lens, seeds=3, num_inference_steps=3, guidance_scale=4.5))
    settings = {"window": (0.0, 0.5), "alpha": 3.0, "blend": 0.3, "vector_seeds": 2}
    out = get("medsteer").run(tiny_lens, PAIR, [5, 6, 7], settings, context=context)
    from dit_lens.readouts.vectors import concept_vector
    from dit_lens.trace.capture import capture

    pos, neg = (capture(tiny_lens, prompts, seeds=[0, 1, 2], num_inference_steps=3, batch_size=8)
                for prompts in (PAIR.positive(), PAIR.negative()))
    steer = Steer(concept_vector(pos.isel(seed=slice(0, 2)), neg.isel(seed=slice(0, 2))), alpha=3.0,
                  layers=window_layers((0.0, 0.5), tiny_lens.num_layers))
    direct = generate(tiny_lens, "An image of polyps", seeds=[5, 6, 7], steer=steer, num_inference_steps=3,
                      blend=0.3, batch_size=2, progress=False)
    np.testing.assert_array_equal(out["image"].values, direct["image"].values)
    assert not np.array_equal(out["image"].sel(branch="edited"), out["image"].sel(branch="original"))
    with pytest.raises(ValueError, match="medsteer needs concept vectors"):
        get("medsteer").run(tiny_lens, PAIR, [5], {}, context=MethodContext(num_inference_steps=3))


def test_reprompt_equals_the_reprompt_function(tiny_lens):
    context = MethodContext(num_inference_steps=3, guidance_scale=4.5, batch_size=2)
    out = get("reprompt").run(tiny_lens, PAIR, [5, 6, 7], {"blend": 0.2}, context=context)
    direct = reprompt(tiny_lens, "An image of polyps", "An image of normal cecum", seeds=[5, 6, 7], blend=0.2,
                      num_inference_steps=3, batch_size=2, progress=False)
    np.testing.assert_array_equal(out["image"].values, direct["image"].values)
    assert list(out["branch"].values) == ["original", "edited"]


def test_localised_medsteer_steers_inside_the_segmented_lesion_and_keeps_the_rest(tiny_lens):
    from dit_lens.interventions.region import Confine
    from dit_lens.methods.local import grow_masks

    context = MethodContext(num_inference_steps=3, guidance_scale=4.5, batch_size=2, segmenter=red_segmenter,
                            vectors=Vectors(tiny_lens, seeds=3, num_inference_steps=3, guidance_scale=4.5))
    settings = {"window": (0.0, 1.0), "steps": (0.0, 1.0), "alpha": 3.0, "vector_seeds": 2, "region": "lesion",
                "grow": 1, "confine": 1.0}
    out = get("medsteer_local").run(tiny_lens, PAIR, [5, 6], settings, context=context)
    plain = generate(tiny_lens, "An image of polyps", seeds=[5, 6], num_inference_steps=3, progress=False)
    masks = grow_masks(red_segmenter(plain["image"].sel(branch="original").isel(prompt=0).values), 1)
    found = masks.reshape(2, -1).any(1)
    assert found.all() and not masks.all()  # a region smaller than the image for each seed
    masks[~found] = True
    np.testing.assert_array_equal(out["region"].isel(prompt=0).values, masks)
    region = xr.DataArray(masks, dims=("seed", "y", "x"), coords={"seed": [5, 6]})
    from dit_lens.methods.medsteer import medsteer_steer

    base = medsteer_steer(tiny_lens, PAIR, {**settings, "renormalize": False}, context)
    direct = generate(tiny_lens, "An image of polyps", seeds=[5, 6], num_inference_steps=3, batch_size=2,
                      steer=Steer(base.vector, alpha=3.0, layers=base.layers, steps=base.steps, name=base.name,
                                  region=region), edits=[Confine(region)], progress=False)
    np.testing.assert_array_equal(out["image"].values, direct["image"].values)
    # steer_in="image": every token steered, the latents still confined to the region
    everywhere = get("medsteer_local").run(tiny_lens, PAIR, [5, 6], {**settings, "steer_in": "image"}, context=context)
    direct = generate(tiny_lens, "An image of polyps", seeds=[5, 6], num_inference_steps=3, batch_size=2,
                      steer=base, edits=[Confine(region)], progress=False)
    np.testing.assert_array_equal(everywhere["image"].values, direct["image"].values)
    assert not np.array_equal(everywhere["image"].values, out["image"].values)
    with pytest.raises(ValueError, match="expected one of \\['region', 'image'\\]"):
        get("medsteer_local").settings({"steer_in": "outside"})
    assert out.attrs["unlocalised_seeds"] == [s for s, f in zip([5, 6], found) if not f]
    with pytest.raises(ValueError, match="needs a lesion segmenter"):
        get("medsteer_local").run(tiny_lens, PAIR, [5], settings, context=MethodContext(
            num_inference_steps=3, vectors=context.vectors))


def test_regulate_inserts_with_each_seed_s_own_region_and_none_is_plain_reprompting(tiny_lens):
    from dit_lens.methods.insert import placed_region

    context = MethodContext(num_inference_steps=3, guidance_scale=4.5, batch_size=2)
    plain = get("regulate").run(tiny_lens, PAIR, [5, 6], {"modules": "none"}, context=context)
    direct = reprompt(tiny_lens, "An image of polyps", "An image of normal cecum", seeds=[5, 6],
                      num_inference_steps=3, batch_size=2, progress=False)
    np.testing.assert_array_equal(plain["image"].values, direct["image"].values)
    for place in ("box", "blob"):
        region = plain if place == "box" else get("regulate").run(tiny_lens, PAIR, [5, 6], {"modules": "none",
                                                                                           "place": place}, context=context)
        for seed in (5, 6):
            np.testing.assert_array_equal(region["region"].sel(seed=seed).isel(prompt=0).values,
                                          placed_region(seed, place, (16, 16)))
    out = get("regulate").run(tiny_lens, PAIR, [5, 6], {"modules": "default"}, context=context)
    np.testing.assert_array_equal(out["image"].sel(branch="original").values,
                                  plain["image"].sel(branch="original").values)
    assert not np.allclose(out["image"].sel(branch="edited").values, plain["image"].sel(branch="edited").values)
    with pytest.raises(ValueError, match="expected one of"):
        get("regulate").run(tiny_lens, PAIR, [5], {"modules": "everything"}, context=context)
