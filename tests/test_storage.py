"""The storage layer: cache root, claimed folders, sealed records and tensor files, safe loaders."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dit_lens
from dit_lens.storage import (MARKER, DamagedError, FolderClaimError, MissingError, claim, claimed, dataset_digest,
                              digest, load_torch, read_record, read_tensors, save_torch, write_record, write_tensors)

CHECKOUT = Path(dit_lens.__file__).resolve().parent.parent


def _cache_root_in(tmp_path, pythonpath: Path) -> Path:
    env = {k: v for k, v in os.environ.items() if k != "DIT_LENS_CACHE"}
    env.update(PYTHONPATH=str(pythonpath), HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-c", "from dit_lens.storage import cache_root; print(cache_root())"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def test_a_checkout_caches_in_its_own_cache_folder_wherever_it_runs_from(tmp_path):
    assert _cache_root_in(tmp_path, CHECKOUT) == CHECKOUT / "cache"


def test_an_installed_package_caches_in_the_home_cache(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(CHECKOUT / "dit_lens", site / "dit_lens", ignore=shutil.ignore_patterns("__pycache__", "embedded"))
    (site / "pyproject.toml").write_text('[project]\nname = "someone-else"\n')  # another project's file beside it
    assert _cache_root_in(tmp_path, site) == tmp_path / "home" / ".cache" / "dit-lens"


# -- claimed folders ---------------------------------------------------------------------


def test_a_folder_dit_lens_did_not_make_is_refused_even_with_overwrite(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    with pytest.raises(FolderClaimError, match=r"not empty and was not made by dit-lens \(it holds notes.txt\)"):
        claimed(folder, "study", identity={"a": 1}, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_replacing_removes_only_recorded_entries(tmp_path):
    out = claimed(tmp_path / "out", "demo", identity={"seed": 0})
    out.write("pairs.png", b"png")
    out.record("vector.zarr")
    (tmp_path / "out" / "vector.zarr" / "0").mkdir(parents=True)
    (tmp_path / "out" / "vector.zarr" / "0" / "c").write_bytes(b"chunk")
    (tmp_path / "out" / "yours.txt").write_text("a file put there by hand")
    again = claimed(tmp_path / "out", "demo", identity={"seed": 1}, overwrite=True)
    assert again.state == "replaced"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "yours.txt"]


def test_a_marker_edited_to_point_outside_is_refused_and_nothing_outside_is_removed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    claimed(tmp_path / "out", "demo", identity={"seed": 0}).write("pairs.png", b"png")
    marker = tmp_path / "out" / MARKER
    record = json.loads(marker.read_text())
    for forged in (["../victim.txt"], [str(victim)]):
        record["files"] = forged
        marker.write_text(json.dumps(record))  # digest now stale
        with pytest.raises(FolderClaimError, match="fails its digest"):
            claimed(tmp_path / "out", "demo", identity={"seed": 1}, overwrite=True)
        resealed = {k: v for k, v in record.items() if k != "digest"}
        write_record(marker, resealed)  # even a marker with a valid digest may not name another place
        with pytest.raises(FolderClaimError, match="is not a path inside the output folder"):
            claimed(tmp_path / "out", "demo", identity={"seed": 1}, overwrite=True)
    assert victim.read_text() == "precious"


def test_a_recorded_link_is_removed_never_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.bin").write_bytes(b"x")
    out = claimed(tmp_path / "out", "demo", identity=1)
    out.record("vector.zarr")
    os.symlink(elsewhere, tmp_path / "out" / "vector.zarr")
    claimed(tmp_path / "out", "demo", identity=2, overwrite=True)
    assert (elsewhere / "data.bin").read_bytes() == b"x"
    assert not (tmp_path / "out" / "vector.zarr").exists()


def test_another_kind_or_identity_is_refused_naming_what_differs(tmp_path):
    claimed(tmp_path / "out", "study", identity={"steps": 20, "seeds": [0, 1]})
    with pytest.raises(FolderClaimError, match=r"holds a dit-lens study output, not a finetune"):
        claimed(tmp_path / "out", "finetune")
    with pytest.raises(FolderClaimError, match=r"other settings \(steps: 20 there, 8 now\)"):
        claimed(tmp_path / "out", "study", identity={"steps": 8, "seeds": [0, 1]})
    assert claimed(tmp_path / "out", "study", identity={"steps": 20, "seeds": (0, 1)}).state == "reused"


def test_paths_that_are_not_folders_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FolderClaimError, match="is a file, not a folder"):
        claim(tmp_path / "file", "demo")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(FolderClaimError, match="is a link to .*nowhere, which does not exist"):
        claim(tmp_path / "dangling", "demo")
    with pytest.raises(FolderClaimError, match="not a path inside"):
        claimed(tmp_path / "ok", "demo").record("../escape")


# -- records, digests and tensor files --------------------------------------------------


@pytest.mark.parametrize("content, expected", [
    ('{"a": 1', "unreadable or truncated"),
    ("[1, 2]", "holds a JSON list, not the object"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (b"\xff\xfe{}", "unreadable or truncated"),
    ('{"a": 1}', "has no digest"),
])
def test_bad_records_are_refused_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "study.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DamagedError, match=rf"study record .*study.json .*{expected}.*; delete it"):
        read_record(path, what="study record")


def test_missing_record_is_named(tmp_path):
    with pytest.raises(MissingError, match=r"record .*gone.json does not exist"):
        read_record(tmp_path / "gone.json", what="record")


def test_digests_cover_attributes_and_data():
    import xarray as xr

    vec = xr.DataArray(np.ones((2, 3), np.float32), dims=("layer", "channel"), attrs={"site": "attn2"})
    edited = vec.copy()
    edited.attrs["site"] = "ff"
    scaled = vec * 1e6
    scaled.attrs = dict(vec.attrs)
    assert dataset_digest(vec) == dataset_digest(vec.copy())
    assert len({dataset_digest(vec), dataset_digest(edited), dataset_digest(scaled)}) == 3
    assert digest({"x": 1}, {"a": np.zeros(2)}) != digest({"x": 1}, {"a": np.zeros(3)})


def test_tensor_files_round_trip_and_refuse_tampering(tmp_path):
    path = tmp_path / "adapter.safetensors"
    write_tensors(path, {"w": torch.arange(6.0).reshape(2, 3)}, {"rank": 4})
    tensors, meta = read_tensors(path, what="adapter")
    assert meta == {"rank": 4} and tensors["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    write_tensors(tmp_path / "x50.safetensors", {"w": torch.arange(6.0).reshape(2, 3) * 50}, {"rank": 4})
    forged = path.read_bytes()
    body = (tmp_path / "x50.safetensors").read_bytes()
    path.write_bytes(forged[: len(forged) - 24] + body[-24:])  # the same header, other tensor bytes
    with pytest.raises(DamagedError, match="adapter .* fails its digest"):
        read_tensors(path, what="adapter")
    path.write_bytes(forged[:40])
    with pytest.raises(DamagedError, match="adapter .* unreadable, truncated"):
        read_tensors(path, what="adapter")


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_torch_files_load_weights_only_and_never_run_code(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_torch(path, {"step": 3, "weights": {"a": torch.ones(2)}})
    assert load_torch(path, what="checkpoint")["step"] == 3
    bad = tmp_path / "bad.pt"
    torch.save({"state": _Boom(), "digest": "x"}, bad)
    with pytest.raises(DamagedError, match="holds objects other than tensors .* refused unread"):
        load_torch(bad, what="checkpoint", fix="fine-tune into a new folder")
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()
    plain = tmp_path / "plain.pt"
    torch.save({"a": torch.ones(1)}, plain)  # tensors, but not a file dit-lens sealed
    with pytest.raises(DamagedError, match="not a file dit-lens wrote"):
        load_torch(plain, what="checkpoint")
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DamagedError, match="unreadable or truncated"):
        load_torch(path, what="checkpoint")
