"""train/preemption.py in one process: the stop request (first signal wins, a repeat is logged and ignored,
the previous handlers come back), the launcher watch, and the DataLoader worker shield (a SIGTERM from anyone
but the parent and every SIGINT are ignored; the parent's SIGTERM ends the worker). The launchers themselves:
test_signals.py."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time

import pytest

from repae.train.preemption import LAUNCHER_GONE, StopRequest, describe, launcher_gone, shield_loader_worker


def _deliver(sig: int) -> None:
    """Send sig to this process and let the interpreter run its Python handler."""
    os.kill(os.getpid(), sig)
    for _ in range(100):  # the handler runs at the next bytecode boundary; sleep gives it several
        time.sleep(0.001)


def test_first_signal_wins_and_a_repeat_is_ignored(capfd):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = StopRequest(rank=3)
    stop.chain = ()  # watch no launcher (pytest may run under one)
    assert stop.poll() == 0
    stop.install()
    try:
        _deliver(signal.SIGTERM)
        assert stop.poll() == signal.SIGTERM and describe(stop.poll()) == "SIGTERM"
        _deliver(signal.SIGINT)
        assert stop.poll() == signal.SIGTERM  # the reason stays the first one
    finally:
        stop.uninstall()
    err = capfd.readouterr().err
    assert "[repae] rank 3: SIGTERM: stopping after this step (checkpoint, then exit)" in err
    assert "[repae] rank 3: SIGINT again: ignored, the stop is under way" in err
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_launcher_watch():
    assert not launcher_gone(())  # a plain `python train/main.py` watches nothing
    assert not launcher_gone((os.getppid(),))
    assert launcher_gone((os.getppid() + 1,))  # not our parent any more: the launcher exited, we were reparented
    stop = StopRequest()
    stop.chain = (os.getppid() + 1,)
    assert stop.poll() == LAUNCHER_GONE and describe(LAUNCHER_GONE) == "the launcher exiting"


def _shielded_worker(ready) -> None:
    shield_loader_worker(0)
    ready.set()
    while True:
        time.sleep(0.05)


def _wait_exit(proc, seconds: float) -> bool:
    proc.join(seconds)
    return not proc.is_alive()


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="needs sigwaitinfo (Linux)")
def test_loader_worker_ignores_strangers_and_obeys_its_parent():
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_shielded_worker, args=(ready,), daemon=True)
    proc.start()
    try:
        assert ready.wait(30)
        subprocess.run(["kill", "-TERM", str(proc.pid)], check=True)  # sent by a stranger (the kill process)
        os.kill(proc.pid, signal.SIGINT)  # SIGINT from anyone: ignored
        assert not _wait_exit(proc, 1.0), f"the worker died of a stranger's signal (exit code {proc.exitcode})"
        os.kill(proc.pid, signal.SIGTERM)  # its parent ends it
        assert _wait_exit(proc, 10.0) and proc.exitcode == 0, proc.exitcode
    finally:
        if proc.is_alive():
            proc.kill()
