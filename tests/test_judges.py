"""Stored judges: sealed records and weights with a digest; damaged or edited ones are refused by name."""

import pytest
import torch

from dit_lens.storage import DamagedError
from dit_lens.world.judges import Oracle, OracleNet, load_oracle, save_judge
from dit_lens.study.cells import judge_fingerprint


def test_a_saved_judge_loads_as_it_was(tmp_path):
    oracle = Oracle(OracleNet(width=4))
    save_judge(oracle, tmp_path / "o")
    assert judge_fingerprint(load_oracle(tmp_path / "o")) == judge_fingerprint(oracle)


def test_edited_weights_or_records_are_refused(tmp_path):
    save_judge(Oracle(OracleNet(width=4)), tmp_path / "o")
    weights = tmp_path / "o" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # one weight changed
    weights.write_bytes(bytes(data))
    with pytest.raises(DamagedError, match=r"oracle's weights .*weights.safetensors fails its digest.*save_judge"):
        load_oracle(tmp_path / "o")
    save_judge(Oracle(OracleNet(width=4)), tmp_path / "p")
    record = tmp_path / "p" / "judge.json"
    record.write_text(record.read_text()[:20])
    with pytest.raises(DamagedError, match=r"oracle's record .*judge.json is unreadable or truncated"):
        load_oracle(tmp_path / "p")


def test_a_judge_of_the_earlier_torch_file_format_is_refused_with_advice_and_left_as_it_is(tmp_path):
    oracle = Oracle(OracleNet(width=4))
    save_judge(oracle, tmp_path / "o")
    (tmp_path / "o" / "weights.safetensors").unlink()
    torch.save(oracle.net.state_dict(), tmp_path / "o" / "weights.pt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    with pytest.raises(ValueError, match=r"weights.pt, the format of an earlier dit-lens.*save the judge again"):
        load_oracle(tmp_path / "o")
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before


def test_a_judge_whose_weights_diverged_is_not_saved(tmp_path):
    from dit_lens.validate import NonFiniteError

    oracle = Oracle(OracleNet(width=4))
    with torch.no_grad():
        next(oracle.net.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="weights hold NaN or inf"):
        save_judge(oracle, tmp_path / "o")
    assert not (tmp_path / "o").exists()
