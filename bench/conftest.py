"""pytest bench/: GPU microbenchmarks. Each row goes to bench/results/<gpu>/<op>.jsonl with the GPU,
versions, git sha and UTC date, and a table is printed at the end of the session."""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).resolve().parent / "results"
_rows: list[dict] = []


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU (on CPU the Triton interpreter times nothing real)")
    for item in items:
        item.add_marker(skip)


def _environment() -> dict:
    import triton

    try:
        import deepspeed

        ds = deepspeed.__version__
    except Exception:  # noqa: BLE001 - optional on the GPU machine
        ds = None
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=RESULTS.parent).stdout.strip() or None
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "deepspeed": ds,
        "git_sha": sha,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


@pytest.fixture
def record():
    """record(op=..., case=..., provider=..., mode=..., ms=(p50, p20, p80), gbps=..., roofline=...)."""

    def _record(**row):
        row.update(_environment())
        _rows.append(row)
        folder = RESULTS / row["gpu"].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{row['op']}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    tr = terminalreporter
    tr.section("kernel benchmarks (p50 ms, GB/s, fraction of the copy-bandwidth roofline of bench/shapes.py)")
    tr.write_line(f"{'op':10} {'case':24} {'mode':8} {'provider':8} {'ms':>9} {'GB/s':>8} {'roof':>6}")
    for r in _rows:
        if "img_per_s" in r:  # train-step rows (bench_train_step.py)
            tr.write_line(f"{r['op']:10} {r['case']:24} {r['mode']:8} {r['provider']:8} {r['ms'][0]:9.1f} "
                          f"{r['img_per_s']:7.1f} img/s {r['peak_mem_gib']:5.1f} GiB  {r['split_ms']}")
            continue
        if "tflops" in r:  # whole-model rows (bench_models.py)
            tr.write_line(f"{r['op']:10} {r['case']:24} {r['mode']:8} {r['provider']:8} {r['ms'][0]:9.3f} "
                          f"{r['tflops']:7.1f}TF {r['mfu']:6.1%} MFU")
            continue
        tr.write_line(f"{r['op']:10} {r['case']:24} {r['mode']:8} {r['provider']:8} {r['ms'][0]:9.4f} "
                      f"{r['gbps']:8.1f} {r['roofline']:6.1%}")
