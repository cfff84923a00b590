"""Non-finite losses: a skipped update leaves every weight and buffer of its model as it was (latent-BN
statistics, discriminator BN, EMA), and the skip decision is the same on every rank (two gloo ranks with a
NaN on one rank only: both skip, nobody hangs, both stop together after logging.nan_patience)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
if importlib.util.find_spec("lpips") is None:
    pytest.skip("lpips is not installed", allow_module_level=True)
from conftest import tiny_config
from test_main import clean_env
from test_step import make_inputs

from repae.train.main import _free_port
from repae.train.step import StepInputs


def _state(trainer) -> dict[str, torch.Tensor]:
    """Every weight and buffer the step can touch (the three models and the EMA)."""
    state = {f"{k}.{n}": v.detach().clone()
             for k, e in trainer.engines.items() for n, v in e.module.state_dict().items()}
    state.update({f"ema.{n}": v.detach().clone() for n, v in trainer.ema.state_dict().items()})
    return state


def test_nan_latent_batch_leaves_every_buffer_and_the_ema_as_they_were(tmp_path, ds_world):
    """NaN posterior noise makes z NaN: all three losses are non-finite, every update is skipped, and the
    SiT's latent-BN statistics, the discriminator's BN and the EMA keep their values (finite); the next
    finite step trains normally."""
    from repae.train.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path / "run"))
    trainer.run_step(make_inputs(trainer, seed=0))  # the BN statistics and the EMA have moved once
    before = _state(trainer)
    inputs = make_inputs(trainer, seed=1)
    bad = StepInputs(**{**inputs.__dict__, "posterior_noise": torch.full_like(inputs.posterior_noise, float("nan"))})
    logs = trainer.run_step(bad)
    assert [float(logs[f"{k}/skipped"]) for k in ("vae", "disc", "sit")] == [1.0, 1.0, 1.0]
    after = _state(trainer)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"a skipped step changed {changed}"
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    logs = trainer.run_step(inputs)
    assert [float(logs[f"{k}/skipped"]) for k in ("vae", "disc", "sit")] == [0.0, 0.0, 0.0]
    moved = _state(trainer)
    assert not torch.equal(moved["sit.bn.running_mean"], after["sit.bn.running_mean"])
    assert not torch.equal(moved["ema.bn.running_mean"], after["ema.bn.running_mean"])


def test_nan_flow_noise_skips_the_sit_and_vae_and_keeps_their_statistics(tmp_path, ds_world):
    """NaN flow noise: the SiT loss and the VAE loss (its align term runs the SiT on the same noise) are
    non-finite; the latent-BN statistics (updated inside the SiT forward, before the check) and the EMA are
    put back, while the discriminator (real x and the finite x_hat) trains."""
    from repae.train.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path / "run"))
    inputs = make_inputs(trainer, seed=0)
    before = _state(trainer)
    logs = trainer.run_step(StepInputs(**{**inputs.__dict__, "noise": torch.full_like(inputs.noise, float("nan"))}))
    assert [float(logs[f"{k}/skipped"]) for k in ("vae", "disc", "sit")] == [1.0, 0.0, 1.0]
    after = _state(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("sit.", "ema.", "vae.")))
    assert not torch.equal(before["disc.main.0.weight"], after["disc.main.0.weight"])


SCRIPT = r'''
import json, os, sys, torch
sys.path.insert(0, sys.argv[2])
os.environ.setdefault("DS_ACCELERATOR", "cpu")
from repae.train.main import finish_distributed, init_distributed
init_distributed()
from conftest import tiny_config
from repae.train.step import StepInputs
from repae.train.trainer import RunStopped, Trainer
bad_steps = json.loads(sys.argv[3])
t = Trainer(tiny_config(sys.argv[1], "logging.nan_patience=2", "logging.sample_every=0"))
rows = []
try:
    for step in range(4):
        inputs = t.next_inputs()
        if t.rank == 1 and step in bad_steps:  # this rank only: its SiT loss becomes NaN
            inputs = StepInputs(**{**inputs.__dict__, "noise": torch.full_like(inputs.noise, float("nan"))})
        logs = t.run_step(inputs)
        rows.append({k: float(v) for k, v in logs.items() if k.endswith("skipped")})
    stopped = None
except RunStopped as err:
    stopped = str(err)
bn = t.models.sit.module.bn
# one file per rank: the ranks share stdout, where two lines can interleave
with open(os.path.join(sys.argv[4], f"result_rank{t.rank}.json"), "w") as f:
    json.dump({"rank": t.rank, "rows": rows, "stopped": stopped,
               "bn_finite": bool(torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()),
               "ema_finite": all(bool(torch.isfinite(v).all()) for v in t.ema.state_dict().values()
                                 if v.is_floating_point())}, f)
finish_distributed()
'''


def _two_ranks(tmp_path: Path, bad_steps: list[int]) -> dict[int, dict]:
    script = tmp_path / "nan_run.py"
    script.write_text(SCRIPT)
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(script), str(tmp_path / "run"), str(Path(__file__).resolve().parent),
           json.dumps(bad_steps), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # a hang fails, bounded
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("result_rank*.json"))]
    return {r["rank"]: r for r in results}


@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_by_both(tmp_path):
    res = _two_ranks(tmp_path, bad_steps=[1])
    assert sorted(res) == [0, 1]
    assert res[0]["rows"] == res[1]["rows"]
    assert [r["sit/skipped"] for r in res[0]["rows"]] == [0.0, 1.0, 0.0, 0.0]
    assert all(r["bn_finite"] and r["ema_finite"] and r["stopped"] is None for r in res.values())


@pytest.mark.slow
def test_nan_on_one_rank_stops_both_after_the_patience(tmp_path):
    res = _two_ranks(tmp_path, bad_steps=[1, 2, 3])
    assert sorted(res) == [0, 1]
    for r in res.values():
        assert r["stopped"] is not None and "2 consecutive non-finite sit losses up to step 3" in r["stopped"], r
        assert r["bn_finite"] and r["ema_finite"]
