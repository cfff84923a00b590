"""Logs after a resume: log.jsonl is strict JSON (no bare NaN/Infinity), holds every step once although
the steps after the checkpoint are trained again, and each row says how many steps its averages cover."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
from conftest import tiny_config

from repae.train.metrics import json_line, truncate_log


def _strict_rows(path):
    def refuse(token):
        raise ValueError(f"non-strict JSON constant {token} in {path}")

    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def test_json_line_writes_non_finite_values_as_null():
    row = json.loads(json_line({"step": 3, "a": float("nan"), "b": float("inf"), "c": -float("inf"), "d": 1.5}))
    assert row == {"step": 3, "a": None, "b": None, "c": None, "d": 1.5}


def test_truncate_log_keeps_earlier_steps_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "x": NaN}\n{"step": 2, "x": 1.0}\n{"step": 3, "x": 2.0}\n{"step": 4, "x"')
    truncate_log(str(path), 2)
    assert _strict_rows(path) == [{"step": 1, "x": None}, {"step": 2, "x": 1.0}]
    truncate_log(str(tmp_path / "absent.jsonl"), 2)  # nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


@pytest.mark.slow
def test_resume_logs_each_step_once(tmp_path, ds_world):
    """4 steps (checkpoints at 2 and 4), then the step-4 checkpoint is lost and the run resumes at 2: the log
    holds steps 1..4 once, the re-trained 3 and 4 from the second run."""
    from repae.train.trainer import Trainer

    run = tmp_path / "run"
    extra = ("schedule.max_steps=4", "logging.log_every=1", "logging.ckpt_every=2", "logging.sample_every=0",
             "logging.keep_last=3")
    Trainer(tiny_config(run, *extra)).fit()
    first = _strict_rows(run / "log.jsonl")
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "step0000004")
    (ckpts / "latest").write_text("step0000002")
    trainer = Trainer(tiny_config(run, *extra))
    trainer.fit()
    rows = _strict_rows(run / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == first[:2]
    assert all(r["log/window_steps"] == 1 for r in rows)
    assert all(v is None or not isinstance(v, float) or math.isfinite(v) for r in rows for v in r.values())
    assert [s for s, _ in trainer.history["sit/loss"]] == [1, 2, 3, 4]
    assert os.path.isfile(run / "log.jsonl") and not os.path.exists(str(run / "log.jsonl") + ".tmp")
