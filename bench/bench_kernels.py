"""Microbenchmarks of the three fused kernels against eager PyTorch and torch.compile at the real
shapes (bench/shapes.py). Timing: triton.testing.do_bench (L2 flushed between calls), p50/p20/p80;
pytest-benchmark times the same closure (synchronized) for its own report. Never asserts speed."""

import pytest
import torch
from harness import CASE_BUILDERS, MODES, PROVIDERS
from shapes import BENCH_CASES, hbm_gbps

CASES = [(op, name) for op, cases in BENCH_CASES.items() for name in cases]


@pytest.mark.bench
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op,case", CASES, ids=[f"{op}-{name}" for op, name in CASES])
def test_bench_kernel(op, case, provider, mode, benchmark, record):
    import triton.testing

    bench = CASE_BUILDERS[op](provider, mode, *BENCH_CASES[op][case], device="cuda")
    p50, p20, p80 = triton.testing.do_bench(bench.fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=bench.grad_to_none)
    gbps = bench.nbytes / (p50 * 1e6)
    roof = hbm_gbps(torch.cuda.get_device_name())
    benchmark.extra_info.update(p50_ms=p50, gbps=gbps, roofline=gbps / roof)

    def synced():
        bench.fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=50, warmup_rounds=5)
    record(op=op, case=case, provider=provider, mode=mode, ms=(p50, p20, p80), gbps=gbps, roofline=gbps / roof,
           nbytes=bench.nbytes)
