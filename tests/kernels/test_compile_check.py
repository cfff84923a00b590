"""Every Triton kernel compiles for sm_90 (the H100) without register spills, checked on any machine.

The CPU suite runs the kernels under the interpreter, which never runs Triton's compiler; this test
runs `python -m repae.kernels.compile_check` in its own process (no interpreter there) so that a
kernel that would fail to compile, or spill, on the GPU fails here first.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

KERNELS = {"_adaln_fwd_kernel", "_adaln_bwd_kernel", "_repa_loss_fwd_kernel", "_repa_loss_bwd_kernel",
           "_latent_bn_stats_kernel", "_latent_bn_fwd_kernel", "_latent_bn_bwd_stats_kernel", "_latent_bn_bwd_kernel",
           "_latent_bn_denorm_kernel"}


@pytest.fixture(scope="module")
def sm90_reports(tmp_path_factory):
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").exists() or not (tools / "cuobjdump").exists():
        pytest.skip(f"this triton build ships no CUDA tools in {tools}")
    out = tmp_path_factory.mktemp("compile") / "sm90.json"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "repae.kernels.compile_check", "--arch", "90", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.exists(), f"compile_check failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc, json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90_without_spills(sm90_reports):
    proc, reports = sm90_reports
    assert {r["kernel"] for r in reports} == KERNELS
    spills = [f"{r['kernel']} ({r['case']}): {r['local_bytes']} B local" for r in reports if r["local_bytes"]]
    assert not spills, "register spills:\n" + "\n".join(spills)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert all(0 < r["registers"] <= 255 for r in reports)


def test_recipe_shapes_use_128_bit_accesses(sm90_reports):
    """At the recipe's shapes (rows of 1152 / 768, latent planes of 1024 / 256) the row loads and stores
    vectorise to 128 bits per thread: what a bandwidth-bound kernel needs to approach the roofline."""
    _, reports = sm90_reports
    recipe = [r for r in reports if r["case"].startswith(("adaln [32,", "repa_loss [32,", "latent_bn [32,"))]
    assert recipe
    narrow = [f"{r['kernel']} ({r['case']}): {r['widest_access_bits']} bits" for r in recipe
              if r["widest_access_bits"] < 128]
    assert not narrow, "\n".join(narrow)
