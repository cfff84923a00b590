"""Sampling and evaluation throughput: images/s of SiT-XL/2 at batch 256 with the repae-sdvae preset's guidance
(train/generate.py: CFG 2.2 on t in [0, 0.65]) for the Euler ODE at 50 steps and the Euler-Maruyama SDE at 250
steps, including the f8d4 (SD-VAE) decode of the final latents; and images/s of the FID Inception network on uint8
256 px batches of 100 and 500 (fp32 with torch's default cuDNN TF32, as evaluate.py runs it; the resize to 299
inside). Random weights throughout: speed, not samples.

A sampling row is composed from measured parts, not timed end to end (one SDE batch is about a minute):

    ms per batch = n_in * t_in + n_out * t_out + t_decode,    images/s = B / ms per batch * 1000

- t_in, t_out: one sampler step inside / outside the guidance interval, the p50 of one call of the sampler itself
  (model/samplers.py; sampling_harness.sampler_cases) divided by the steps in that call: ODE num_steps=1 (one
  step), SDE num_steps=2 (one stochastic step and the final deterministic one, so half a noise draw per step is
  missing against the real loop: ~10 us beside a ~100 ms model call). Inside the interval the SiT runs the doubled
  batch [x, x]. The per-call setup (latents to float64, the time grid) is counted once per timed call. The cost of a
  step does not depend on t, so the timed steps sit at t = 1 (and 0.04), inside [0, 1] or with cfg_scale 1.
- n_in, n_out: the sampler's model calls inside / outside the interval on its real grid, counted by running it
  (sampling_harness.step_counts): 32 / 18 for ODE 50, 159 / 91 for SDE 250 with [0, 0.65].
- t_decode: float64 latents -> latent-BN denormalisation -> VAE decode -> uint8 NHWC on the host, fp32 with TF32
  on, as sample_chunk ends (timed once per case; at half or a quarter of the batch, scaled, if the whole batch
  does not fit: `decode_batch` says which).
- ms (p50, p20, p80) composes the parts' p50s (p20s, p80s). Each row carries the parts (step_in_ms, step_out_ms,
  decode_ms, n_in, n_out), so the arithmetic can be checked, and another guidance interval recomposed without a GPU.
Left out: drawing the initial noise and labels on the host, and writing the images.

Providers: "fused" and "eager" (the kernel backend switch), fp32 with TF32 on as generate.py runs; "fused_bf16"
under bf16 autocast (generation does not autocast: a what-if). Timing: timing.time_ms; never asserts speed.
Expected device time on an H100 (estimated, not yet measured): 60-90 s, most of it the two fp32 providers (each
timed call runs 8-12 times: do_bench's first call, 5 to estimate, 1 warm-up, 1 s of repeats); a subset runs with
`-k`, e.g. `pytest bench/bench_sampling.py -k "not eager"`.
"""

import importlib.util

import pytest
import torch
from sampling_harness import SAMPLING_PROVIDERS, decode_case, inception_case, sampler_cases, step_counts
from shapes import INCEPTION_CASES, SAMPLER_RUNS, SAMPLING_CASES
from timing import time_ms

from repae.train.generate import PRESETS

_decoded: dict[str, tuple[tuple[float, float, float], int, float]] = {}  # case -> (ms, decode_batch, peak GiB)


def _guidance(preset: str) -> dict:
    return {k: PRESETS[preset][k] for k in ("cfg_scale", "guidance_low", "guidance_high")}


def _decode(case: str) -> tuple[tuple[float, float, float], int, float]:
    """(ms to decode the case's whole batch, the batch it was timed at, peak GiB), timed once per session."""
    if case not in _decoded:
        width, _, batch = SAMPLING_CASES[case]
        for part in (batch, batch // 2, batch // 4):
            bench = None
            torch.cuda.reset_peak_memory_stats()
            try:
                bench = decode_case(width, part, "cuda")
                ms = time_ms(bench, warmup=1, rep=1000)
                peak = torch.cuda.max_memory_allocated() / 2**30
                _decoded[case] = tuple(m * batch / part for m in ms), part, peak
                break
            except torch.cuda.OutOfMemoryError:
                pass
            finally:
                del bench
                torch.cuda.empty_cache()
        else:
            raise RuntimeError(f"the decode of {case} does not fit even at a quarter of the batch")
    return _decoded[case]


@pytest.mark.bench
@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_bench_decode(case, record):
    width, _, batch = SAMPLING_CASES[case]
    ms, part, peak = _decode(case)
    record(op="sampling", case=case, mode="decode", provider="eager", ms=ms, img_per_s=batch / ms[0] * 1e3,
           batch=batch, vae=width["vae"], precision="fp32_tf32", decode_batch=part, peak_mem_gib=peak)


CASES = [(case, provider) for case in SAMPLING_CASES for provider in SAMPLING_PROVIDERS]


@pytest.mark.bench
@pytest.mark.parametrize("case,provider", CASES, ids=[f"{c}-{p}" for c, p in CASES])
def test_bench_sampling(case, provider, record):
    width, preset, batch = SAMPLING_CASES[case]
    guidance = _guidance(preset)
    step_ms = {}
    for part, (bench, steps) in sampler_cases(provider, width, batch, "cuda", cfg_scale=guidance["cfg_scale"]).items():
        step_ms[part] = tuple(m / steps for m in time_ms(bench, warmup=1, rep=1000))
    del bench
    torch.cuda.empty_cache()
    decode_ms, decode_batch, _ = _decode(case)
    for run, (mode, num_steps) in SAMPLER_RUNS.items():
        n_in, n_out = step_counts(mode, num_steps=num_steps, **guidance)
        t_in, t_out = step_ms[f"{mode}_in"], step_ms[f"{mode}_out"]
        ms = tuple(n_in * i + n_out * o + d for i, o, d in zip(t_in, t_out, decode_ms))
        record(op="sampling", case=case, mode=run, provider=provider, ms=ms, img_per_s=batch / ms[0] * 1e3,
               batch=batch, composed=True, preset=preset, **guidance, num_steps=num_steps, n_in=n_in, n_out=n_out,
               step_in_ms=t_in, step_out_ms=t_out, decode_ms=decode_ms, decode_batch=decode_batch, vae=width["vae"],
               precision="bf16_autocast" if provider.endswith("bf16") else "fp32_tf32")


@pytest.mark.bench
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("torch_fidelity", "torchvision")),
                    reason="torch-fidelity (the FID Inception port) or its torchvision is not installed")
@pytest.mark.parametrize("case", list(INCEPTION_CASES))
def test_bench_inception(case, record):
    batch, resolution = INCEPTION_CASES[case]
    ms = time_ms(inception_case(batch, resolution, "cuda"), warmup=25, rep=500)
    record(op="inception", case=case, mode="fwd", provider="eager", ms=ms, img_per_s=batch / ms[0] * 1e3,
           batch=batch, resolution=resolution, precision="fp32_cudnn_tf32")
    torch.cuda.empty_cache()
