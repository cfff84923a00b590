"""The card's two ceilings, measured: device-to-device copy bandwidth (bytes read + written) and the bf16
matmul rate (8192^3 on random data). The benchmarks' roofline and MFU columns are read against these.

    python bench/ceilings.py bench/results/<gpu>/hw.json
"""

from __future__ import annotations

import datetime
import json
import sys

import torch


def _time_ms(fn, iters: int) -> float:
    """Median of `iters` event-timed calls after three warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def measure() -> dict:
    import triton

    n = 2**30  # 4 GiB of fp32 each way: far past the L2
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = _time_ms(lambda: dst.copy_(src), 20)
    src = dst = None  # free the 8 GiB before the matmuls
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    mm_ms = _time_ms(lambda: a @ b, 20)
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "copy_gbps": 2 * n * 4 / (copy_ms * 1e6),
        "bf16_matmul_tflops": 2 * m**3 / (mm_ms * 1e9),
        "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
    }


if __name__ == "__main__":
    row = measure()
    print(json.dumps(row, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(row, f, indent=1)
