"""Sparse autoencoders on token-level captures: training streamed from the store, resumable, measured on
held-out seeds (checked by hand), saved sealed; feature maps checked against raw torch hooks."""

import sys

import numpy as np
import pytest
import torch
import xarray as xr

from dit_lens import load
from dit_lens.features import feature_dashboard, load_sae, sae_features, store_feature_means, train_sae
from dit_lens.features import train as train_module
from dit_lens.storage import DamagedError
from dit_lens.testing import PixArtSpec, build_pixart
from dit_lens.trace.capture import capture

PROMPTS = ["a polyp", "normal mucosa"]
SEEDS = [0, 1, 2, 3]
SPEC = PixArtSpec(num_layers=3, num_heads=2, head_dim=8, sample_size=8, patch_size=2)
SMALL = dict(k=4, expansion=2, tokens=2048, batch_size=64, buffer_tokens=192, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny lens and a token-level store of it (2 prompts × 4 seeds × 3 steps × 3 layers × 16 tokens)."""
    torch.set_num_threads(1)
    lens = load(build_pixart(SPEC, seed=0))
    root = tmp_path_factory.mktemp("sae")
    store = root / "tokens.zarr"
    capture(lens, PROMPTS, seeds=SEEDS, num_inference_steps=3, reduce=None, store=store)
    return lens, store, root


@pytest.fixture(scope="module")
def sae(world):
    lens, store, root = world
    return train_sae(store, out=root / "sae", **SMALL)


def reference_codes(sae, x):
    """z by hand from the coder's weights: TopK(ReLU(W_enc (x − b_dec) + b_enc)), as float64 numpy."""
    w_enc = sae.coder.encoder.weight.detach().double().numpy()
    b_enc = sae.coder.encoder.bias.detach().double().numpy()
    b_dec = sae.coder.b_dec.detach().double().numpy()
    pre = np.maximum((x.astype(np.float64) - b_dec) @ w_enc.T + b_enc, 0.0)  # (tokens, features)
    top = np.argsort(-pre, axis=1)[:, : sae.k]
    z = np.zeros_like(pre)
    np.put_along_axis(z, top, np.take_along_axis(pre, top, 1), 1)
    return z


def test_quality_is_measured_on_held_out_seeds_as_computed_by_hand(world, sae):
    lens, store, _ = world
    assert sae.store["held_out_seeds"] == [3] and sae.store["train_seeds"] == [0, 1, 2]
    held = xr.open_zarr(store)["attn2"].sel(seed=3).values.reshape(-1, lens.width)  # (tokens, C)
    z = reference_codes(sae, held)
    x_hat = z @ sae.W_dec.double().numpy() + sae.coder.b_dec.detach().double().numpy()
    fvu = ((held - x_hat) ** 2).sum() / ((held - held.mean(0)) ** 2).sum()
    assert sae.quality["tokens"] == len(held) == 2 * 3 * 3 * 16
    assert sae.fvu == pytest.approx(fvu, rel=1e-4)
    assert 0 < sae.fvu < 1
    active = (z > 0).mean(0)
    assert sae.dead_rate == pytest.approx(float((active == 0).mean()))
    assert sae.dense_rate == pytest.approx(float((active > 0.1).mean()))
    np.testing.assert_allclose(sae.encode(torch.from_numpy(held)).numpy(), z, rtol=1e-4, atol=1e-5)


def test_training_streams_one_cell_at_a_time_within_the_buffer(world, tmp_path, monkeypatch):
    lens, store, _ = world
    reads, buffers = [], []
    real_read, real_stream = train_module.read_cell, train_module.stream

    def counted_read(source, cell):
        values = real_read(source, cell)
        reads.append(values.shape)
        return values

    def watched_stream(*args, **kwargs):
        for epoch, group, x in real_stream(*args, **kwargs):
            buffers.append(len(x))
            yield epoch, group, x

    monkeypatch.setattr(train_module, "read_cell", counted_read)
    monkeypatch.setattr(train_module, "stream", watched_stream)
    train_sae(store, out=tmp_path / "sae", **SMALL)
    cell = 3 * 3 * 16  # steps × layers × tokens of one (prompt, seed)
    whole = len(PROMPTS) * len(SEEDS) * cell
    assert set(reads) == {(cell, lens.width)}  # never more than one cell's chunks per read
    assert max(buffers) <= SMALL["buffer_tokens"] < whole  # the buffer, never the store
    # 32 steps of 64 tokens, two per buffer of one 144-token cell: 16 reads, then one per held-out cell
    steps_per_buffer = cell // SMALL["batch_size"]
    training_reads = -(-(SMALL["tokens"] // SMALL["batch_size"]) // steps_per_buffer)
    assert len(reads) == training_reads + len(PROMPTS)  # + the held-out cells, measured once


def test_a_resumed_training_gives_the_same_sae(world, tmp_path, monkeypatch):
    _, store, _ = world
    whole = train_sae(store, out=tmp_path / "whole", checkpoint_every=1, **SMALL)
    real_step, calls = train_module._step, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 21:  # mid-buffer, after several checkpoints
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train_sae(store, out=tmp_path / "resumed", checkpoint_every=1, **SMALL)
    assert (tmp_path / "resumed" / train_module.CHECKPOINT).is_file()
    calls.clear()
    monkeypatch.setattr(train_module, "_step", lambda *a, **k: (calls.append(1), real_step(*a, **k))[1])
    resumed = train_sae(store, out=tmp_path / "resumed", checkpoint_every=1, **SMALL)
    assert 0 < len(calls) < SMALL["tokens"] // SMALL["batch_size"]  # it continued, it did not start again
    for name, value in whole.tensors().items():
        assert torch.equal(value, resumed.tensors()[name]), name
    assert resumed.digest == whole.digest and resumed.fvu == whole.fvu
    assert not (tmp_path / "resumed" / train_module.CHECKPOINT).exists()


def test_a_finished_sae_is_reused_and_other_settings_are_refused(world, sae, monkeypatch):
    _, store, root = world
    monkeypatch.setattr(train_module, "_step", lambda *a, **k: pytest.fail("a finished SAE was trained again"))
    again = train_sae(store, out=root / "sae", **SMALL)
    assert again.digest == sae.digest
    with pytest.raises(ValueError, match="other settings"):
        train_sae(store, out=root / "sae", **{**SMALL, "k": 3})


def test_save_and_load_keep_everything_and_a_flipped_byte_is_caught(sae, tmp_path):
    folder = sae.save(tmp_path / "copy")
    back = load_sae(folder)
    assert back.digest == sae.digest and back.quality == sae.quality and back.store == sae.store
    x = torch.randn(7, sae.width)
    assert torch.equal(back.encode(x), sae.encode(x))
    file = folder / "sae.safetensors"
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's bytes
    file.write_bytes(bytes(data))
    with pytest.raises(DamagedError, match="fails its digest"):
        load_sae(folder)
    data[-5] ^= 0x01
    header = bytes(data).replace(b'\\"site\\": \\"attn2\\"', b'\\"site\\": \\"attn1\\"', 1)
    assert header != bytes(data)
    file.write_bytes(header)
    with pytest.raises(DamagedError, match="fails its digest"):
        load_sae(folder)


def test_bad_stores_and_settings_get_clear_errors(world, tmp_path, monkeypatch):
    lens, store, _ = world
    mean_store = tmp_path / "mean.zarr"
    capture(lens, PROMPTS, seeds=[0, 1], num_inference_steps=2, store=mean_store)
    with pytest.raises(ValueError, match="reduce=None"):
        train_sae(mean_store, **SMALL)
    with pytest.raises(ValueError, match="unknown site='ff'"):
        train_sae(store, site="ff", **SMALL)
    with pytest.raises(ValueError, match=r"layers \[7\] are not in the store"):
        train_sae(store, layers=[7], **SMALL)
    with pytest.raises(ValueError, match=r"steps \[5\] are not in the store"):
        train_sae(store, steps=[0, 5], **SMALL)
    with pytest.raises(ValueError, match="k=40 is more than the SAE's 32 features"):
        train_sae(store, **{**SMALL, "k": 40})
    with pytest.raises(ValueError, match="no capture store"):
        train_sae(tmp_path / "nothing.zarr", **SMALL)
    with pytest.raises(ValueError, match="fewer than one batch of 2000"):
        train_sae(store, **{**SMALL, "batch_size": 2000, "buffer_tokens": 4000, "tokens": 4000})
    with pytest.raises(ValueError, match="less than one batch"):
        train_sae(store, **{**SMALL, "buffer_tokens": 10, "batch_size": 200})
    monkeypatch.setitem(sys.modules, "sparsify", None)
    with pytest.raises(ImportError, match=r"pip install 'dit-lens\[sae\]'"):
        train_sae(store, **SMALL)


def test_feature_maps_match_a_raw_hook_read(world, sae):
    lens, _, _ = world
    maps = sae_features(sae, lens, ["a polyp"], seeds=[11], num_inference_steps=3, layers=[1], progress=False)
    seen = {}
    state = {"t": -1}
    pipe = lens.pipeline
    handles = [pipe.transformer.register_forward_pre_hook(lambda m, a: state.__setitem__("t", state["t"] + 1)),
               pipe.transformer.transformer_blocks[1].attn2.register_forward_hook(
                   lambda m, a, out: seen.__setitem__(state["t"], out[-1].detach().numpy().copy()))]
    try:
        image = pipe("a polyp", generator=lens.generator(11), num_inference_steps=3, guidance_scale=4.5,
                     output_type="np", **lens.pipeline_kwargs).images[0]
    finally:
        for h in handles:
            h.remove()
    rows, cols = lens.token_grid
    for t in range(3):
        z = reference_codes(sae, seen[t])  # (tokens, features) of the conditional row
        expected = z.T.reshape(sae.num_features, rows, cols)
        np.testing.assert_allclose(maps.activation.sel(step=t, layer=1).values[0, 0], expected, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(maps.image.values[0, 0], image, atol=1e-4)
    assert maps.attrs["sae_digest"] == sae.digest and maps.attrs["model_fingerprint"] == lens.fingerprint


def test_feature_maps_refuse_another_model_and_foreign_blocks(world, sae):
    other = load(build_pixart(SPEC, seed=1))
    with pytest.raises(ValueError, match="trained on the model with fingerprint"):
        sae_features(sae, other, ["a polyp"], seeds=[0], num_inference_steps=2, progress=False)
    lens, _, _ = world
    small = train_sae(world[1], layers=[0], out=world[2] / "sae0", **SMALL)
    with pytest.raises(ValueError, match=r"trained on blocks \[0\], not \[2\]"):
        sae_features(small, lens, ["a polyp"], seeds=[0], num_inference_steps=2, layers=[2], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        sae_features(sae, lens, ["a polyp"], seeds=[0], num_inference_steps=2, features=[99], progress=False)
    with pytest.raises(ValueError, match=r"steps \[2\] are not steps of a run of 2"):
        sae_features(sae, lens, ["a polyp"], seeds=[0], num_inference_steps=2, steps=[2], progress=False)


def test_dashboard_rates_and_top_images_are_what_the_maps_say(world, sae):
    lens, store, _ = world
    maps = sae_features(sae, lens, PROMPTS, seeds=[20, 21, 22], num_inference_steps=2, progress=False)
    board = feature_dashboard(maps, top=2)
    act = maps.activation.values  # (prompt, seed, step, layer, feature, row, col)
    rate = (act > 0).mean(axis=(1, 2, 3, 5, 6)).T  # (feature, prompt)
    np.testing.assert_allclose(board.rate.values, rate)
    peak = act.max(axis=(2, 3, 5, 6))  # (prompt, seed, feature)
    for f in range(0, sae.num_features, 7):
        best = np.unravel_index(np.argmax(peak[..., f]), peak.shape[:2])
        assert board.top_prompt.values[f, 0] == PROMPTS[best[0]]
        assert board.top_seed.values[f, 0] == [20, 21, 22][best[1]]
        assert board.top_peak.values[f, 0] >= board.top_peak.values[f, 1]
        np.testing.assert_allclose(board.top_map.values[f, 0], act[best[0], best[1], :, :, f].mean((0, 1)), rtol=1e-6)
    means = store_feature_means(sae, store)
    x = xr.open_zarr(store)["attn2"].sel(prompt="a polyp").values.reshape(-1, lens.width)
    np.testing.assert_allclose(means.sel(prompt="a polyp").values, reference_codes(sae, x).mean(0), rtol=1e-3,
                               atol=1e-5)


def test_the_feature_explorer_shows_each_feature_with_its_rates_and_top_images(world, sae, tmp_path):
    from dit_lens.views.features import overlay, write_feature_explorer

    lens, _, _ = world
    maps = sae_features(sae, lens, PROMPTS, seeds=[20, 21], num_inference_steps=2, features=[1, 5, 9], progress=False)
    board = feature_dashboard(maps, top=2)
    page = write_feature_explorer(board, tmp_path / "page" / "features.html").read_text()
    assert page.count("<section") == 3 and page.count("<img") == 6
    for f in (1, 5, 9):
        assert f'id="f{f}"' in page
        assert f"{float(board.rate.sel(feature=f, prompt=PROMPTS[0])):.3f}" in page
    image = np.full((8, 8, 3), 0.5)
    grid = np.array([[0.0, 2.0], [0.0, 0.0]])
    laid = overlay(image, grid, 2.0)
    assert np.array_equal(laid[:4, :4], image[:4, :4]) and laid[0, 4, 0] > 0.5 > laid[0, 4, 1]
    with pytest.raises(ValueError, match="lacks"):
        write_feature_explorer(board.drop_vars("rate"), tmp_path / "bad.html")


def test_maps_of_given_images_match_a_raw_hook_on_the_noised_denoiser_call(world, sae):
    from dit_lens.sampling.denoiser import Denoiser
    from dit_lens.sampling.images import encode

    lens, _, _ = world
    height, width = lens.pipeline_kwargs["height"], lens.pipeline_kwargs["width"]
    images = np.random.default_rng(0).random((2, height, width, 3)).astype(np.float32)
    maps = sae_features(sae, lens, "a polyp", images=images, seeds=[7], noise_levels=[0.3, 0.8], layers=[0, 2])
    assert maps.activation.dims == ("item", "level", "layer", "feature", "row", "col")
    latents = encode(lens, images)
    noise = torch.randn((1, *latents.shape[1:]), generator=torch.Generator("cpu").manual_seed(7)).expand_as(latents)
    scheduler = lens.pipeline.scheduler
    seen = {}
    handle = lens.pipeline.transformer.transformer_blocks[2].attn2.register_forward_hook(
        lambda m, a, out: seen.__setitem__("h", out.detach().numpy().copy()))
    try:
        for level in (0.3, 0.8):
            t = round(level * (scheduler.config.num_train_timesteps - 1))
            a = float(scheduler.alphas_cumprod[t])
            Denoiser(lens, ["a polyp"]).raw(a**0.5 * latents + (1 - a) ** 0.5 * noise, t, [0, 0])
            for i in range(2):
                expected = reference_codes(sae, seen["h"][i]).T.reshape(sae.num_features, *lens.token_grid)
                np.testing.assert_allclose(maps.activation.sel(level=level, layer=2).values[i], expected, rtol=1e-3,
                                           atol=1e-4)
    finally:
        handle.remove()
    assert not np.allclose(maps.activation.sel(level=0.3).values, maps.activation.sel(level=0.8).values)
    with pytest.raises(ValueError, match="noise_levels"):
        sae_features(sae, lens, images=images, noise_levels=[0.0])
    with pytest.raises(ValueError, match="pass prompts"):
        sae_features(sae, lens)
