"""`At`: one frozen place (site, layers, steps, halves), validated once, resolved against a lens; every site
intervention's place is one."""

import dataclasses

import numpy as np
import pytest
import xarray as xr

from dit_lens.interventions.inject import Inject
from dit_lens.interventions.regulate import GateSelfAttention, RegionMix, RegionReweight
from dit_lens.interventions.reweight import Reweight
from dit_lens.interventions.steer import Steer
from dit_lens.model.where import At, Where

T = 3


def vector(layers=3, channels=16):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(T, layers, channels)).astype(np.float32)
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    return xr.DataArray(v, dims=("step", "layer", "channel"), coords={"step": range(T), "layer": range(layers)})


@pytest.mark.parametrize("kwargs, message", [
    (dict(site=""), r"At.site must be a site name such as 'attn2', got ''"),
    (dict(site=3), r"At.site must be a site name"),
    (dict(site="attn2", layers=[]), r"At.layers must be a non-empty list of integers or None \(all\), got \[\]"),
    (dict(site="attn2", layers=["0"]), r"At.layers must be a non-empty list of integers"),
    (dict(site="attn2", layers=True), r"At.layers must be a non-empty list of integers"),
    (dict(site="attn2", layers=[0, -1]), r"At.layers must be >= 0, got \[0, -1\]"),
    (dict(site="attn2", steps=[1.5]), r"At.steps must be a non-empty list of integers"),
    (dict(site="attn2", steps=-2), r"At.steps must be >= 0, got \[-2\]"),
    (dict(site="attn2", halves="half"), r"At.halves must be one of \['both', 'cond', 'uncond'\], got 'half'"),
])
def test_at_refuses_bad_fields_in_one_wording(kwargs, message):
    with pytest.raises(ValueError, match=message):
        At(**kwargs)


def test_at_is_a_normalised_frozen_hashable_value():
    at = At("attn2", layers=[2, 0, 2], steps=1)
    assert at == At("attn2", layers=(0, 2), steps=(1,)) and hash(at) == hash(At("attn2", (0, 2), (1,)))
    assert (at.layers, at.steps, at.halves) == ((0, 2), (1,), "both")
    assert len({at, At("attn2", (0, 2), (1,)), At("attn2", (0, 2), (1,), "cond")}) == 2
    assert At("attn2", steps=()).steps == ()  # nowhere in time
    with pytest.raises(dataclasses.FrozenInstanceError):
        at.site = "ff"


def test_at_resolves_against_a_pixart_lens(tiny_lens):
    assert At("attn2").resolve(tiny_lens, T) == Where("attn2", (0, 1, 2), (0, 1, 2), "both")
    assert At("attn1.weights", layers=1, steps=[2, 0], halves="cond").resolve(tiny_lens, T) == \
        Where("attn1.weights", (1,), (0, 2), "cond")
    with pytest.raises(ValueError, match=r"At: unknown site 'attn3' for PixArtTransformer2DModel; choose one of"):
        At("attn3").resolve(tiny_lens, T)
    with pytest.raises(ValueError, match=r"At.layers \[3, 7\] do not exist: the model has 3 blocks; pass indices in "
                                         r"0..2, or None for all"):
        At("ff", layers=[0, 3, 7]).resolve(tiny_lens, T)
    with pytest.raises(ValueError, match=r"At.steps \[1, 3\] go beyond the run's 3 steps"):
        At("ff", steps=[1, 3]).resolve(tiny_lens, T)
    with pytest.raises(ValueError, match=r"Reweight.steps \[3\] go beyond"):
        At("ff", steps=3).resolve(tiny_lens, T, name="Reweight")


@pytest.fixture(scope="module")
def flux():
    from dit_lens import load
    from dit_lens.testing import FluxSpec, build_flux

    return load(build_flux(FluxSpec(num_layers=2, num_single_layers=2), seed=0))


def test_at_resolves_flux_sites_by_the_block_list_that_has_them(flux):
    assert At("ff").resolve(flux, T).layers == (0, 1)  # only the double-stream blocks have ff
    assert At("attn2").resolve(flux, T).layers == (0, 1, 2, 3)
    with pytest.raises(ValueError, match=r"block 3 of Flux is one of its single_transformer_blocks, whose sites are"):
        At("ff", layers=[1, 3]).resolve(flux, T)
    # a site edit on Flux takes the same blocks and refuses the same misplacement
    assert Inject(site="ff").edit_layers(flux) == [0, 1]
    with pytest.raises(ValueError, match=r"block 3 of Flux is one of its single_transformer_blocks"):
        Inject(site="ff", layers=[3]).check(flux, T)


def site_edits():
    grid = np.zeros((4, 4), bool)
    grid[:2, :2] = True
    return [
        Reweight(tokens=(1,), scale=2.0, layers=(0, 2), steps=(1,), halves="cond"),
        Reweight(tokens=(1,), scale=2.0),
        Inject(site="attn1", layers=1, steps=(0, 2)),
        Inject(site="block", steps=()),
        Steer(vector(), alpha=2.0, layers=[0, 2], steps=[1]),
        Steer(vector(), alpha=2.0, cells=[(2, 1), (0, 1)]),
        Steer(vector(layers=2), alpha=2.0),
        RegionReweight(["polyp"], grid, layers=(1,)),
        RegionMix(grid, contrast=1.0),
        GateSelfAttention(grid, layers=(0, 1)),
    ]


def test_every_site_edit_runs_where_its_at_resolves(tiny_lens):
    for edit in site_edits():
        edit.check(tiny_lens, T)
        where = edit.at.resolve(tiny_lens, T)
        assert isinstance(edit.at, At) and (where.site, where.halves) == (edit.site, edit.halves), edit
        assert edit.edit_layers(tiny_lens) == list(where.layers), edit
        if "steps" in {f.name for f in dataclasses.fields(edit)}:  # the others pick steps by a window of the run
            assert edit.edit_steps(T) == list(where.steps), edit


def test_site_edits_name_themselves_when_their_place_does_not_fit(tiny_lens):
    with pytest.raises(ValueError, match=r"Reweight.layers \[5\] do not exist: the model has 3 blocks"):
        Reweight(tokens=(1,), scale=2.0, layers=(5,)).check(tiny_lens, T)
    with pytest.raises(ValueError, match=r"Inject: unknown site 'attn3' for PixArtTransformer2DModel"):
        Inject(site="attn3").check(tiny_lens, T)
    with pytest.raises(ValueError, match=r"GateSelfAttention.layers \[4\] do not exist"):
        GateSelfAttention(np.ones((4, 4), bool), layers=(4,)).check(tiny_lens, T)
    with pytest.raises(ValueError, match=r"Steer.steps \[5\] go beyond the run's 3 steps"):
        Steer(vector(), alpha=2.0, steps=[5]).check(tiny_lens, T)


def test_hooks_are_placed_by_the_same_checks(tiny_lens):
    from dit_lens.trace.runner import Hook, traced_generate

    def run(hook):
        traced_generate(tiny_lens, ["a"], [0], num_inference_steps=2, guidance_scale=4.5, hooks=[hook])

    with pytest.raises(ValueError, match=r"Hook.layers \[7\] do not exist: the model has 3 blocks; pass indices in 0..2"):
        run(Hook("attn2", (0, 7), lambda *args: None))
    with pytest.raises(ValueError, match=r"Hook: unknown site 'attn3' for PixArtTransformer2DModel"):
        run(Hook("attn3", (0,), lambda *args: None))
