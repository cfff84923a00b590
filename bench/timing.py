"""What bench/ times and how: BenchFn (one call of the measured work, the bytes it must move, the leaves whose
.grad is reset) and time_ms, the one timer every benchmark and the bandwidth measurement use. Needs torch
and, when time_ms is called, triton; nothing of repae, so the ceilings do not depend on the kernels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class BenchFn:
    fn: Callable[[], object]  # one call of the measured work
    nbytes: int  # minimal HBM traffic of that work
    grad_to_none: list[torch.Tensor]  # leaves whose .grad is reset between calls


def time_ms(bench: BenchFn, *, warmup: int = 25, rep: int = 100) -> tuple[float, float, float]:
    """(p50, p20, p80) ms of one call of bench.fn: triton.testing.do_bench, CUDA events around each call, the L2
    flushed and bench.grad_to_none reset before each, `warmup` then `rep` ms of calls. The one timer of bench/."""
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(bench.fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8],
                                            grad_to_none=bench.grad_to_none)
    return p50, p20, p80
