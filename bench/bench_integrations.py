"""Foreign models patched by repae.kernels.integrations against themselves unpatched: a diffusers DiT-XL/2
(DiTTransformer2DModel, 256 px, b=32) and PixArt-alpha XL/2 (PixArtTransformer2DModel, 512 px, 120 caption
tokens, b=16), forward and forward+backward, eager and with every transformer block compiled; bf16 autocast, fp32
weights, train mode, random weights (bench/integration_harness.py). Rows go to
bench/results/<gpu>/integrations.jsonl with TFLOP/s (FLOPs counted on the unpatched model), MFU, the peak memory
and the patch report, and are tabled by bench/report.py. Timing: timing.time_ms; never asserts speed.

Work per call (FLOPs counted on CPU at batch 1, scaled): DiT-XL/2 b=32 7.3 TFLOP forward, PixArt 512 px b=16
17.4 TFLOP; forward+backward about 3x. Expected device time on an H100 (estimated, not yet measured): 2-3 minutes,
most of it compiling (eight compiled cases, two block graphs each, fwd or fwd+bwd); the eight eager cases take
~20 s. Subsets run with `-k`, e.g. `-k "not compile"` (~20 s) or `-k "fwd_bwd and dit"`.
"""

import pytest
import torch
from integration_harness import HAS_DIFFUSERS, INTEGRATION_PROVIDERS, integration_case
from shapes import INTEGRATION_CASES
from timing import time_ms

from repae.model.flops import peak_bf16_tflops

CASES = [(case, provider) for case in INTEGRATION_CASES for provider in INTEGRATION_PROVIDERS]


@pytest.mark.bench
@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed (the patched models are diffusers')")
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case,provider", CASES, ids=[f"{c}-{p}" for c, p in CASES])
def test_bench_integration(case, provider, mode, record):
    kind, config, batch, extra = INTEGRATION_CASES[case]
    torch.cuda.reset_peak_memory_stats()
    bench, flops, report = integration_case(provider, mode, kind, config, batch, extra, device="cuda")
    ms = time_ms(bench, warmup=25, rep=200)
    tflops = flops / (ms[0] * 1e9)
    peak = peak_bf16_tflops(torch.cuda.get_device_name())
    record(op="integrations", case=case, provider=provider, mode=mode, ms=ms, batch=batch, model=kind,
           gflop=flops / 1e9, tflops=tflops, mfu=float("nan") if peak is None else tflops / peak,
           peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30, precision="bf16_autocast", patch_report=report)
    del bench
    torch._dynamo.reset()  # drop the compiled blocks' code, and with it the last reference to this case's model
    torch.cuda.empty_cache()
