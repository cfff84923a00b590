"""Two ranks (gloo, CPU) with global batch 2b give the same run as one rank with batch 2b: same data, same
draws (both are global-batch based), latent BN statistics all-reduced, gradients averaged by DeepSpeed.
The discriminator's BatchNorm is per rank in REPA-E; the test turns on loss.sync_discriminator_bn so
the whole update is comparable. Tolerances (fp32; the gradient all-reduce sums in another order): the
losses of both steps 2e-5 relative (measured 2e-7; step 2 sees the weights after step 1); weights after
2 steps: mean |difference| below 1e-6 and none above 2.5 lr (Adam's early steps are about lr * sign(g),
so a gradient within rounding of 0 moves its weight either way: measured 5% of the VAE's elements by
more than 1e-6 after 2 steps, 0.02% after 1); BN running statistics 1e-6 absolute / 1e-5 relative."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
if importlib.util.find_spec("lpips") is None:  # its shipped weights file only (importing it needs scipy)
    pytest.skip("lpips is not installed", allow_module_level=True)
from test_main import clean_env
from test_step import LR

from repae.train.main import _free_port

SCRIPT = r'''
import os, sys, torch
sys.path.insert(0, sys.argv[3])
os.environ.setdefault("DS_ACCELERATOR", "cpu")
from repae.train.main import finish_distributed, init_distributed
init_distributed()
from conftest import tiny_config
from repae.train.trainer import Trainer
cfg = tiny_config(sys.argv[1], "schedule.max_steps=2", "logging.sample_every=0", "logging.log_every=1",
                  "loss.sync_discriminator_bn=true", *sys.argv[4:])
t = Trainer(cfg)
t.fit()
if t.rank == 0:
    state = {f"{k}.{n}": v for k, e in t.engines.items() for n, v in e.module.state_dict().items()}
    state.update({f"ema.{n}": v for n, v in t.ema.state_dict().items()})
    torch.save(state, sys.argv[2])
finish_distributed()
'''


def run(tmp_path: Path, nproc: int, *overrides: str) -> dict:
    out = tmp_path / f"state{nproc}.pt"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), str(script), str(tmp_path / f"run{nproc}"), str(out),
           str(Path(__file__).resolve().parent), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_two_ranks_equal_one_rank(tmp_path):
    one, two = run(tmp_path, 1), run(tmp_path, 2)
    logs = {n: [json.loads(line) for line in open(tmp_path / f"run{n}" / "log.jsonl")] for n in (1, 2)}
    assert [r["step"] for r in logs[1]] == [r["step"] for r in logs[2]] == [1, 2]
    for a, b in zip(logs[1], logs[2]):  # the step-2 losses see the weights after step 1
        for key in ("vae/loss", "vae/align_loss", "disc/discriminator_loss", "sit/loss", "sit/proj_loss"):
            assert abs(a[key] - b[key]) <= 2e-5 * abs(a[key]) + 1e-7, (a["step"], key, a[key], b[key])
    assert one.keys() == two.keys()
    for prefix in ("sit.", "vae.", "disc.", "ema."):
        keys = [k for k in one if k.startswith(prefix) and one[k].is_floating_point() and "running" not in k]
        diffs = torch.cat([(two[k] - one[k]).abs().flatten() for k in keys])
        assert diffs.mean() < 1e-6 and diffs.max() <= 2.5 * LR, (prefix, diffs.mean().item(), diffs.max().item())
    for k in one:
        if "running" in k:  # latent BN (all-reduced by the kernel hook) and the synced discriminator BN
            torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
        elif not one[k].is_floating_point():
            assert torch.equal(two[k], one[k]), k
