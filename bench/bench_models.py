"""Whole-model benchmarks: one SiT-XL block and the whole SiT-XL/2 at b=32 (fused vs eager vs
torch.compile), the SiT pass with its losses against the original SiT (tests/model/original_sit.py, eager and
compiled), and the f8d4 VAE forward+backward at b=8 (eager vs compile), bf16 autocast.
Timing: timing.time_ms (triton.testing.do_bench), p50/p20/p80; TFLOP/s from FLOPs counted on the meta
device; MFU against the GPU's dense bf16 peak (repae.model.flops). Never asserts speed."""

import pytest
import torch
from model_harness import MODEL_PROVIDERS, model_case
from shapes import MODEL_CASES
from timing import time_ms

from repae.model.flops import peak_bf16_tflops


def _applies(kind: str, provider: str) -> bool:
    """The VAE has no fused kernels; the original SiT transcription is timed on the loss pass only."""
    if kind == "vae":
        return not provider.startswith(("fused", "original"))
    return kind == "sit_loss" or not provider.startswith("original")


CASES = [(name, provider) for name, (kind, _, _) in MODEL_CASES.items() for provider in MODEL_PROVIDERS
         if _applies(kind, provider)]


@pytest.mark.bench
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case,provider", CASES, ids=[f"{c}-{p}" for c, p in CASES])
def test_bench_model(case, provider, mode, record):
    kind, width, batch = MODEL_CASES[case]
    bench, flops = model_case(provider, mode, kind, width, batch, device="cuda")
    ms = time_ms(bench, warmup=200, rep=1000)
    tflops = flops / (ms[0] * 1e9)
    peak = peak_bf16_tflops(torch.cuda.get_device_name())
    record(op="model", case=case, provider=provider, mode=mode, ms=ms, batch=batch,
           gflop=flops / 1e9, tflops=tflops, mfu=float("nan") if peak is None else tflops / peak)
    torch.cuda.empty_cache()
