"""Benchmark builders for sampling and evaluation: one call of the repository's samplers (model/samplers.py) on a
SiT inside or outside the CFG interval, the VAE decode of the final latents to uint8 pixels, and the FID Inception
network of train/evaluate_inception.py. Nothing here re-implements a sampler, a decode or a feature extractor: the
closures call them; tests/test_bench_builders.py runs these builders at small sizes on CPU.

Providers of the SiT: "fused" (Triton kernels) and "eager" (the eager kernel backend), both in fp32 with TF32 on,
as train/generate.py runs; "fused_bf16" is the fused SiT under bf16 autocast (a what-if: generation does not
autocast). The decode runs in fp32 with TF32 on (generate.py); Inception with torch's default flags (evaluate.py
sets none: matmul TF32 off, cuDNN TF32 on). Each closure sets those flags itself and restores them.
"""

# B batch, C latent channels, H latent side, R image side

from __future__ import annotations

import contextlib

import torch
from model_harness import _autocast, _build_sit, _randn
from timing import BenchFn

from repae.kernels import LatentBatchNorm
from repae.model.samplers import euler_maruyama_sampler, euler_sampler
from repae.model.sit import sit_config

SAMPLING_PROVIDERS = ("fused", "eager", "fused_bf16")
SAMPLERS = {"ode": euler_sampler, "sde": euler_maruyama_sampler}
# Model steps in one timed sampler call: the ODE with num_steps=1 takes one Euler step; the SDE's smallest grid
# (num_steps=2) takes one stochastic step and its final deterministic one (model/samplers.py).
STEPS_PER_CALL = {"ode": 1, "sde": 2}


@contextlib.contextmanager
def tf32(*, matmul: bool, cudnn: bool):
    """TF32 switches as given (train/generate.py sets both on; evaluate.py leaves torch's defaults), restored after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def step_counts(mode: str, *, num_steps: int, cfg_scale: float, guidance_low: float,
                guidance_high: float) -> tuple[int, int]:
    """(n_in, n_out): the sampler's model calls inside / outside the guidance interval, counted by running the
    sampler itself (its own time grid and interval test) with a probe model on a one-element latent: a guided call
    sees the doubled batch [x, x]."""
    batches = []

    def probe(x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
        batches.append(x_BCHW.shape[0])
        return torch.zeros_like(x_BCHW)

    extra = {"generator": torch.Generator().manual_seed(0)} if mode == "sde" else {}
    SAMPLERS[mode](probe, torch.zeros(1, 1, 1, 1), torch.zeros(1, dtype=torch.long), num_steps=num_steps,
                   cfg_scale=cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high, null_class=1, **extra)
    assert set(batches) <= {1, 2} and len(batches) == num_steps, batches
    return batches.count(2), batches.count(1)


def sampler_cases(provider: str, width: dict, batch: int, device: str, *,
                  cfg_scale: float) -> dict[str, tuple[BenchFn, int]]:
    """{"ode_in", "ode_out", "sde_in", "sde_out"} -> (BenchFn of one sampler call, model steps in that call).

    One SiT in eval mode and one batch of fp32 noise and labels for all four. Inside the interval: guidance on
    [0, 1] at `cfg_scale` (every step of the call runs the doubled batch); outside: cfg_scale 1 (the sampler's
    unguided path, the one it takes outside the interval). The call is the sampler itself, so its per-step work
    beyond the model (float64 state, the CFG mix, the SDE's score, drift and float64 noise) is in the time."""
    if provider not in SAMPLING_PROVIDERS:
        raise ValueError(f"provider must be one of {SAMPLING_PROVIDERS}, got {provider!r}")
    model = _build_sit(provider, width, device).eval()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x_BCHW = _randn((batch, cfg.in_channels, cfg.input_size, cfg.input_size), g, device)  # fp32, as generate.py
    y_B = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    precision = _autocast(device) if provider.endswith("bf16") else contextlib.nullcontext()
    cases = {}
    for mode, sampler in SAMPLERS.items():
        steps = STEPS_PER_CALL[mode]
        for where, guidance in (("in", dict(cfg_scale=cfg_scale, guidance_low=0.0, guidance_high=1.0)),
                                ("out", dict(cfg_scale=1.0))):
            kwargs = dict(num_steps=steps, null_class=cfg.num_classes, **guidance)
            if mode == "sde":
                kwargs |= dict(path_type=model.path_type, generator=torch.Generator(device).manual_seed(0))

            def run(sampler=sampler, kwargs=kwargs):
                with tf32(matmul=True, cudnn=True), precision:
                    sampler(model.inference, x_BCHW, y_B, **kwargs)

            cases[f"{mode}_{where}"] = (BenchFn(run, 0, []), steps)
    return cases


def decode_case(width: dict, batch: int, device: str) -> BenchFn:
    """The end of train/generate.py's sample_chunk on `batch` float64 latents: float(), the latent-BN
    denormalisation, the VAE decode and to_uint8 (clamp, NHWC, uint8 on the host), fp32 with TF32 on."""
    from repae.model.vae import build_vae, vae_config
    from repae.train.generate_io import to_uint8

    with torch.device(device):
        vae = build_vae(vae_config(width["vae"], **width.get("vae_overrides", {}))).eval()
        bn = LatentBatchNorm(vae.config.embed_dim).eval()  # running stats (0, 1): the work, not the values
    side = sit_config(width["model"], **width.get("overrides", {})).input_size
    g = torch.Generator().manual_seed(0)
    latents_BCHW = _randn((batch, vae.config.embed_dim, side, side), g, device, dtype=torch.float64)

    def run():
        with tf32(matmul=True, cudnn=True), torch.no_grad():
            to_uint8(vae.decode(bn.denormalize(latents_BCHW.float())))

    return BenchFn(run, 0, [])


def inception_case(batch: int, resolution: int, device: str) -> BenchFn:
    """The FID Inception forward (randomly initialised, build_inception(allow_random=True): the speed, not the
    numbers) on a uint8 batch already on the device, fed as evaluate_inception.inception_features feeds it (an NCHW
    view of NHWC images); the resize to 299 is inside the network. Left out: the host-to-device copy, the sFID
    hook and the features' copies to the host."""
    from repae.train.evaluate_inception import build_inception

    net, _ = build_inception(allow_random=True)
    net = net.to(device)
    gen = torch.Generator(device).manual_seed(0)
    images_BRR3 = torch.randint(0, 256, (batch, resolution, resolution, 3), generator=gen, dtype=torch.uint8,
                                device=device)

    def run():
        with tf32(matmul=False, cudnn=True), torch.inference_mode():
            net(images_BRR3.permute(0, 3, 1, 2))

    return BenchFn(run, 0, [])
