"""FeatureEdit: scale 1 is the plain run bit for bit; an ablation is exactly h + (s − 1)·z_f·W_dec[f] recomputed
with raw torch hooks; saved values rebuild from the SAE's folder and digest; bad input is refused."""

import numpy as np
import pytest
import torch

from dit_lens import load
from dit_lens.interventions.base import Intervention, from_dict
from dit_lens.interventions.feature import FeatureEdit
from dit_lens.interventions.generate import generate
from dit_lens.model.where import At
from dit_lens.testing import build_pixart
from test_features import SPEC, reference_codes, sae, world  # noqa: F401  (fixtures)


def busiest_feature(sae, lens, layer):
    """The feature with the largest activation at `layer` on a run of seed 30 (so that an edit of it shows)."""
    from dit_lens.features import sae_features

    maps = sae_features(sae, lens, ["a polyp"], seeds=[30], num_inference_steps=3, layers=[layer], progress=False)
    return int(np.argmax(maps.activation.max(("prompt", "seed", "step", "layer", "row", "col")).values))


def test_scale_one_is_bit_identical_to_the_plain_run(world, sae):
    lens, _, _ = world
    plain = generate(lens, ["a polyp"], seeds=[30, 31], num_inference_steps=3, progress=False)
    edited = generate(lens, ["a polyp"], seeds=[30, 31], num_inference_steps=3, progress=False,
                      edits=FeatureEdit(sae, features=list(range(sae.num_features)), scale=1.0))
    for branch in ("original", "edited"):
        assert torch.equal(torch.from_numpy(edited.image.sel(branch=branch).values),
                           torch.from_numpy(plain.image.sel(branch="original").values))
    h = torch.randn(2, 16, lens.width)
    assert torch.equal(FeatureEdit(sae, features=[0, 5], scale=1.0).apply(h, None)[0], h)


@pytest.mark.parametrize("mode, scale", [("ablate", 0.0), ("scale", 3.0), ("clamp", 2.0), ("splice", 0.0)])
def test_an_edit_is_the_raw_hook_recomputation(world, sae, mode, scale):
    lens, _, _ = world
    f = busiest_feature(sae, lens, 1)
    edit = FeatureEdit(sae, features=() if mode == "splice" else [f], mode=mode, scale=scale,
                       at=At("attn2", [1], steps=[0, 1]))
    out = generate(lens, ["a polyp"], seeds=[30], num_inference_steps=3, edits=edit, progress=False)
    w = sae.W_dec[f].double().numpy()
    state = {"t": -1}
    pipe = lens.pipeline

    def hook(module, args, output):
        if state["t"] not in (0, 1):
            return output
        h = output.detach().double().numpy()  # (rows, tokens, C), both guidance halves
        if mode == "splice":  # x̂ = z W_dec + b_dec from the codes by hand, every feature
            w_all, b_dec = sae.W_dec.double().numpy(), sae.coder.b_dec.detach().double().numpy()
            return torch.from_numpy(np.stack([reference_codes(sae, row) @ w_all + b_dec for row in h])).to(output.dtype)
        z = np.stack([reference_codes(sae, row)[:, f] for row in h])  # (rows, tokens)
        c = {"ablate": -z, "scale": (scale - 1.0) * z, "clamp": scale - z}[mode]
        return torch.from_numpy(h + c[..., None] * w).to(output.dtype)

    handles = [pipe.transformer.register_forward_pre_hook(lambda m, a: state.__setitem__("t", state["t"] + 1)),
               pipe.transformer.transformer_blocks[1].attn2.register_forward_hook(hook)]
    try:
        image = pipe("a polyp", generator=lens.generator(30), num_inference_steps=3, guidance_scale=4.5,
                     output_type="np", **lens.pipeline_kwargs).images[0]
    finally:
        for h in handles:
            h.remove()
    edited, original = out.image.sel(branch="edited").values[0, 0], out.image.sel(branch="original").values[0, 0]
    assert np.abs(edited - original).max() > 1e-3  # the edit shows, so agreement below means something
    np.testing.assert_allclose(edited, image, atol=1e-4)


def test_a_saved_edit_rebuilds_from_the_sae_folder_and_digest(world, sae, tmp_path):
    edit = FeatureEdit(sae, features=[2, 1], mode="clamp", scale=0.5, at=At("attn2", [0, 2], steps=[1], halves="cond"))
    back = from_dict(edit.to_dict())
    assert back == edit and back.features == (1, 2) and back.at == edit.at and back.sae.digest == sae.digest
    assert Intervention.load(edit.save(tmp_path / "edit.json")) == edit
    data = edit.to_dict()
    data["sae"] = {**data["sae"], "digest": "blake2b:0"}
    with pytest.raises(ValueError, match="is not the one this FeatureEdit was made with"):
        from_dict(data)
    unsaved = type(sae)(sae.coder, sae.site, sae.layers, sae.steps, sae.model_fingerprint)
    with pytest.raises(ValueError, match="save it first"):
        FeatureEdit(unsaved, features=1).to_dict()


def test_bad_edits_are_refused(world, sae):
    lens, _, _ = world
    with pytest.raises(ValueError, match=r"FeatureEdit.features \[32\] out of range: this SAE has 32 features"):
        FeatureEdit(sae, features=[1, 32])
    with pytest.raises(ValueError, match="mode must be one of"):
        FeatureEdit(sae, features=1, mode="boost")
    with pytest.raises(ValueError, match="mode='splice'.*pass no features"):
        FeatureEdit(sae, features=[1], mode="splice")
    with pytest.raises(ValueError, match="trained on 'attn2'"):
        FeatureEdit(sae, features=1, at=At("attn1"))
    small = FeatureEdit(type(sae)(sae.coder, sae.site, (0,), sae.steps, sae.model_fingerprint), features=1)
    with pytest.raises(ValueError, match=r"layers \[1\] are not blocks the SAE was trained on"):
        FeatureEdit(small.sae, features=1, at=At("attn2", [1]))
    other = load(build_pixart(SPEC, seed=1))
    with pytest.raises(ValueError, match="trained on the model with fingerprint"):
        generate(other, ["a polyp"], seeds=[0], num_inference_steps=2, edits=FeatureEdit(sae, features=1),
                 progress=False)


def test_sae_steer_picks_the_features_the_source_turns_on_and_scale_one_is_the_plain_run(tmp_path):
    import xarray as xr

    from dit_lens.methods import MethodContext, get
    from dit_lens.methods.pair import ConceptPair
    from dit_lens.methods.sae_steer import sae_feature_edit

    lens = load(build_pixart(SPEC, seed=0))
    pair = ConceptPair("polyp", "normal mucosa", contexts=("a {}",))
    context = MethodContext(num_inference_steps=2, batch_size=4)
    settings = get("sae_steer").settings({"window": (0.5, 1.0), "sae_features": 2, "sae_scale": 1.0, "sae_k": 4,
                                          "vector_seeds": 3})
    edit, record = sae_feature_edit(lens, pair, settings, context)
    sae = edit.sae
    assert sae.layers == (2,) and edit.at.layers == (2,) and sae.k == 4
    store = xr.open_zarr(sae.store["path"])["attn2"]
    means = {p: reference_codes(sae, store.sel(prompt=p).values.reshape(-1, lens.width)).mean(0)
             for p in ("a polyp", "a normal mucosa")}
    difference = means["a polyp"] - means["a normal mucosa"]
    assert record["features"] == np.argsort(-difference)[:2].tolist()
    np.testing.assert_allclose(record["difference"], np.sort(difference)[::-1][:2], rtol=1e-3, atol=1e-6)
    out = get("sae_steer").run(lens, pair, [40], settings, context=context)
    np.testing.assert_array_equal(out.image.sel(branch="edited").values, out.image.sel(branch="original").values)
    assert out.attrs["sae"]
