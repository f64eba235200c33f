"""The intervention protocol: values that round-trip, edits at any site, halves, rows, custom edits."""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from dit_lens.interventions.base import Intervention, SiteEdit, from_dict
from dit_lens.interventions.reweight import Reweight
from dit_lens.interventions.blend import Blend
from dit_lens.interventions.generate import generate
from dit_lens.interventions.steer import Steer, steer_tokens
from reference import plain_call
from test_steer import unit_vector

T = 3


def at_site(site, seed=0):
    vec = unit_vector(T, 3, 16, seed=seed)
    vec.attrs["site"] = site
    return vec


def test_every_intervention_round_trips_through_json(tmp_path):
    for k, edit in enumerate( (Steer(at_site("ff"), alpha=1.5, layers=[1], halves="cond", name="x"), Blend(0.25),
                 Reweight(tokens=[3, 1], scale=0.5, layers=[0, 2], steps=[1]))):
        data = json.loads(json.dumps(edit.to_dict()))
        back = from_dict(data)
        assert type(back) is type(edit) and back.settings() == edit.settings()
        path = edit.save(tmp_path / f"{k}.json")
        assert Intervention.load(path).settings() == type(edit).load(path).settings() == edit.settings()
        with pytest.raises(FileExistsError):
            edit.save(path)
    with pytest.raises(ValueError, match="holds a Blend, not a Steer"):
        Steer.load(tmp_path / "1.json")
    with pytest.raises(ValueError, match="unknown intervention type 'Nope'"):
        from_dict({"type": "Nope"})


def test_a_steer_edits_the_site_its_vector_was_captured_at():
    assert Steer(at_site("ff")).site == "ff"
    assert Steer(unit_vector(T, 3, 16)).site == "attn2"  # vectors that do not say: cross-attention
    with pytest.raises(ValueError, match="captured at site 'ff' but Steer.site is 'attn2'"):
        Steer(at_site("ff"), site="attn2")
    with pytest.raises(ValueError, match="halves must be one of"):
        Steer(at_site("ff"), halves="middle")


def raw_edit_call(lens, prompt, seed, site, layers, fn):
    """The plain call with raw forward hooks replacing `site`'s output: fn(step, layer, out) -> out."""
    state = {"t": -1}
    handles = [lens.pipeline.transformer.register_forward_pre_hook(lambda m, a: state.__setitem__("t", state["t"] + 1))]
    for layer in layers:
        module = getattr(lens.blocks[layer], site)
        handles.append(module.register_forward_hook(lambda m, a, out, layer=layer: fn(state["t"], layer, out)))
    try:
        return plain_call(lens, prompt, seed, T, 4.5)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("site, alpha", [("ff", 2.0), ("attn1", 400.0)])  # attn1 outputs are small here
def test_steering_another_site_matches_a_raw_hook(tiny_lens, site, alpha):
    steer = Steer(at_site(site), alpha=alpha, layers=[0, 2])
    out = generate(tiny_lens, "a polyp", seeds=[1], edits=[steer], num_inference_steps=T, progress=False)

    def fn(step, layer, h):
        v = torch.from_numpy(np.ascontiguousarray(steer.vector.values[step, layer]))
        return steer_tokens(h, v, alpha)[0]

    reference = raw_edit_call(tiny_lens, "a polyp", 1, site, [0, 2], fn)
    got = out["image"].sel(branch="edited").values[0, 0]
    np.testing.assert_allclose(got, reference, atol=1e-4)
    assert np.abs(got - out["image"].sel(branch="original").values[0, 0]).max() > 1e-3


def test_halves_choose_the_guidance_rows(tiny_lens):
    steer = Steer(unit_vector(T, 3, 16, seed=0), alpha=3.0, layers=[1, 2], halves="cond")
    out = generate(tiny_lens, "a polyp", seeds=[4], steer=steer, num_inference_steps=T, progress=False)

    def fn(step, layer, h):  # plain call: rows [uncond, cond]
        v = torch.from_numpy(np.ascontiguousarray(steer.vector.values[step, layer]))
        new = h.clone()
        new[1:] = steer_tokens(h[1:], v, 3.0)[0]
        return new

    reference = raw_edit_call(tiny_lens, "a polyp", 4, "attn2", [1, 2], fn)
    np.testing.assert_allclose(out["image"].sel(branch="edited").values[0, 0], reference, atol=1e-4)
    both = generate(tiny_lens, "a polyp", seeds=[4], steer=Steer(steer.vector, alpha=3.0, layers=[1, 2]),
                    num_inference_steps=T, progress=False)
    assert np.abs(both["image"].values - out["image"].values).max() > 1e-4


@dataclass(frozen=True)
class Restore(SiteEdit):
    """Puts back the original branch's output: undoes every earlier edit at its site."""

    site: str = "attn2"
    halves: str = "both"
    layers: tuple = (1, 2)

    def edit_layers(self, lens):
        return list(self.layers)

    def edit_steps(self, num_inference_steps):
        return list(range(num_inference_steps))

    def apply(self, h, ctx):
        return ctx.original(), None


def test_a_custom_edit_sees_the_original_rows(tiny_lens):
    steer = Steer(unit_vector(T, 3, 16, seed=0), alpha=3.0, layers=[1, 2])
    steered = generate(tiny_lens, ["a polyp", "b"], seeds=[0, 2], edits=[steer], num_inference_steps=T,
                       progress=False)["image"]
    assert np.abs(steered.sel(branch="edited").values - steered.sel(branch="original").values).max() > 1e-3
    undone = generate(tiny_lens, ["a polyp", "b"], seeds=[0, 2], edits=[steer, Restore()], num_inference_steps=T,
                      progress=False)["image"]
    np.testing.assert_array_equal(undone.sel(branch="edited").values, undone.sel(branch="original").values)
    partly = generate(tiny_lens, ["a polyp"], seeds=[0], edits=[steer, Restore(layers=(2,))], num_inference_steps=T,
                      progress=False)["image"]
    assert np.abs(partly.sel(branch="edited").values - partly.sel(branch="original").values).max() > 1e-4


def test_identity_edits_are_bit_identical_and_bad_edits_refused(tiny_lens):
    out = generate(tiny_lens, "a polyp", seeds=[0, 1], edits=[Reweight(tokens=[2], scale=1.0)],
                   num_inference_steps=T, progress=False)
    np.testing.assert_array_equal(out["image"].sel(branch="edited").values, out["image"].sel(branch="original").values)
    assert out.attrs["edits"][0]["type"] == "Reweight"
    changed = generate(tiny_lens, "a polyp", seeds=[0], edits=[Reweight(tokens=[2, 3], scale=0.0, layers=[1])],
                       num_inference_steps=T, progress=False)
    assert np.abs(changed["image"].sel(branch="edited").values - changed["image"].sel(branch="original").values).max() > 1e-4
    with pytest.raises(TypeError, match="edits= takes interventions"):
        generate(tiny_lens, "a polyp", seeds=[0], edits=["polyp"], progress=False)
    with pytest.raises(ValueError, match="blend needs a steer"):
        generate(tiny_lens, "a polyp", seeds=[0], edits=[Blend(0.3)], progress=False)
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist"):
        generate(tiny_lens, "a polyp", seeds=[0], edits=[Reweight(tokens=[1], scale=2.0, layers=[5])], progress=False)
    with pytest.raises(ValueError, match="steps .* go beyond"):
        generate(tiny_lens, "a polyp", seeds=[0], edits=[Reweight(tokens=[1], scale=2.0, steps=[T])],
                 num_inference_steps=T, progress=False)
    with pytest.raises(ValueError, match="attention-weights site"):
        Reweight(site="attn2", tokens=[1])
