"""The few collective decisions the trainer makes, each taken so that every rank reaches the same answer and
none waits in a barrier the others never enter. Single-process runs (no process group) skip every collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def log0(msg: str) -> None:
    """One line on rank 0's stdout, prefixed [repae]."""
    if rank() == 0:
        print(f"[repae] {msg}", flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_max(code: int, device: torch.device) -> int:
    """The largest of the ranks' integer codes (one 1-element all-reduce when there is more than one rank)."""
    if world_size() == 1:
        return code
    t = torch.tensor([float(code)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_mean(vec: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a float vector (in place, one all-reduce)."""
    if world_size() > 1:
        dist.all_reduce(vec)
        vec /= world_size()
    return vec


def first_failure(failure: str | None, device: torch.device) -> str | None:
    """The first failure text of any rank, suffixed with its rank (None: every rank succeeded)."""
    if world_size() == 1:
        return failure
    flag = torch.tensor([0.0 if failure is None else 1.0], device=device)
    dist.all_reduce(flag)
    if float(flag) == 0:
        return None
    texts = [None] * world_size()
    dist.all_gather_object(texts, failure)
    return next((f"{t} (rank {r})" for r, t in enumerate(texts) if t is not None), None)


def on_rank0(fn, device: torch.device, errors: type[Exception] = ValueError):
    """fn() on rank 0, its result on every rank; an `errors` exception raised there is raised on every rank."""
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except errors as err:
            error = err
    if world_size() > 1:
        box = [result, None if error is None else str(error)]
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        result, error = box[0], (None if box[1] is None else errors(box[1]))
    if error is not None:
        raise error
    return result
