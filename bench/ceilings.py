"""The card's two ceilings, measured: device-to-device copy bandwidth (bytes read + written) and the bf16
matmul rate (8192^3 on random data). The benchmarks' roofline and MFU columns are read against these.

`pytest bench/` measures the copy bandwidth once per session (bench/conftest.py) and reads every roofline
column against that number; the nominal figure of the spec sheet is kept beside it for comparison only.

    python bench/ceilings.py bench/results/<gpu>/hw.json
"""

from __future__ import annotations

import datetime
import json
import sys

import torch
from timing import BenchFn, time_ms

from repae.model.flops import gpu_spec_for

COPY_BYTES = 2 * 2**30  # 2 GiB each way: far past the L2 (50 MB on H100)


def nominal_hbm_gbps(device_name: str) -> float | None:
    """The spec-sheet bandwidth of the named GPU (model/flops.py: GPU_SPECS), None when the table does not know it."""
    spec = gpu_spec_for(device_name)
    return spec.hbm_gbps if spec is not None else None


def bandwidth_row(device_name: str, nbytes: int, ms: tuple[float, float, float]) -> dict:
    """The bandwidth record of one copy of `nbytes` that took `ms` = (p50, p20, p80): GB/s counts the bytes
    read and the bytes written (2 * nbytes), from the median."""
    gbps = 2 * nbytes / (ms[0] * 1e6)
    nominal = nominal_hbm_gbps(device_name)
    return {
        "gpu": device_name,
        "copy_bytes": nbytes,
        "copy_ms": list(ms),
        "copy_gbps": gbps,
        "nominal_gbps": nominal,
        "fraction_of_nominal": None if nominal is None else gbps / nominal,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def measure_copy_bandwidth(nbytes: int = COPY_BYTES) -> dict:
    """Time `dst.copy_(src)` of two `nbytes` buffers on the current GPU (timed as every benchmark is, by
    timing.time_ms) and return its bandwidth_row. Frees the buffers before it returns."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(BenchFn(lambda: dst.copy_(src), 2 * nbytes, []))
    src = dst = None  # free the buffers before the benchmarks allocate theirs
    torch.cuda.empty_cache()
    return bandwidth_row(torch.cuda.get_device_name(), nbytes, ms)


def measure() -> dict:
    """Both ceilings and the card's facts, the content of hw.json."""
    import triton

    row = measure_copy_bandwidth()
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    mm_ms = time_ms(BenchFn(lambda: a @ b, 3 * m * m * 2, []))[0]
    props = torch.cuda.get_device_properties(0)
    return row | {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "bf16_matmul_tflops": 2 * m**3 / (mm_ms * 1e9),
        "memory_gib": props.total_memory / 2**30,
        "sm_count": props.multi_processor_count,
    }


if __name__ == "__main__":
    hw = measure()
    print(json.dumps(hw, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(hw, f, indent=1)
