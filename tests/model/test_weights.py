"""model/weights.py: one loader for .pt and .safetensors, weights_only with just argparse.Namespace allowed,
strict loads whose errors name every missing/unexpected key and shape."""

from __future__ import annotations

import argparse
import collections
import os

import pytest
import torch
from torch import nn

from repae.model.weights import (
    describe_mismatch,
    load_state_dict_checked,
    load_weights,
    read_weight_file,
    save_weights,
    state_dict_from,
)


class Evil:
    """A pickled global that weights_only loading must refuse."""

    def __reduce__(self):
        return (os.getcwd, ())


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_pt_with_namespace_args_loads_weights_only(tmp_path):
    m = small()
    torch.save({"model": m.state_dict(), "args": argparse.Namespace(lr=1e-4), "steps": 3}, tmp_path / "c.pt")
    obj = read_weight_file(tmp_path / "c.pt")
    assert obj["args"].lr == 1e-4 and obj["steps"] == 3
    other = load_weights(small().requires_grad_(False), tmp_path / "c.pt", key="model")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), other.state_dict().values()))


def test_other_pickled_globals_are_refused(tmp_path):
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        read_weight_file(tmp_path / "evil.pt")


def test_safetensors_round_trip_and_atomic_write(tmp_path):
    m = small()
    save_weights(m.state_dict(), tmp_path / "m.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no .tmp left behind
    sd = state_dict_from(read_weight_file(tmp_path / "m.safetensors"))
    assert list(sd) == list(m.state_dict()) and all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        read_weight_file(tmp_path / "nowhere.pt")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown format"):
        read_weight_file(tmp_path / "w.npz")
    with pytest.raises(ValueError, match="unknown format"):
        save_weights({}, tmp_path / "w.npz")


def test_state_dict_from_unwraps_and_strips_module_prefix():
    t = torch.zeros(1)
    assert state_dict_from({"state_dict": {"module.a": t}, "epoch": 1}) == {"a": t}
    assert state_dict_from({"model": {"b": t}, "optimizer": {"x": 1}}) == {"b": t}
    with pytest.raises(ValueError, match="pass key="):
        state_dict_from({"weights": {"a": t}, "epoch": 1})
    with pytest.raises(ValueError, match="no entry 'ema'"):
        state_dict_from({"model": {"a": t}}, key="ema")


def test_strict_load_names_missing_unexpected_and_shapes():
    m = small()
    sd = collections.OrderedDict(m.state_dict())
    sd.pop("0.bias")
    sd["2.weight"] = torch.zeros(2)
    sd["1.running_mean"] = torch.zeros(5)
    with pytest.raises(ValueError) as err:
        load_state_dict_checked(small(), sd, source="f.pt")
    msg = str(err.value)
    assert "f.pt" in msg and "1 missing: 0.bias (4,)" in msg and "1 unexpected: 2.weight (2,)" in msg
    assert "1.running_mean: model (4,), file (5,)" in msg
    # Non-strict still refuses a wrong shape, and reports the missing keys.
    with pytest.raises(ValueError, match="shape mismatch"):
        load_state_dict_checked(small(), sd, strict=False)
    sd["1.running_mean"] = torch.zeros(4)
    assert load_state_dict_checked(small(), sd, strict=False) == ["0.bias"]
    assert describe_mismatch(m.state_dict(), m.state_dict()) == ""
