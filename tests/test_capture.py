"""capture() against a hand-written raw-hook capture, plus resume, caching, memory and errors."""

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import children
from dit_lens import load
from dit_lens.testing import PixArtSpec, build_pixart
from dit_lens.trace.capture import CaptureSettings, capture
from dit_lens.trace.store import CaptureStore, CaptureStoreError

REPO = Path(__file__).resolve().parent.parent
STEPS = 3
# Modules of one block, written out by hand (independent of dit_lens.model.sites).
RAW_SITES = {
    "attn1": lambda block: block.attn1,
    "attn2": lambda block: block.attn2,
    "ff": lambda block: block.ff,
    "block": lambda block: block,
}




def raw_capture(pipeline, site, prompt, seed, steps=STEPS, guidance_scale=4.5):
    """The plain call with torch forward hooks: ((step, layer, rows, tokens, C), timesteps)."""
    blocks = pipeline.transformer.transformer_blocks
    outputs = {layer: [] for layer in range(len(blocks))}
    timesteps = []
    hooks = [
        pipeline.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: timesteps.append(float(kwargs["timestep"][0])),
            with_kwargs=True,
        )
    ]
    for layer, block in enumerate(blocks):
        hooks.append(
            RAW_SITES[site](block).register_forward_hook(
                lambda module, args, out, layer=layer: outputs[layer].append(out.detach().clone())
            )
        )
    try:
        side = pipeline.transformer.config.sample_size * pipeline.vae_scale_factor
        pipeline(
            prompt,
            generator=torch.Generator("cpu").manual_seed(seed),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            output_type="np",
            height=side,
            width=side,
            use_resolution_binning=False,
            clean_caption=False,
        )
    finally:
        for hook in hooks:
            hook.remove()
    per_layer = [torch.stack(outputs[layer]) for layer in sorted(outputs)]  # (step, rows, N, C)
    return torch.stack(per_layer, dim=1).numpy(), np.array(timesteps)


def expected(raw, branch, reduce):
    """Reduce a raw (step, layer, 2, tokens, C) capture the way capture() promises to."""
    uncond, cond = raw[:, :, 0], raw[:, :, 1]
    values = {"cond": cond, "uncond": uncond, "both": np.stack([cond, uncond], axis=2)}[branch]
    return values.mean(axis=-2) if reduce == "mean" else values


def assert_close(got, want, rtol=1e-3):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    scale = np.abs(want).max()
    assert scale > 0
    assert np.abs(got - want).max() <= rtol * scale, np.abs(got - want).max() / scale


def count_calls(lens):
    calls = []
    handle = lens.denoiser.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def test_mean_attn2_matches_raw_hooks(tiny_lens, tiny_pipeline, tmp_path):
    prompts, seeds = ["a polyp", "normal mucosa"], [0, 5]
    ds = capture(tiny_lens, prompts, seeds=seeds, num_inference_steps=STEPS,
                 store=tmp_path / "s.zarr")
    var = ds["attn2"]
    assert var.dims == ("prompt", "seed", "step", "layer", "channel")
    assert var.shape == (2, 2, STEPS, 3, 16)
    assert ds.prompt.values.tolist() == prompts and ds.seed.values.tolist() == seeds
    assert ds.step.values.tolist() == list(range(STEPS)) and ds.layer.values.tolist() == [0, 1, 2]
    for prompt in prompts:
        for seed in seeds:
            raw, timesteps = raw_capture(tiny_pipeline, "attn2", prompt, seed)
            assert_close(var.sel(prompt=prompt, seed=seed).values, expected(raw, "cond", "mean"))
            np.testing.assert_array_equal(ds.timestep.values, timesteps)
    # the capture is the generation, not a different one: same values per seed differ
    assert not np.allclose(var.isel(seed=0).values, var.isel(seed=1).values)


@pytest.mark.parametrize(
    "site, branch, reduce, sigma",
    [
        ("attn2", "uncond", "mean", False),
        ("attn2", "both", "mean", False),
        ("attn2", "cond", None, False),
        ("attn2", "both", None, False),
        ("attn1", "cond", "mean", False),
        ("ff", "uncond", None, False),
        ("block", "both", "mean", False),
        ("attn2", "cond", "mean", True),
        ("attn2", "both", None, True),
    ],
)
def test_sites_branches_reductions_match_raw_hooks(
    site, branch, reduce, sigma, tiny_spec, tmp_path
):
    pipeline = build_pixart(PixArtSpec(**{**tiny_spec.to_dict(), "sigma": sigma}), seed=1)
    lens = load(pipeline)
    ds = capture(lens, ["a dyed polyp"], seeds=[3], num_inference_steps=STEPS, site=site,
                 branch=branch, reduce=reduce, store=tmp_path / "s.zarr")
    var = ds[site]
    dims = ["prompt", "seed", "step", "layer"] + ["branch"] * (branch == "both")
    dims += ["token"] * (reduce is None) + ["channel"]
    assert var.dims == tuple(dims)
    if branch == "both":
        assert ds.branch.values.tolist() == ["cond", "uncond"]
    if reduce is None:
        assert ds.attrs["token_grid"] == [4, 4] and ds.sizes["token"] == 16
    raw, _ = raw_capture(pipeline, site, "a dyed polyp", 3)
    assert_close(var.isel(prompt=0, seed=0).values, expected(raw, branch, reduce))


def test_batching_matches_single_runs(tiny_lens, tiny_pipeline, tmp_path):
    prompts, seeds = ["a polyp", "an endoscopic image of a dyed lifted polyp"], [0, 1]
    calls, handle = count_calls(tiny_lens)
    try:
        ds = capture(tiny_lens, prompts, seeds=seeds, num_inference_steps=STEPS, branch="both",
                     batch_size=3, store=tmp_path / "b.zarr")
    finally:
        handle.remove()
    assert len(calls) == 2 * STEPS  # batches of 3 + 1 cells
    for prompt in prompts:
        for seed in seeds:
            raw, _ = raw_capture(tiny_pipeline, "attn2", prompt, seed)
            got = ds.attn2.sel(prompt=prompt, seed=seed).values
            assert_close(got, expected(raw, "both", "mean"))


def test_layer_subset_is_labelled(tiny_lens, tiny_pipeline, tmp_path):
    ds = capture(tiny_lens, ["a polyp"], seeds=[0], num_inference_steps=STEPS, layers=[2, 0],
                 store=tmp_path / "l.zarr")
    assert ds.layer.values.tolist() == [0, 2]
    raw, _ = raw_capture(tiny_pipeline, "attn2", "a polyp", 0)
    assert_close(ds.attn2.sel(layer=2).values[0, 0], expected(raw, "cond", "mean")[:, 2])


def test_repeated_capture_is_served_from_the_default_store(tiny_lens, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path / "cache"))
    args = dict(seeds=[0, 1], num_inference_steps=STEPS)
    calls, handle = count_calls(tiny_lens)
    try:
        first = capture(tiny_lens, ["a polyp"], **args).load()
        assert len(calls) == STEPS  # both seeds in one batched call
        again = capture(tiny_lens, ["a polyp"], **args).load()
        assert len(calls) == STEPS  # no transformer call the second time
        other = capture(tiny_lens, ["a polyp"], **{**args, "num_inference_steps": 2})
        assert len(calls) == STEPS + 2  # other settings: another entry, computed
    finally:
        handle.remove()
    xr.testing.assert_identical(first, again)
    entries = sorted((tmp_path / "cache" / "captures").glob("*.zarr"))
    assert len(entries) == 2
    opened = xr.open_zarr(entries[0])  # plain xarray opens the store
    assert opened.attrs["model_fingerprint"] == tiny_lens.fingerprint
    assert opened.attrs["capture_num_inference_steps"] in (2, STEPS)
    assert opened.attrs["capture_key"] == entries[0].stem
    assert other.sizes["step"] == 2


CHILD = """
import sys
from dit_lens import load
from dit_lens.testing import PixArtSpec, build_pixart
from dit_lens.trace.capture import capture
lens = load(build_pixart(PixArtSpec(**{spec}), seed=0))
capture(lens, {prompts}, seeds={seeds}, num_inference_steps={steps}, store=sys.argv[1], batch_size=1)
"""


def test_killed_capture_resumes_with_only_missing_cells(tiny_lens, tiny_spec, tmp_path):
    prompts, seeds, steps = ["a polyp", "normal mucosa"], list(range(16)), 8
    store = tmp_path / "killed.zarr"
    script = tmp_path / "child.py"
    script.write_text(
        CHILD.format(spec=tiny_spec.to_dict(), prompts=prompts, seeds=seeds, steps=steps)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    child = children.start(script, str(store), env=env)  # a process of its own, forked from a warm interpreter
    done = 0
    try:
        deadline = time.monotonic() + 120
        while done < 1 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.01)
            if (store / "done" / "0.0").exists():
                done = int(zarr.open_group(str(store), mode="r")["done"][...].sum())
    finally:
        child.kill()
        _, err = child.communicate()
    assert child.returncode == -signal.SIGKILL, err[-2000:]
    finished = int(zarr.open_group(str(store), mode="r")["done"][...].sum())
    assert 1 <= finished < len(prompts) * len(seeds), "the child was not killed mid-capture"

    calls, handle = count_calls(tiny_lens)
    try:
        resumed = capture(tiny_lens, prompts, seeds=seeds, num_inference_steps=steps, store=store, batch_size=1)
    finally:
        handle.remove()
    assert len(calls) == (len(prompts) * len(seeds) - finished) * steps
    whole = capture(tiny_lens, prompts, seeds=seeds, num_inference_steps=steps,
                    store=tmp_path / "whole.zarr", batch_size=1)
    np.testing.assert_array_equal(resumed.attn2.values, whole.attn2.values)


def test_error_inside_capture_unhooks_and_keeps_finished_cells(tiny_lens, tmp_path, monkeypatch):
    reference = tiny_lens.plain("a polyp", seed=0, num_inference_steps=STEPS)
    writes = []
    original = CaptureStore.write

    def failing_write(self, cell, values, *, at=()):
        if len(writes) == 2:
            raise OSError("disk full")
        writes.append(cell)
        original(self, cell, values, at=at)

    monkeypatch.setattr(CaptureStore, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        capture(tiny_lens, ["a polyp"], seeds=[0, 1, 2], num_inference_steps=STEPS,
                store=tmp_path / "e.zarr", batch_size=1)
    monkeypatch.undo()
    after = tiny_lens.plain("a polyp", seed=0, num_inference_steps=STEPS)
    np.testing.assert_array_equal(after, reference)
    assert int(xr.open_zarr(tmp_path / "e.zarr").done.sum()) == 2
    calls, handle = count_calls(tiny_lens)
    try:
        capture(tiny_lens, ["a polyp"], seeds=[0, 1, 2], num_inference_steps=STEPS,
                store=tmp_path / "e.zarr")
    finally:
        handle.remove()
    assert len(calls) == STEPS


MEMORY_CHILD = """
import resource, tempfile
from dit_lens import load
from dit_lens.testing import PixArtSpec, build_pixart
from dit_lens.trace.capture import capture
spec = PixArtSpec(num_layers=2, num_heads=4, head_dim=64, sample_size=32)  # C 256, 256 tokens
lens = load(build_pixart(spec, seed=0))
root = tempfile.mkdtemp()
run = lambda name, seeds: capture(lens, ["a polyp"], seeds=seeds, num_inference_steps=2,
                                  store=f"{{root}}/{{name}}.zarr", batch_size=2, reduce="mean")
run("warm", range(4))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ds = run("many", range({seeds}))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024)
"""


def test_memory_stays_flat_as_seeds_grow(tmp_path):
    """48 runs whose per-token activations total ~100 MB must not raise the peak RSS."""
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_CHILD.format(seeds=48))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    child = children.start(script, env=env)  # a process of its own: its peak RSS is its own
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr[-2000:]
    growth_mib = float(stdout.split()[-1])
    assert growth_mib < 25, f"peak RSS grew by {growth_mib:.1f} MiB over 48 seeds"


def test_incompatible_store_is_an_error_and_left_untouched(tiny_lens, tiny_spec, tmp_path):
    store = tmp_path / "s.zarr"
    capture(tiny_lens, ["a polyp"], seeds=[0], num_inference_steps=2, store=store)
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    with pytest.raises(CaptureStoreError, match="incompatible.*num_inference_steps.*store="):
        capture(tiny_lens, ["a polyp"], seeds=[0], num_inference_steps=3, store=store)
    other_model = load(build_pixart(tiny_spec, seed=7))
    with pytest.raises(CaptureStoreError, match="model_fingerprint"):
        capture(other_model, ["a polyp"], seeds=[0], num_inference_steps=2, store=store)
    with pytest.raises(CaptureStoreError, match="seeds"):
        capture(tiny_lens, ["a polyp"], seeds=[0, 1], num_inference_steps=2, store=store)
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


def test_corrupt_store_is_an_error(tiny_lens, tmp_path):
    junk = tmp_path / "junk.zarr"
    junk.mkdir()
    (junk / "notes.txt").write_text("not zarr")
    with pytest.raises(CaptureStoreError, match="not a readable Zarr store.*store="):
        capture(tiny_lens, ["a polyp"], seeds=[0], num_inference_steps=2, store=junk)
    foreign = tmp_path / "foreign.zarr"
    xr.Dataset({"x": ("a", [1, 2])}).to_zarr(foreign, zarr_format=2)
    with pytest.raises(CaptureStoreError, match="not a dit-lens capture store"):
        capture(tiny_lens, ["a polyp"], seeds=[0], num_inference_steps=2, store=foreign)
    broken = tmp_path / "broken.zarr"
    capture(tiny_lens, ["a polyp"], seeds=[0, 1], num_inference_steps=2, store=broken)
    (broken / "done" / "0.0").write_bytes(b"\x00garbage")
    with pytest.raises(CaptureStoreError, match="corrupt"):
        capture(tiny_lens, ["a polyp"], seeds=[0, 1], num_inference_steps=2, store=broken)
    assert (junk / "notes.txt").read_text() == "not zarr"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[]), r"prompts is empty.*prompts=\["),
        (dict(prompts=["a", "a"]), "prompts has duplicates"),
        (dict(seeds=[]), "seeds is empty.*seeds=range"),
        (dict(seeds=3), r"seeds must be a list.*seeds=range\(3\)"),
        (dict(layers=[0, 3]), r"capture.layers \[3\] do not exist.*3 blocks.*0\.\.2"),
        (dict(layers=[-1]), r"layers must be >= 0, got \[-1\]"),
        (dict(layers=1), r"layers must be a list.*layers=\[1\]"),
        (dict(site="attn3"), r"capture: unknown site 'attn3'.*'attn2'"),
        (dict(branch="negative"), r"unknown branch='negative'.*'uncond'"),
        (dict(branch="uncond", guidance_scale=1.0), "branch='uncond' needs classifier-free"),
        (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
        (dict(num_inference_steps=-2), "num_inference_steps must be a positive integer"),
        (dict(reduce="max"), r"unknown reduce='max'.*reduce=None"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
    ],
)
def test_bad_arguments_are_clear_errors(tiny_lens, tmp_path, kwargs, message):
    args = dict(prompts=["a polyp"], seeds=[0], num_inference_steps=2, store=tmp_path / "x.zarr")
    args.update(kwargs)
    prompts = args.pop("prompts")
    with pytest.raises(ValueError, match=message):
        capture(tiny_lens, prompts, **args)
    assert not (tmp_path / "x.zarr").exists()


def test_settings_round_trip_and_validate():
    settings = CaptureSettings(num_inference_steps=4, layers=(3, 1), branch="both", reduce=None)
    assert settings.layers == (1, 3)
    assert CaptureSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(ValueError, match="duplicates"):
        CaptureSettings(layers=(1, 1))
    with pytest.raises(ValueError, match="layers must be a non-empty list"):
        CaptureSettings(layers=())


@pytest.mark.parametrize("site, branch, reduce", [("attn2.weights", "cond", "mean"), ("attn2.weights", "both", "heads"),
                                                  ("attn1.weights", "uncond", "heads")])
def test_attention_weights_match_raw_hooks(tiny_lens, tmp_path, site, branch, reduce):
    from test_attention import raw_weights

    ds = capture(tiny_lens, ["a dyed polyp", "normal"], seeds=[3], num_inference_steps=STEPS, site=site,
                 branch=branch, reduce=reduce, store=tmp_path / "w.zarr")
    var = ds[site]
    keys = 120 if site == "attn2.weights" else 16
    tail = ["key"] if reduce == "mean" else ["query", "key"]
    assert var.dims == ("prompt", "seed", "step", "layer") + ("branch",) * (branch == "both") + tuple(tail)
    assert ds.sizes["key"] == keys and (reduce == "mean" or ds.sizes["query"] == 16)
    for prompt in ("a dyed polyp", "normal"):
        raw = raw_weights(tiny_lens, [prompt], [3], STEPS, site=site.split(".")[0])  # (2 rows, heads, q, k)
        per_branch = {name: np.stack([np.stack([raw[(t, l)][row].mean(0).numpy() for l in range(3)])
                                      for t in range(STEPS)]) for name, row in (("uncond", 0), ("cond", 1))}
        want = np.stack([per_branch["cond"], per_branch["uncond"]], axis=2) if branch == "both" else per_branch[branch]
        if reduce == "mean":
            want = want.mean(-2)  # over queries
        np.testing.assert_allclose(var.sel(prompt=prompt, seed=3).values, want, atol=1e-6)
    assert var.sel(prompt="normal").sum("key").values == pytest.approx(1.0, abs=1e-5)  # a distribution per query


def test_weights_reductions_are_validated_and_keep_other_keys(tiny_lens, tmp_path):
    with pytest.raises(ValueError, match=r"reduce=None at attn2.weights would keep heads × queries × keys.*"
                                         r"reduce='heads'"):
        capture(tiny_lens, ["a polyp"], seeds=[0], site="attn2.weights", reduce=None, store=tmp_path / "x.zarr")
    with pytest.raises(ValueError, match="'heads' applies to weights sites"):
        capture(tiny_lens, ["a polyp"], seeds=[0], site="attn2", reduce="heads", store=tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()
    # the identity of an output-site capture is what it was before weights sites existed (no cache invalidation)
    assert CaptureSettings().to_dict() == {"num_inference_steps": 20, "guidance_scale": 4.5, "layers": None,
                                           "site": "attn2", "branch": "cond", "reduce": "mean"}
    weights = capture(tiny_lens, ["a polyp"], seeds=[0], num_inference_steps=2, site="attn2.weights",
                      store=tmp_path / "w.zarr")
    assert weights.attrs["capture_site"] == "attn2.weights" and weights.attrs["capture_reduce"] == "mean"
    with pytest.raises(CaptureStoreError, match="settings.reduce"):  # another reduction is another capture
        capture(tiny_lens, ["a polyp"], seeds=[0], num_inference_steps=2, site="attn2.weights", reduce="heads",
                store=tmp_path / "w.zarr")
