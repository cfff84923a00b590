"""train/main.py as a user runs it: bad config keys, a missing data folder or weight file are one-line
errors naming them (exit code 2); SIGTERM writes a checkpoint and exits EXIT_INTERRUPTED (143), and the same
command resumes (the other launchers: test_signals.py)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONFIGS

from repae.train.main import EXIT_INTERRUPTED

pytest.importorskip("deepspeed")
if importlib.util.find_spec("lpips") is None:  # its shipped weights file only (importing it needs scipy)
    pytest.skip("lpips is not installed", allow_module_level=True)

MAIN = Path(__file__).resolve().parents[2] / "train" / "main.py"
TINY = ["--config", str(CONFIGS / "tiny_cpu.json"), "--set", "schedule.global_batch_size=4",
        "--set", "logging.tensorboard=false", "--set", "logging.sample_every=0"]


_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def clean_env() -> dict:
    """This process's environment without the distributed variables an in-process test world may have set
    (a child would otherwise try to listen on the parent's MASTER_PORT)."""
    return {**{k: v for k, v in os.environ.items() if k not in _DIST_VARS}, "DS_ACCELERATOR": "cpu"}


def run_main(*args, timeout=300):
    env = clean_env()
    return subprocess.run([sys.executable, str(MAIN), *TINY, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.parametrize("override,message", [
    ("loss.proj_coef=0.5", "error: unknown config key loss.proj_coef"),
    ("data.source=folder", "error: config key data.root: "),
    ("vae.weights=/nowhere/vae.pt", "error: config key vae.weights: /nowhere/vae.pt does not exist"),
    ("encoder.allow_random=false", "error: DINOv2 weights for enc_type 'dinov2-vit-s' not found"),
])
def test_errors_are_one_line_naming_the_key(tmp_path, override, message):
    extra = ["--set", f"logging.run_dir={tmp_path}", "--set", override]
    if override == "data.source=folder":
        extra += ["--set", f"data.root={tmp_path / 'no_images'}"]
    proc = run_main(*extra)
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith(message), proc.stderr[-2000:]


def test_sigterm_checkpoints_and_the_same_command_resumes(tmp_path):
    env = clean_env()
    args = [sys.executable, str(MAIN), *TINY, "--set", f"logging.run_dir={tmp_path}", "--set", "logging.log_every=1",
            "--set", "schedule.max_steps=200", "--set", "logging.ckpt_every=1000"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while not (tmp_path / "log.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    step = int(latest.removeprefix("step"))
    assert 1 <= step < 200 and "stopped by SIGTERM at step" in out + err
    resumed = run_main("--set", f"logging.run_dir={tmp_path}", "--set", f"schedule.max_steps={step + 1}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {tmp_path / 'checkpoints' / latest}" in resumed.stdout
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step{step + 1:07d}"
