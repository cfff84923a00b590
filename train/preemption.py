"""Stop requests of a training process: SIGTERM/SIGINT, and the launcher that started it going away.

What each launcher does with a signal (DeepSpeed 0.19, torch 2.13; launcher/runner.py, launcher/launch.py,
torch/distributed/elastic/multiprocessing/api.py):

    deepspeed train/main.py     runner (bin/deepspeed) -> python -m deepspeed.launcher.launch -> one worker per rank
        SIGTERM/SIGINT to the runner: on one node it has no handler (its forwarding handler is for multi-node
        PDSH runs only), so it dies alone; deepspeed.launcher.launch is reparented and goes on waiting, and
        the workers would train on unsupervised. Hence the watch below.
        SIGTERM/SIGINT to deepspeed.launcher.launch (a process-group signal: Ctrl-C, a scheduler): it sends
        SIGTERM to every process below it, the DataLoader workers included, SIGKILLs what is left after 30 s
        (fixed), and exits 1.
    torchrun train/main.py      SIGTERM/SIGINT/SIGHUP/SIGQUIT are forwarded (the same signal) to the workers, which
        are SIGKILLed after --shutdown_timeout (default 30 s); torchrun then exits 1 (SignalException).
    python train/main.py        the signal reaches the trainer only.

So the trainer stops after the current step on SIGTERM or SIGINT (StopRequest), and a worker started by a
launcher also watches it: the launcher processes above it (deepspeed.launcher.launch and the deepspeed runner
above it, or torchrun) are recorded at start-up, and when one of them has exited the worker stops as on
SIGTERM. A plain `python train/main.py` watches nothing (nohup and a closed shell must not stop a run).
A repeated signal while the stop is under way (the checkpoint write) is logged and changes nothing: the
launchers send their own SIGTERM after the scheduler's, so a repeat must not abort the write. SIGKILL aborts;
the write is atomic (temp folder, rename, `latest` last), so the previous checkpoint stays the one resumed.
DataLoader workers ignore SIGINT and any SIGTERM not sent by their parent (`shield_loader_worker`): a group or
process-tree signal would kill them and the trainer's SIGCHLD handler would raise mid-step, before the checkpoint.

This file holds no checkpoint or collective code: the trainer polls `StopRequest.poll()` once per step and
all-reduces the codes (MAX), so every rank stops at the same step for the same reason.
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LAUNCHER_GONE = 1
"""Stop code of a vanished launcher; a signal's code is its number. The largest code of all ranks is the reason."""


def describe(code: int) -> str:
    """The reason a stop code stands for: 'SIGTERM', 'SIGINT', 'the launcher exiting'."""
    return "the launcher exiting" if code == LAUNCHER_GONE else signal.Signals(code).name


@functools.cache
def launcher_chain() -> tuple[int, ...]:
    """Pids of the launcher processes above this one, nearest first: (deepspeed.launcher.launch, the deepspeed
    runner or the remote shell of a multi-node run) or (torchrun,); () when neither started this process.

    Cached: the first call records the chain, so main.py makes it at start-up, while the chain is intact."""
    try:
        import psutil  # a dependency of deepspeed
    except ImportError:
        return ()
    try:
        parent = psutil.Process(os.getppid())
        cmd = " ".join(parent.cmdline())
        if "deepspeed.launcher.launch" in cmd:
            grand = parent.parent()
            if grand is not None and "deepspeed" in " ".join(grand.cmdline()):
                return parent.pid, grand.pid
            return (parent.pid,)
        if any(name in cmd for name in ("torchrun", "torch.distributed.run", "torch.distributed.launch")):
            return (parent.pid,)
    except psutil.Error:  # the parent is already gone, or not ours to read
        pass
    return ()


def launcher_gone(chain: tuple[int, ...]) -> bool:
    """True once a process of `chain` has exited. Parent links are compared, not pids: an exited process's
    children are reparented at once, so neither a zombie nor a reused pid hides the exit.
    PERF: one getppid and at most one /proc/<pid>/stat read per step."""
    if not chain:
        return False
    if os.getppid() != chain[0]:
        return True
    import psutil

    for child, parent in itertools.pairwise(chain):
        try:
            if psutil.Process(child).ppid() != parent:
                return True
        except psutil.NoSuchProcess:
            return True
    return False


class StopRequest:
    """SIGTERM/SIGINT handlers and the launcher watch of one training process; `poll()` says whether to stop."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.code = 0  # 0 = go on; else a signal number or LAUNCHER_GONE (the first request wins)
        self.chain = launcher_chain()
        self._previous: dict[int, object] = {}

    def _say(self, text: str) -> None:
        # os.write, not print: a handler that prints while the interrupted code prints raises "reentrant call".
        # Rank 0 starts a new line: its progress bar on stderr holds an unfinished one.
        lead = "\n" if self.rank == 0 else ""
        os.write(2, f"{lead}[repae] rank {self.rank}: {text}\n".encode())

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.code:
            self._say(f"{name} again: ignored, the stop is under way (SIGKILL aborts; the last complete checkpoint "
                      "stays)")
            return
        self.code = signum
        self._say(f"{name}: stopping after this step (checkpoint, then exit)")

    def install(self) -> None:
        """Install the handlers (main thread only); `uninstall` puts the previous ones back."""
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handler)

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def poll(self) -> int:
        """This process's stop code: the first signal received, else LAUNCHER_GONE once a launcher exited, else 0."""
        if not self.code and launcher_gone(self.chain):
            self.code = LAUNCHER_GONE
            self._say(f"launcher process gone (watched pids {', '.join(map(str, self.chain))}): stopping after this "
                      "step as on SIGTERM")
        return self.code


def _exit_on_sigterm_from_parent() -> None:
    parent = os.getppid()
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:  # the trainer ending its loader (multiprocessing's terminate at exit)
            os._exit(0)  # what torch's own worker SIGTERM handler does for its parent


def shield_loader_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: SIGINT is ignored and a SIGTERM counts only when the parent (the trainer)
    sends it; the trainer decides when its loader ends. The worker still ends with the trainer (its loader
    shutdown, torch's parent watchdog within 5 s) and on SIGKILL."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM stays pending (blocked in this thread and in every thread started from here) until the
    # thread below takes it with its sender's pid; a Python handler could not tell the sender.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from_parent, name="sigterm-from-parent", daemon=True).start()
