"""pytest bench/: GPU microbenchmarks. Each row goes to bench/results/<gpu>/<op>.jsonl with the GPU,
versions, git sha, UTC date and the session's measured copy bandwidth, and a table is printed at the end of
the session.

Timing: each case is timed once, by timing.time_ms (triton.testing.do_bench: CUDA events around each call,
the L2 flushed before each, p50/p20/p80). pytest-benchmark's `benchmark` fixture is not used: it times with a
host clock (launch overhead and a synchronize inside, the L2 warm) and has no public way to take times measured
elsewhere, so beside do_bench it would time every case a second time and report a second, different number.
The JSONL rows and the table below are the record.

Roofline: the session fixture `hbm` measures the device-to-device copy bandwidth once per session on the GPU
the benchmarks run on (bench/ceilings.py: a 2 GiB copy, bytes read + written) and writes it to
bench/results/<gpu>/bandwidth.json. Every row carries it (`hbm_gbps`, with the spec sheet's `hbm_gbps_nominal`
beside it for comparison), and a kernel row's `roofline` is its GB/s over `hbm_gbps`.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).resolve().parent / "results"
_rows: list[dict] = []


def pytest_collection_modifyitems(config, items):
    """Without CUDA only the benchmarks marked `cpu_ok` run (the data sources); the rest would time the interpreter."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU (on CPU the Triton interpreter times nothing real)")
    for item in items:
        if "cpu_ok" not in item.keywords:
            item.add_marker(skip)


def _folder(gpu_name: str) -> Path:
    folder = RESULTS / gpu_name.replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@functools.cache
def _versions() -> dict:
    """What stays fixed for the session: the GPU, the versions and the git sha."""
    import triton

    try:
        import deepspeed

        ds = deepspeed.__version__
    except Exception:  # noqa: BLE001 - optional on the GPU machine
        ds = None
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=RESULTS.parent).stdout.strip() or None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu{os.cpu_count()}"
    return {"gpu": device, "torch": torch.__version__, "triton": triton.__version__,
            "deepspeed": ds, "git_sha": sha}


@pytest.fixture(scope="session")
def hbm() -> dict:
    """This GPU's copy bandwidth (ceilings.bandwidth_row), measured once per session before the first
    benchmark allocates anything, and written to bench/results/<gpu>/bandwidth.json."""
    from ceilings import measure_copy_bandwidth

    row = measure_copy_bandwidth() | _versions()
    (_folder(row["gpu"]) / "bandwidth.json").write_text(json.dumps(row, indent=1) + "\n")
    return row


@pytest.fixture
def record(request):
    """record(op=..., case=..., provider=..., mode=..., ms=(p50, p20, p80), ...): one JSONL row, with the
    environment and the session's bandwidth added (none on a CPU machine: results/cpu<cores>/)."""
    hbm = request.getfixturevalue("hbm") if torch.cuda.is_available() else {"copy_gbps": None, "nominal_gbps": None}

    def _record(**row):
        row |= _versions()
        row |= {"hbm_gbps": hbm["copy_gbps"], "hbm_gbps_nominal": hbm["nominal_gbps"],
                "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        _rows.append(row)
        with open(_folder(row["gpu"]) / f"{row['op']}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    tr = terminalreporter
    measured, nominal = _rows[0]["hbm_gbps"], _rows[0]["hbm_gbps_nominal"]
    tr.section(f"benchmarks (p50 ms, GB/s, fraction of the copy bandwidth measured this session: "
               f"{'n/a' if measured is None else f'{measured:.0f}'} GB/s; "
               f"nominal {'n/a' if nominal is None else f'{nominal:.0f}'} GB/s)")
    tr.write_line(f"{'op':10} {'case':24} {'mode':8} {'provider':8} {'ms':>9} {'GB/s':>8} {'roof':>6}")
    for r in _rows:
        if r["op"] == "data":  # data-source rows (bench_data.py)
            tr.write_line(f"{r['op']:10} {r['case']:24} {r['mode']:8} {r['provider']:8} {r['ms'][0]:9.1f} "
                          f"{r['img_per_s']:7.1f} img/s  {r['gpu']}")
            continue
        if r["op"] in ("sampling", "inception"):  # images/s per batch (bench_sampling.py)
            tr.write_line(f"{r['op']:10} {r['case']:24} {r['mode']:8} {r['provider']:8} {r['ms'][0]:9.1f} "
                          f"{r['img_per_s']:7.1f} img/s  {r['precision']}")
            continue
        if r["op"] == "integrations":  # patched foreign models (bench_integrations.py)
            tr.write_line(f"{r['op']:10} {r['case']:24} {r['mode']:8} {r['provider']:15} {r['ms'][0]:9.2f} "
                          f"{r['tflops']:7.1f}TF {r['mfu']:6.1%} MFU {r['peak_mem_gib']:5.1f} GiB")
            continue
        if "img_per_s" in r:  # train-step rows (bench_train_step.py)
            floor = f"  floor {r['floor_ms']:.1f} ms ({r['ms'][0] / r['floor_ms']:.2f}x)" if r.get("floor_ms") else ""
            tr.write_line(f"{r['op']:10} {r['case']:24} {r['mode']:8} {r['provider']:8} {r['ms'][0]:9.1f} "
                          f"{r['img_per_s']:7.1f} img/s {r['peak_mem_gib']:5.1f} GiB{floor}  {r['split_ms']}")
            continue
        if "tflops" in r:  # whole-model rows (bench_models.py)
            tr.write_line(f"{r['op']:10} {r['case']:24} {r['mode']:8} {r['provider']:8} {r['ms'][0]:9.3f} "
                          f"{r['tflops']:7.1f}TF {r['mfu']:6.1%} MFU")
            continue
        tr.write_line(f"{r['op']:10} {r['case']:24} {r['mode']:8} {r['provider']:8} {r['ms'][0]:9.4f} "
                      f"{r['gbps']:8.1f} {r['roofline']:6.1%}")
