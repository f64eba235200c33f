"""studies/probes.py and studies/sae.py: their ``--quick`` versions run, write sealed results, and what they print
is what they saved; the headline figures are recomputed here by hand (raw pipeline calls, raw torch hooks)."""

import json
import re
import runpy

import numpy as np
import pytest
import torch
import xarray as xr

from dit_lens.storage import DIGEST, dataset_digest, read_record
from dit_lens.study.cli import find_study

NUMBER = r"(-?\d+\.\d+)"
INTERVAL = rf"{NUMBER} \[{NUMBER}, {NUMBER}\]"


def study(name: str) -> dict:
    return runpy.run_path(str(find_study(name)), run_name="__test__")


def run_quick(name: str, out, monkeypatch, capsys) -> tuple[str, dict]:
    monkeypatch.setenv("DIT_LENS_CACHE", str(out.parent / "cache"))
    assert study(name)["main"](["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    return printed, read_record(out / "results.json", what=f"the {name} study's result")


def close(printed: str, saved, tol: float = 6e-4) -> None:
    assert abs(float(printed) - saved) <= tol, (printed, saved)


def check_interval(values, low: float = 0.0, high: float = 1.0) -> None:
    value, lo, hi = values[:3]
    assert low <= lo <= value <= hi <= high, values


def plain_images(lens, prompt: str, seeds: list[int], steps: int, hooks=()) -> np.ndarray:
    """The images of runs of `prompt` in batches of 8 (as the studies batch them), with raw forward hooks."""
    handles = [lens.site_module("attn2", layer).register_forward_hook(fn) for layer, fn in hooks]
    try:
        images = []
        with torch.no_grad():
            for k in range(0, len(seeds), 8):
                batch = seeds[k:k + 8]
                images.append(lens.pipeline([prompt] * len(batch), generator=[lens.generator(s) for s in batch],
                                            num_inference_steps=steps, guidance_scale=4.5, output_type="np",
                                            **lens.pipeline_kwargs).images)
    finally:
        for h in handles:
            h.remove()
    return np.concatenate(images)


def test_probes_study_quick(tmp_path, monkeypatch, capsys):
    import dit_lens
    from dit_lens.world import load_segmenter
    from dit_lens.world.procedural import caption

    out = tmp_path / "probes"
    printed, record = run_quick("probes", out, monkeypatch, capsys)
    quick = study("probes")["QUICK"]
    for name in ("item_attn2_cond", "item_block_uncond", "token_attn2"):
        assert (out / f"{name}.png").stat().st_size > 1000
        ds = xr.open_zarr(out / f"{name}.zarr").load()
        assert ds.attrs[DIGEST] == dataset_digest(ds)  # sealed over data and attrs
        assert ds.sizes["step"] == quick["steps"] and ds.attrs["model_fingerprint"] == record["model_fingerprint"]
    assert record["seeds"] == list(range(200_000, 200_000 + quick["seeds"]))
    assert record["token_seeds"] == list(range(200_100, 200_100 + quick["token_seeds"]))

    # every per-step line printed is the saved dataset's: mean over layers, best layer and its intervals
    for name in ("attn2_cond", "block_uncond"):
        ds = xr.open_zarr(out / f"item_{name}.zarr").load()
        section = printed.split(f"\n{name.replace('_', ' ')}: item probe")[1].split("control accuracy over cells")[0]
        lines = re.findall(rf"step +(\d+): mean over layers {NUMBER}; best layer +(\d+) accuracy {INTERVAL} "
                           rf"selectivity {INTERVAL} control {INTERVAL} \(n=(\d+)\)", section)
        assert len(lines) == quick["steps"] == len(record["item"][name]["per_step"])
        for line, row in zip(lines, record["item"][name]["per_step"]):
            cell = ds.sel(step=int(line[0]))
            assert int(line[2]) == row["best_layer"] == int(cell.layer[int(np.argmax(cell.accuracy.values))])
            close(line[1], float(cell.accuracy.mean()))
            for k, var in ((3, "accuracy"), (6, "selectivity"), (9, "control_accuracy")):
                saved = cell.sel(layer=row["best_layer"])
                for j, suffix in enumerate(("", "_low", "_high")):
                    close(line[k + j], float(saved[var + suffix]))
                check_interval(row[var], -1.0 if var == "selectivity" else 0.0)
            assert int(line[12]) == row["n"] == 2 * len(ds.attrs["test_seeds"])
    # the text run carries the class, the empty prompt's block output cannot at step 0 (same latent for both)
    assert record["item"]["attn2_cond"]["per_step"][-1]["accuracy"][0] >= 0.75
    assert record["item"]["block_uncond"]["per_step"][0]["mean_accuracy"] == 0.5

    # token level: the IoU, ceiling and position baseline recomputed from fresh images and the saved maps
    token = record["token"]
    t = xr.open_zarr(out / "token_attn2.zarr").load()
    lens, segmenter = dit_lens.load("embedded"), load_segmenter("embedded")
    seeds = record["token_seeds"]
    masks = np.asarray(segmenter(plain_images(lens, caption("polyps"), seeds, quick["steps"])), bool)
    at = {s: i for i, s in enumerate(seeds)}

    def iou(map8, mask):
        big = np.repeat(np.repeat(map8, 8, 0), 8, 1) >= map8.mean()
        return (big & mask).sum() / max((big | mask).sum(), 1)

    cell = t.sel(layer=token["layer"], step=token["step"])
    assert sorted(token["selection_seeds"] + token["score_seeds"]) == sorted(t.attrs["test_seeds"])
    by_hand = [iou(cell.probe_map.sel(seed=s).values[0], masks[at[s]]) for s in token["score_seeds"]]
    assert token["iou"][0] == pytest.approx(np.mean(by_hand), abs=1e-3)
    grid = masks.reshape(len(seeds), 8, 8, 8, 8).mean((2, 4))
    ceiling = [iou(grid[at[s]], masks[at[s]]) for s in token["score_seeds"]]
    assert token["ceiling"][0] == pytest.approx(np.mean(ceiling), abs=1e-3)
    prior = (grid[[at[s] for s in t.attrs["train_seeds"]]] >= 0.5).mean(0)
    position = [iou(prior, masks[at[s]]) for s in token["score_seeds"]]
    assert token["position_iou"][0] == pytest.approx(np.mean(position), abs=1e-3)
    for key in ("iou", "ceiling", "position_iou"):
        check_interval(token[key])
        assert token[key][3] == len(token["score_seeds"])
    found = re.search(rf"IoU \(probe map > its mean vs the segmenter mask\) on scoring seeds \[[\d, ]+\]: {INTERVAL} "
                      rf"\(n=(\d+)\)", printed)
    assert found and [float(x) for x in found.groups()[:3]] == pytest.approx(token["iou"][:3], abs=6e-4)


def test_sae_study_quick(tmp_path, monkeypatch, capsys):
    import dit_lens
    from dit_lens.features import load_sae
    from dit_lens.world import load_oracle
    from dit_lens.world.procedural import caption

    out = tmp_path / "sae"
    printed, record = run_quick("sae", out, monkeypatch, capsys)
    quick = study("sae")["QUICK"]
    sae = load_sae(out / "sae")
    assert sae.digest == record["sae_digest"] and list(sae.layers) == record["layers"] == list(range(6, 12))
    assert record["train_seeds"] + record["held_out_seeds"] == list(range(200_000, 200_000 + quick["seeds"]))

    # FVU on the held-out seeds, by hand from the store; the trainer's own figures agree
    store = xr.open_zarr(sae.store["path"])["attn2"].sel(seed=record["held_out_seeds"], layer=list(sae.layers))
    x = torch.from_numpy(np.asarray(store.values).reshape(-1, sae.width)).double()
    xh = sae.decode(sae.encode(x.float())).double()
    fvu = float(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    quality = record["quality"]
    assert quality["fvu"][0] == pytest.approx(fvu, rel=1e-3) and quality["tokens"] == len(x)
    fired = (sae.encode(x.float()) > 0).double().mean(0).numpy()
    assert quality["dead_rate"][0] == pytest.approx(float((fired == 0).mean()), abs=6e-6)
    assert quality["dense_rate"][0] == pytest.approx(float((fired > 0.1).mean()), abs=6e-6)
    assert quality["fvu"][0] == pytest.approx(sae.fvu, rel=1e-3) and quality["dead_rate"][3] == sae.num_features
    for key in ("fvu", "dead_rate", "dense_rate"):
        check_interval(quality[key])
        found = re.search(rf"{key} {INTERVAL}", printed)
        assert [float(v) for v in found.groups()] == pytest.approx(quality[key][:3], abs=6e-5)

    # the splice cost: attn2's output replaced by x̂ through raw forward hooks, PSNR per image as saved
    lens, oracle = dit_lens.load("embedded"), load_oracle("embedded")
    seeds = record["seeds"]["splice_seeds"]
    hooks = [(layer, lambda _m, _a, h: sae.decode(sae.encode(h)).to(h.dtype)) for layer in sae.layers]
    plain = plain_images(lens, caption("polyps"), seeds, quick["steps"])
    spliced = plain_images(lens, caption("polyps"), seeds, quick["steps"], hooks)
    psnr = 10 * np.log10(1 / ((plain - spliced) ** 2).mean((1, 2, 3)))
    assert record["splice"]["polyps"]["per_image_psnr"] == pytest.approx(psnr, abs=0.01)
    reads = np.array(oracle.labels)[np.asarray(oracle(spliced)).argmax(1)] == "polyps"
    assert record["splice"]["polyps"]["spliced_reads"][0] == pytest.approx(reads.mean(), abs=1e-4)

    # the lesion map and the edits: valid figures, printed as saved
    check_interval(record["map"]["iou"])
    check_interval(record["map"]["ceiling"])
    assert record["map"]["iou"][0] == pytest.approx(np.mean(record["map"]["per_image_iou"]), abs=1e-3)
    assert record["map"]["iou"][3] == len(record["map"]["score_seeds"]) == quick["map_seeds"] // 2
    edits = record["edits"]
    assert len(edits["features"]) == quick["features"] and sorted(edits["difference"], reverse=True) == edits["difference"]
    for name in ("ablate", "scale -3"):
        for key in ("flip_rate", "target_rate", "bg_ssim", "flip_with_bg_ssim_0.9"):
            check_interval(edits[name][key])
            assert edits[name][key][3] == quick["edit_seeds"]
        assert edits[name]["bg_ssim"][0] == pytest.approx(np.mean(edits[name]["per_image_bg_ssim"]), abs=1e-3)
        found = re.search(rf"{name} top {quick['features']}: flip_rate {INTERVAL} \(n=\d+\); target_rate {INTERVAL}",
                          printed)
        assert [float(v) for v in found.groups()] == pytest.approx(edits[name]["flip_rate"][:3] + edits[name]["target_rate"][:3],
                                                                   abs=6e-4)
    assert DIGEST in json.loads((out / "results.json").read_text())  # sealed; read_record checked it


@pytest.mark.parametrize("name", ["probes", "sae"])
def test_study_flags(name):
    parse = study(name)["parse"]
    assert parse(["--quick"]).quick
    with pytest.raises(SystemExit):
        parse(["--seeds", "2"])
