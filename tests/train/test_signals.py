"""SIGTERM through each launcher (train/preemption.py): the worker checkpoints the step it stopped at, exits
EXIT_INTERRUPTED (143), leaves no process behind within a bounded time, and the same command resumes.

deepspeed, signal to the runner alone: the runner forwards nothing on one node and dies at once (-SIGTERM);
the workers see it gone and stop; deepspeed.launcher.launch logs and returns their 143. deepspeed, signal to
the process group (Ctrl-C, a scheduler): deepspeed.launcher.launch also SIGTERMs the whole process tree (a
repeat for the workers, a first signal for the DataLoader workers, which must survive it). torchrun: it
forwards the signal to the workers and exits 1. The plain `python` case is in test_main.py.
Every wait is bounded; a failing test kills the processes it started (by pid)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
if importlib.util.find_spec("lpips") is None:  # its shipped weights file only (importing it needs scipy)
    pytest.skip("lpips is not installed", allow_module_level=True)
import psutil
from test_main import MAIN, TINY, clean_env

from repae.train.main import EXIT_INTERRUPTED, _free_port

DEEPSPEED = Path(sys.executable).with_name("deepspeed")
RUN = [*TINY, "--set", "logging.log_every=1", "--set", "logging.ckpt_every=1000"]
TIMEOUT = 240  # s, per wait: start-up to the first logged step, and the stop to the exit of every process


def command(launcher: str, run_dir: Path, max_steps: int, *extra: str, nproc: int = 1) -> list[str]:
    port = str(_free_port())
    pre = {"deepspeed": [str(DEEPSPEED), "--num_gpus", str(nproc), "--master_port", port],
           "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                        "--master_port", port]}[launcher]
    return [*pre, str(MAIN), *RUN, "--set", f"logging.run_dir={run_dir}", "--set", f"schedule.max_steps={max_steps}",
            *extra]


def env(nproc: int) -> dict:
    # LOCAL_SIZE: the device count of DeepSpeed's CPU accelerator (else the NUMA node count)
    return {**clean_env(), "OMP_NUM_THREADS": "1", "LOCAL_SIZE": str(nproc)}


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running (a zombie has exited: only its parent has not reaped it yet)."""
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


def kill(procs: list[psutil.Process]) -> None:
    for p in alive(procs):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def stop_after_first_step(launcher: str, run_dir: Path, *extra: str, to_group: bool = False, nproc: int = 1):
    """Start a 200-step run, SIGTERM the launcher (or its process group) once a step is logged; returns the
    launcher's return code and output once every process it started has exited (bounded waits)."""
    proc = subprocess.Popen(command(launcher, run_dir, 200, *extra, nproc=nproc), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env(nproc), start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (run_dir / "log.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if proc.poll() is not None or not (run_dir / "log.jsonl").exists():
            proc.kill()
            pytest.fail(f"no step logged (rc {proc.poll()}):\n{proc.communicate(timeout=30)[0][-3000:]}")
        tree = psutil.Process(proc.pid).children(recursive=True)  # launch/agent, workers, DataLoader workers
        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=TIMEOUT)  # EOF once every process holding the pipe has exited
        deadline = time.monotonic() + 30
        while alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(tree), f"left running: {[p.pid for p in alive(tree)]}\n{out[-3000:]}"
        return proc.returncode, out
    finally:  # a failure above: end what this test started (no-ops after a clean run)
        if proc.poll() is None:
            proc.kill()
        kill(tree)


def checkpoint_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step"))


def test_deepspeed_runner_sigterm_checkpoints_exits_143_and_the_same_command_resumes(tmp_path):
    rc, out = stop_after_first_step("deepspeed", tmp_path)
    assert rc == -signal.SIGTERM, out[-3000:]  # the runner itself dies by the signal (a shell shows 143)
    assert "stopped by the launcher exiting at step" in out, out[-3000:]
    assert f"exits with return code = {EXIT_INTERRUPTED}" in out, out[-3000:]  # the worker's code, per the launcher
    step = checkpoint_step(tmp_path)
    assert 1 <= step < 200
    resumed = subprocess.run(command("deepspeed", tmp_path, step + 1), capture_output=True, text=True,
                             env=env(1), timeout=TIMEOUT, check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints' / f'step{step:07d}'}" in resumed.stdout
    assert checkpoint_step(tmp_path) == step + 1


def test_deepspeed_group_sigterm_with_loader_workers_checkpoints(tmp_path):
    """The scheduler's SIGTERM plus deepspeed.launcher.launch's own one to the whole tree: the DataLoader
    workers survive (else the trainer's SIGCHLD handler raises mid-step). The launcher's repeat arrives within
    milliseconds, usually before Python runs the handler, and CPython then runs it once for both; a repeat that
    comes later is logged and ignored (test_preemption.py checks that case)."""
    rc, out = stop_after_first_step("deepspeed", tmp_path, "--set", "data.num_workers=1", to_group=True)
    assert rc == -signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM at step" in out, out[-3000:]
    assert f"(exit code {EXIT_INTERRUPTED})" in out and "Traceback" not in out, out[-3000:]
    assert 1 <= checkpoint_step(tmp_path) < 200


def test_torchrun_sigterm_checkpoints(tmp_path):
    rc, out = stop_after_first_step("torchrun", tmp_path)
    assert rc == 1, out[-3000:]  # torchrun's SignalException after it forwarded the signal and the worker ended
    assert "stopped by SIGTERM at step" in out and f"(exit code {EXIT_INTERRUPTED})" in out, out[-3000:]
    assert 1 <= checkpoint_step(tmp_path) < 200


@pytest.mark.slow
def test_deepspeed_runner_sigterm_two_ranks_stop_at_the_same_step(tmp_path):
    """Two ranks under deepspeed: both see the runner gone (at possibly different steps); the MAX all-reduce
    stops both at one step, whose checkpoint holds both ranks' RNG states."""
    rc, out = stop_after_first_step("deepspeed", tmp_path, nproc=2)
    assert rc == -signal.SIGTERM, out[-3000:]
    assert f"exits with return code = {EXIT_INTERRUPTED}" in out, out[-3000:]
    step = checkpoint_step(tmp_path)
    folder = tmp_path / "checkpoints" / f"step{step:07d}"
    assert (folder / "rng_rank0.pt").exists() and (folder / "rng_rank1.pt").exists()
    assert out.count("[repae] stopped by the launcher exiting at step") == 1, out[-3000:]  # rank 0's line
