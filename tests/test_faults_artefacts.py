"""Fault injection on saved artefacts and the demo's folder: edited, forged or damaged trajectories,
vectors, interventions and markers are refused with a line that names them, and nothing outside an
output folder is ever removed. Each test is a hostile or careless input a user may give."""

import json

import numpy as np
import pytest
import xarray as xr

from dit_lens.apps.cli import main
from dit_lens.interventions.base import Intervention, UnverifiedWarning
from dit_lens.interventions.region import Region
from dit_lens.interventions.steer import Steer
from dit_lens.inversion import edit, invert, regenerate
from dit_lens.readouts.vector_files import load_vector, save_vector
from dit_lens.readouts.vectors import concept_vector
from dit_lens.storage import MARKER, DamagedError, write_record
from dit_lens.validate import NonFiniteError

SOURCE, TARGET = "a polyp", "a normal cecum"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines and "Traceback" not in err
    return lines[-1]


# -- the demo's output folder ------------------------------------------------------------------


def _victim(tmp_path):
    victim = tmp_path / "x"
    victim.write_text("the user's")
    return victim


@pytest.mark.parametrize("marker", ["before", "edited", "sealed"])
@pytest.mark.parametrize("outside", ["../x", "absolute"])
def test_demo_overwrite_never_removes_files_outside_out(tmp_path, monkeypatch, capsys, marker, outside):
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path / "cache"))
    victim = _victim(tmp_path)
    out = tmp_path / "demo"
    out.mkdir()
    entry = str(victim) if outside == "absolute" else "../x"
    if marker == "before":  # the demo's marker file of earlier releases, listing a path outside
        (out / ".dit-lens-demo.json").write_text(json.dumps({"written_by": "dit-lens demo", "files": [entry]}))
        reason = "not made by dit-lens"
    elif marker == "edited":  # dit-lens's sealed marker, with an entry added by hand
        write_record(out / MARKER, {"kind": "demo", "made_by": "dit-lens", "identity": None, "files": []})
        record = json.loads((out / MARKER).read_text())
        record["files"] = [entry]
        (out / MARKER).write_text(json.dumps(record))
        reason = "fails its digest"
    else:  # a forged marker that passes its digest but names a path outside
        write_record(out / MARKER, {"kind": "demo", "made_by": "dit-lens", "identity": None, "files": [entry]})
        reason = "not a path inside the output folder"
    code = main(["demo", "--overwrite", "--steps", "2", "--pairs", "1", "--vector-seeds", "1", "--out", str(out)])
    line = one_line_error(capsys)
    assert victim.read_text() == "the user's"
    assert code == 2 and str(out) in line and reason in line
    assert not (out / "summary.json").exists()


def test_demo_overwrite_removes_what_it_recorded_and_keeps_the_rest(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    run = ["demo", "--steps", "2", "--pairs", "1", "--vector-seeds", "1", "--out", str(out)]
    assert main(run) == 0
    recorded = json.loads((out / MARKER).read_text())["files"]
    assert {"summary.json", "pairs.png", "explorer.html", "vector.zarr"} <= set(recorded)
    first = (out / "summary.json").read_text()
    assert main(run) == 2 and "pass --overwrite" in one_line_error(capsys)
    assert (out / "summary.json").read_text() == first
    assert main([*run, "--overwrite", "--alpha", "2"]) == 0
    assert json.loads((out / "summary.json").read_text())["settings"]["alpha"] == 2.0
    load_vector(out / "vector.zarr")  # the new vector, sealed


def test_a_failed_demo_leaves_no_claimed_empty_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    code = main(["demo", "--guidance", "1e308", "--steps", "2", "--pairs", "1", "--vector-seeds", "1",
                 "--out", str(out)])
    line = one_line_error(capsys)
    assert code == 2 and "NaN or inf" in line and "guidance" in line and "prompts that differ" not in line
    assert not out.exists()  # made by this run, holding only its marker: gone
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["demo", "--alpha", "1e30", "--steps", "2", "--pairs", "1", "--vector-seeds", "1",
                 "--out", str(empty)]) == 2
    assert list(empty.iterdir()) == []  # the user's empty folder stays, unmarked


# -- trajectories ------------------------------------------------------------------------------


@pytest.fixture
def images():
    return np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)


@pytest.fixture
def trajectory(tiny_lens, images):
    return invert(tiny_lens, images, SOURCE, num_inference_steps=2, progress=False)


def _steps(ds):
    ds.attrs["num_inference_steps"] = 3


def _fingerprint(ds):
    del ds.attrs["model_fingerprint"]


def _scaled(ds):
    ds["latent"][:, 0] = ds["latent"][:, 0] * 1e6


def _nan(ds):
    ds["latent"][0, 1, 0, 0, 0] = np.nan


@pytest.mark.parametrize("damage, message", [
    (_steps, r"fails its digest.*num_inference_steps=3"),
    (_fingerprint, "no model_fingerprint"),
    (_scaled, "fails its digest"),
    (_nan, "damaged: its latents hold NaN or inf"),
])
def test_an_edited_or_damaged_trajectory_is_refused(tiny_lens, images, trajectory, damage, message):
    bad = trajectory.copy(deep=True)
    damage(bad)
    with pytest.raises(DamagedError, match=message + ".*invert the images again"):
        regenerate(tiny_lens, bad, progress=False)
    with pytest.raises(DamagedError, match=message):
        edit(tiny_lens, images, source=SOURCE, target=TARGET, method="reprompt", num_inference_steps=2,
             trajectory=bad, progress=False)


def test_a_trajectory_without_a_digest_is_refused(tiny_lens, trajectory):
    bad = trajectory.copy()
    del bad.attrs["digest"]
    with pytest.raises(DamagedError, match="no digest"):
        regenerate(tiny_lens, bad, progress=False)


@pytest.mark.parametrize("store", ["zarr", "netcdf"])
def test_a_trajectory_still_verifies_after_a_round_trip(tiny_lens, trajectory, tmp_path, store):
    if store == "zarr":
        trajectory.to_zarr(tmp_path / "t.zarr", zarr_format=2)
        back = xr.open_zarr(tmp_path / "t.zarr")
    else:
        trajectory.to_netcdf(tmp_path / "t.nc")
        back = xr.open_dataset(tmp_path / "t.nc")
    np.testing.assert_array_equal(regenerate(tiny_lens, back, progress=False),
                                  regenerate(tiny_lens, trajectory, progress=False))
    back.close()


# -- vectors -----------------------------------------------------------------------------------


def unit_vector():
    values = np.zeros((2, 3, 16), np.float32)
    values[..., 0] = 1.0
    return xr.DataArray(values, dims=("step", "layer", "channel"), coords={"layer": np.arange(3)},
                        name="concept_vector", attrs={"site": "attn2", "positive_prompts": ["a polyp"]})


def test_a_vector_whose_site_was_edited_is_refused(tmp_path):
    path = save_vector(unit_vector(), tmp_path / "v.zarr")
    assert load_vector(path).attrs["site"] == "attn2"
    for meta in [p for p in path.rglob(".z*") if p.is_file()]:  # the attrs and the consolidated copy
        meta.write_text(meta.read_text().replace('"attn2"', '"ff"'))
    with pytest.raises(DamagedError, match=r"v.zarr is damaged: it fails its digest.*site='ff'.*recompute it"):
        load_vector(path)


def test_a_vector_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    write = xr.Dataset.to_zarr

    def crash(self, store, *args, **kwargs):  # the store is written, then the disk fills
        write(self, store, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_zarr", crash)
    with pytest.raises(OSError, match="disk full"):
        save_vector(unit_vector(), tmp_path / "v.zarr")
    assert list(tmp_path.iterdir()) == []  # neither the store nor its temporary


def test_a_vector_stored_before_digests_loads_with_a_warning(tmp_path):
    unit_vector().to_dataset().to_zarr(tmp_path / "old.zarr", zarr_format=2)
    with pytest.warns(UnverifiedWarning, match="old.zarr was saved by an older dit-lens.*cannot be verified"):
        assert load_vector(tmp_path / "old.zarr").attrs["site"] == "attn2"


# -- saved interventions -----------------------------------------------------------------------


def test_a_deeply_nested_intervention_file_is_one_clear_error(tmp_path):
    path = tmp_path / "steer.json"
    path.write_text('{"type": "Steer", "alpha": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match=r"steer.json is unreadable or truncated \(nested too deeply\)") as err:
        Steer.load(path)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="nested too deeply"):
        Intervention.load(path)


def test_saved_interventions_of_earlier_releases_still_load(tmp_path):
    import hashlib

    steer = Steer(unit_vector(), alpha=2.0, layers=[1])
    data = steer.to_dict()  # the file format save has always written: blake2b hex of the sorted JSON
    data["digest"] = hashlib.blake2b(json.dumps(data, sort_keys=True).encode(), digest_size=16).hexdigest()
    (tmp_path / "s.json").write_text(json.dumps(data))
    assert Steer.load(tmp_path / "s.json").settings() == steer.settings()


# -- regions -----------------------------------------------------------------------------------


def test_a_region_with_non_integer_seed_coords_is_refused():
    masks = np.ones((2, 4, 4), np.float32)
    bad = xr.DataArray(masks, dims=("seed", "y", "x"), coords={"seed": [0.0, 1.7]})
    with pytest.raises(ValueError, match=r"seed coordinate of region must be integers.*got 0.0"):
        Region.of(bad)
    good = xr.DataArray(masks, dims=("seed", "y", "x"), coords={"seed": np.array([3, 7])})
    assert Region.of(good).seeds == (3, 7)
    with pytest.raises(ValueError, match="has duplicates"):
        Region.of(good.assign_coords(seed=[3, 3]))


# -- prompts past the token limit, non-finite captures -----------------------------------------

PAST_THE_LIMIT = "an endoscopic image, " * 6  # 126 characters: past the tiny models' 120 byte tokens


def test_prompts_that_differ_only_past_the_token_limit_are_named(tiny_lens, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"differ only after the first 120 tokens.*max_sequence_length=120"):
        concept_vector(tiny_lens, positive=[PAST_THE_LIMIT + "polyps"], negative=[PAST_THE_LIMIT + "normal cecum"],
                       seeds=[0], num_inference_steps=2)
    assert not list(tmp_path.iterdir())  # refused before anything was captured


def test_the_demo_names_the_token_limit(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path / "cache"))
    code = main(["demo", "--positive", PAST_THE_LIMIT + "polyps", "--negative", PAST_THE_LIMIT + "normal cecum",
                 "--steps", "2", "--pairs", "1", "--vector-seeds", "1", "--out", str(tmp_path / "demo")])
    line = one_line_error(capsys)
    assert code == 2 and "differ only after the first 120 tokens" in line and "prompts that differ in" not in line
    assert not (tmp_path / "demo").exists()


def test_non_finite_captures_are_not_blamed_on_the_prompts():
    dims = ("prompt", "seed", "step", "layer", "channel")
    pos = xr.Dataset({"attn2": (dims, np.full((1, 1, 2, 2, 4), np.nan))}, attrs={"capture_guidance_scale": 1e308})
    neg = xr.Dataset({"attn2": (dims, np.zeros((1, 1, 2, 2, 4)))}, attrs={"capture_guidance_scale": 1e308})
    with pytest.raises(NonFiniteError, match=r"NaN or inf.*guidance_scale=1e\+308.*lower guidance_scale"):
        concept_vector(pos, neg)


# -- command-line values -----------------------------------------------------------------------


@pytest.mark.parametrize("flag, value", [("--vector-seeds", str(2**64)), ("--pairs", str(2**63))])
def test_demo_seed_counts_past_the_seed_range_name_the_flag(tmp_path, monkeypatch, capsys, flag, value):
    monkeypatch.setenv("DIT_LENS_CACHE", str(tmp_path / "cache"))
    assert main(["demo", flag, value, "--out", str(tmp_path / "demo")]) == 2
    line = one_line_error(capsys)
    assert f"{flag} {value}" in line and "2**63" in line and f"pass a smaller {flag}" in line
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("value", ["-1", str(2**64)])
def test_world_data_seed_base_names_the_flag(tmp_path, capsys, value):
    assert main(["world", "data", "--seed-base", value, "--per-class", "1", "--out", str(tmp_path / "data")]) == 2
    line = one_line_error(capsys)
    assert "`--seed-base`" in line and f"got {value}" in line
    assert not (tmp_path / "data").exists()


def test_world_data_too_large_is_refused_up_front(tmp_path, capsys):
    assert main(["world", "data", "--per-class", "100000000", "--out", str(tmp_path / "data")]) == 2
    line = one_line_error(capsys)
    assert "GiB of memory" in line and "`--per-class`" in line
    assert not (tmp_path / "data").exists()
