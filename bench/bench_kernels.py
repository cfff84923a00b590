"""Microbenchmarks of the three fused kernels against eager PyTorch and torch.compile at the real
shapes (bench/shapes.py). Timing: timing.time_ms (triton.testing.do_bench, L2 flushed between calls),
p50/p20/p80, once per case. GB/s from the minimal bytes each case must move; roofline against the copy
bandwidth measured this session (the `hbm` fixture of bench/conftest.py). Never asserts speed."""

import pytest
from harness import CASE_BUILDERS, MODES, PROVIDERS
from shapes import BENCH_CASES
from timing import time_ms

CASES = [(op, name) for op, cases in BENCH_CASES.items() for name in cases]


@pytest.mark.bench
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op,case", CASES, ids=[f"{op}-{name}" for op, name in CASES])
def test_bench_kernel(op, case, provider, mode, hbm, record):
    bench = CASE_BUILDERS[op](provider, mode, *BENCH_CASES[op][case], device="cuda")
    ms = time_ms(bench)
    gbps = bench.nbytes / (ms[0] * 1e6)
    record(op=op, case=case, provider=provider, mode=mode, ms=ms, gbps=gbps, roofline=gbps / hbm["copy_gbps"],
           nbytes=bench.nbytes)
