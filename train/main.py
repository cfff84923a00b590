"""Entry point: `deepspeed train/main.py --config configs/sitxl_repae.json [--set key=value ...]`.

Also runs as `python train/main.py ...` (one process) and `torchrun --nproc_per_node N train/main.py ...`.
Resumes from <run_dir>/checkpoints/latest when it exists (--no-resume starts over in a new run_dir only).
Errors in the config (unknown key, bad value, missing file or folder) are one line naming the key.

Exit codes: 0 the run reached schedule.max_steps; 2 a config or input error (one line); 3 stopped on purpose
(too many non-finite losses); EXIT_INTERRUPTED = 143 stopped early by SIGTERM/SIGINT or by its launcher
exiting, after the checkpoint of the step it stopped at (the same command resumes). 143 = 128 + SIGTERM, what
a shell shows for a process killed by SIGTERM, so a preempted run reads the same whether its stop completed
or it was killed (only a completed stop has the checkpoint of the stop step).
What the launchers return (details in train/preemption.py): `python` the worker's code. `deepspeed` on one
node, when the runner alone is signalled: the runner forwards nothing and dies at once (a signal death, 143
in a shell); the workers see it gone, checkpoint and exit 143, which deepspeed.launcher.launch logs ("exits
with return code = 143") and returns. When deepspeed.launcher.launch is signalled too (process group, Ctrl-C,
a scheduler): it SIGTERMs the workers, SIGKILLs them after 30 s and exits 1. `torchrun` forwards the signal,
waits for the workers (--shutdown_timeout, 30 s) and exits 1. A second SIGTERM/SIGINT during the stop is
logged and ignored; SIGKILL aborts, and the previous complete checkpoint is the one resumed.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

EXIT_INTERRUPTED = 143
"""Exit status of a run stopped before schedule.max_steps by a signal or its launcher exiting, checkpoint written."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="REPA-E training on DeepSpeed: end to end (SiT + VAE + discriminator), or "
                                            "the LDM-only stage on a frozen VAE (config stage=ldm)")
    p.add_argument("--config", required=True, help="run JSON (configs/*.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set loss.proj_coeff=0.5 (repeatable)")
    p.add_argument("--no-resume", action="store_true", help="refuse to resume: the run_dir must have no checkpoint")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def init_distributed() -> None:
    """deepspeed.init_distributed with NCCL on GPUs, gloo on CPU; single-process defaults when not launched."""
    import torch

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not torch.cuda.is_available():
        # The CPU shared-memory allreduce extension takes about a minute to build; gloo is enough here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def finish_distributed() -> None:
    """Destroy the process group after a run every rank finished together, as PyTorch asks of a normal exit (the
    backend's work and threads end before the interpreter tears down)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None) -> int:
    from repae.train.preemption import launcher_chain

    launcher_chain()  # record the launcher processes to watch now, while they are surely alive
    args = parse_args(argv)
    from repae.train.config import load_config

    try:
        cfg = load_config(args.config, args.set)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.no_resume and os.path.exists(os.path.join(cfg.logging.run_dir, "checkpoints", "latest")):
        print(f"error: --no-resume but {cfg.logging.run_dir} already holds a checkpoint", file=sys.stderr)
        return 2
    import repae.kernels
    from repae.train.trainer import RunStopped, Trainer

    repae.kernels.set_backend(cfg.kernel_backend)
    init_distributed()
    try:
        trainer = Trainer(cfg)
        trainer.fit()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 3
    finish_distributed()
    if trainer.stopped_by is not None:
        if trainer.rank == 0:
            print(f"interrupted: stopped by {trainer.stopped_by} at step {trainer.step} after its checkpoint; "
                  f"the same command resumes (exit code {EXIT_INTERRUPTED})", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
