"""Checkpoints: N + M steps straight equal N steps, a fresh process-like restart, and M more steps, bit for
bit (weights, EMA, optimizer states, losses); a crash while writing leaves the previous checkpoint usable."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_config


def final_state(trainer):
    state = {f"{k}.{n}": v.clone() for k, e in trainer.engines.items() for n, v in e.module.state_dict().items()}
    state.update({f"ema.{n}": v.clone() for n, v in trainer.ema.state_dict().items()})
    for k, e in trainer.engines.items():
        inner = getattr(e.optimizer, "optimizer", e.optimizer)  # the torch AdamW inside ZeRO's wrapper
        for i, s in enumerate(inner.state.values()):
            for n, t in s.items():
                if torch.is_tensor(t):
                    state[f"opt.{k}.{i}.{n}"] = t.clone()
    return state


def losses(trainer):
    return {k: [v for _, v in series] for k, series in trainer.history.items() if k.endswith("loss")}


def assert_same_run(straight, resumed) -> None:
    """Weights, EMA and optimizer states bitwise equal, and the same logged losses."""
    a, b = final_state(straight), final_state(resumed)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(straight) == losses(resumed)


def test_resume_is_bit_identical(tmp_path, ds_world):
    from repae.train.trainer import Trainer

    common = ["schedule.max_steps=4", "logging.ckpt_every=2", "logging.log_every=1", "logging.sample_every=0"]
    straight = Trainer(tiny_config(tmp_path / "a", *common))
    straight.fit()
    first = Trainer(tiny_config(tmp_path / "b", *common, "schedule.max_steps=2"))
    first.fit()
    assert open(tmp_path / "b" / "checkpoints" / "latest").read() == "step0000002"
    resumed = Trainer(tiny_config(tmp_path / "b", *common))
    resumed.fit()
    assert resumed.step == 4
    assert_same_run(straight, resumed)


def test_crash_during_checkpoint_write_keeps_the_previous_one(tmp_path, ds_world, monkeypatch):
    from repae.train import trainer as trainer_mod
    from repae.train.checkpoint import CheckpointError

    cfg = tiny_config(tmp_path / "c", "schedule.max_steps=2", "logging.ckpt_every=1", "logging.sample_every=0")
    trainer = trainer_mod.Trainer(cfg)
    trainer.run_step()
    trainer.save_checkpoint()
    trainer.run_step()
    real_save = torch.save

    def dying_save(obj, f, *a, **kw):  # checkpoints are written through file objects
        if str(getattr(f, "name", f)).endswith("trainer.pt"):
            raise OSError("write failed (injected)")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(trainer_mod.torch, "save", dying_save)
    with pytest.raises(CheckpointError, match="injected"):
        trainer.save_checkpoint()
    monkeypatch.setattr(trainer_mod.torch, "save", real_save)
    ckpts = tmp_path / "c" / "checkpoints"  # the partial folder is removed (a kill -9 would leave it: next start)
    assert open(ckpts / "latest").read() == "step0000001" and not (ckpts / ".tmp-step0000002").exists()
    again = trainer_mod.Trainer(cfg)
    again.load_checkpoint(again.latest_checkpoint())
    assert again.step == 1
    assert not any(n.startswith("step0000002") for n in os.listdir(ckpts))
