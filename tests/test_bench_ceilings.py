"""The roofline's bookkeeping in bench/ceilings.py on fake timings: a copy's GB/s counts the bytes read and the
bytes written, and the spec-sheet table finds the GPU's own part (an H100 PCIe or NVL is not read as the SXM).
It runs in a subprocess: the tests do not import bench/ modules."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
NAMES = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA A10G"]
CODE = f"""
import json
from ceilings import bandwidth_row
print(json.dumps([bandwidth_row(name, 2**30, (1.0, 0.9, 1.2)) for name in {NAMES!r}]))
"""


def test_bandwidth_row_on_fake_timings():
    proc = subprocess.run([sys.executable, "-c", CODE], cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.splitlines()[-1])
    assert [r["gpu"] for r in rows] == NAMES
    assert [r["nominal_gbps"] for r in rows] == [3350.0, 2000.0, 3900.0, 4800.0, None]
    gbps = 2 * 2**30 / 1e6  # 1 GiB read and 1 GiB written in the p50 of 1 ms
    assert all(r["copy_gbps"] == pytest.approx(gbps) and r["copy_ms"] == [1.0, 0.9, 1.2] for r in rows)
    assert rows[0]["fraction_of_nominal"] == pytest.approx(gbps / 3350.0)
    assert rows[-1]["fraction_of_nominal"] is None
