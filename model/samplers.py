"""Samplers of REPA-E (docs/METHOD.md#sampling): Euler ODE (previews, --mode ode) and Euler-Maruyama SDE (the paper
FIDs).

    latents = euler_sampler(sit.inference, noise, labels, num_steps=50, cfg_scale=4.0, null_class=1000)
    latents = euler_maruyama_sampler(sit.inference, noise, labels, cfg_scale=1.8, guidance_high=0.825,
                                     null_class=1000, generator=torch.Generator(device).manual_seed(0))

model_fn(x_BCHW, t_B, y_B) -> velocity [B,C,H,W] (e.g. `SiT.inference`); t = 1 is noise, t = 0 data. The
state is kept in float64 and returned in float64 (as the original); the model runs in the latents' dtype.
Classifier-free guidance (cfg_scale > 1 and guidance_low <= t_cur <= guidance_high) runs [x, x] with labels
[y, null_class] and mixes d = d_u + s (d_c - d_u) on all latent channels. The arithmetic follows the original
`samplers.py` op for op, so a trajectory with the same noise is bitwise the same.

Holds: the two samplers and the velocity -> score conversion. Must not hold a model, VAE decoding or the
latent-BN denormalisation (the caller's), nor any randomness besides the SDE's per-step noise.
"""

# B batch, C latent channels, H W latent height and width

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from repae.kernels import PATH_TYPES, path_coefficients

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def score_from_velocity(v_BCHW: torch.Tensor, x_BCHW: torch.Tensor, t_B: torch.Tensor,
                        path_type: str = "linear") -> torch.Tensor:
    """Score of x_t from the velocity: ((alpha/alpha') v - x) / (sigma^2 - (alpha/alpha') sigma' sigma).

    Linear path: (-(1 - t) v - x) / t. Written in the general form (not simplified) to keep the original's
    rounding.
    """
    t_B1 = t_B.reshape(-1, *([1] * (x_BCHW.dim() - 1)))
    alpha, sigma, d_alpha, d_sigma = path_coefficients(t_B1, path_type)
    reverse_alpha_ratio = alpha / d_alpha
    var = sigma**2 - reverse_alpha_ratio * d_sigma * sigma
    return (reverse_alpha_ratio * v_BCHW - x_BCHW) / var


def _guided(t_cur: float, cfg_scale: float, guidance_low: float, guidance_high: float) -> bool:
    """CFG at this step? Only with cfg_scale > 1 and t_cur inside [guidance_low, guidance_high]."""
    return cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high


def _model_inputs(x_BCHW: torch.Tensor, y_B: torch.Tensor, t: torch.Tensor, guided: bool,
                  null_class: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 model input ([x, x] when guided), labels ([y, null]) and float64 times t_B."""
    if guided:
        x_in = torch.cat([x_BCHW, x_BCHW], dim=0)
        y_in = torch.cat([y_B, torch.full_like(y_B, null_class)], dim=0)
    else:
        x_in, y_in = x_BCHW, y_B
    t_in = torch.ones(x_in.shape[0], device=x_in.device, dtype=torch.float64) * t
    return x_in, y_in, t_in


def _cfg(d: torch.Tensor, guided: bool, cfg_scale: float) -> torch.Tensor:
    """d_u + s (d_c - d_u) over the [cond; uncond] halves when guided, else d."""
    if not guided:
        return d
    d_cond, d_uncond = d.chunk(2)
    return d_uncond + cfg_scale * (d_cond - d_uncond)


def _check(latents: torch.Tensor, y: torch.Tensor, num_steps: int, cfg_scale: float, null_class: int | None) -> None:
    if latents.dim() < 2:
        raise ValueError(f"latents must be [B, C, H, W], got {list(latents.shape)}")
    if y.shape != (latents.shape[0],):
        raise ValueError(f"labels y must be [B={latents.shape[0]}], got {list(y.shape)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if cfg_scale > 1.0 and null_class is None:
        raise ValueError("null_class must be set when cfg_scale > 1 (the SiT's num_classes)")


@torch.no_grad()
def euler_sampler(model_fn: ModelFn, latents: torch.Tensor, y: torch.Tensor, *, num_steps: int = 50,
                  cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0,
                  null_class: int | None, heun: bool = False) -> torch.Tensor:
    """Euler ODE from t=1 to t=0 on linspace(1, 0, num_steps+1) (docs/METHOD.md#sampling); float64 [B,C,H,W] out.

    NFE = num_steps (x2 inside the guidance interval); heun adds a corrector on every step but the last.
    """
    _check(latents, y, num_steps, cfg_scale, null_class)
    dtype = latents.dtype
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x_next = latents.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(itertools.pairwise(t_steps)):
        x_cur = x_next
        guided = _guided(float(t_cur), cfg_scale, guidance_low, guidance_high)
        x_in, y_in, t_in = _model_inputs(x_cur, y, t_cur, guided, null_class)
        d_cur = _cfg(model_fn(x_in.to(dtype), t_in.to(dtype), y_in).to(torch.float64), guided, cfg_scale)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            # PARITY: the corrector is guided iff the predictor was (the original tests t_cur, not t_next).
            x_in, y_in, t_in = _model_inputs(x_next, y, t_next, guided, null_class)
            d_prime = _cfg(model_fn(x_in.to(dtype), t_in.to(dtype), y_in).to(torch.float64), guided, cfg_scale)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@torch.no_grad()
def euler_maruyama_sampler(model_fn: ModelFn, latents: torch.Tensor, y: torch.Tensor, *, num_steps: int = 250,
                           cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0,
                           null_class: int | None, path_type: str = "linear",
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Euler-Maruyama SDE (docs/METHOD.md#sampling) with diffusion w = 2t; float64 [B,C,H,W] out.

    t_steps = cat[linspace(1, 0.04, num_steps), [0]]: num_steps - 1 stochastic steps
    x += d dt + sqrt(w) eps sqrt(|dt|) with d = v - w/2 score (CFG on d), then one deterministic step
    0.04 -> 0. eps is float64 noise from `generator` (None: the global RNG of latents' device, as the
    original's randn_like). NFE = num_steps (x2 inside the guidance interval).
    """
    _check(latents, y, num_steps, cfg_scale, null_class)
    if path_type not in PATH_TYPES:  # before any model call
        raise ValueError(f"path_type must be one of {PATH_TYPES}, got {path_type!r}")
    dtype = latents.dtype
    t_steps = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64)
    t_steps = torch.cat([t_steps, torch.tensor([0.0], dtype=torch.float64)])
    x_next = latents.to(torch.float64)

    def drift(x_cur: torch.Tensor, t_cur: torch.Tensor) -> torch.Tensor:
        guided = _guided(float(t_cur), cfg_scale, guidance_low, guidance_high)
        x_in, y_in, t_in = _model_inputs(x_cur, y, t_cur, guided, null_class)
        v_cur = model_fn(x_in.to(dtype), t_in.to(dtype), y_in).to(torch.float64)
        s_cur = score_from_velocity(v_cur, x_in, t_in, path_type=path_type)
        d_cur = v_cur - 0.5 * (2 * t_cur) * s_cur
        return _cfg(d_cur, guided, cfg_scale)  # CFG on the drift = CFG on v (the score is linear in v)

    for t_cur, t_next in itertools.pairwise(t_steps[:-1]):  # all but the last step
        dt = t_next - t_cur
        x_cur = x_next
        diffusion = 2 * t_cur
        # Drawn before the model call, float64, like the original's randn_like (same RNG consumption).
        eps_i = torch.randn(x_cur.shape, generator=generator, dtype=torch.float64, device=x_cur.device)
        deps = eps_i * torch.sqrt(torch.abs(dt))
        x_next = x_cur + drift(x_cur, t_cur) * dt + torch.sqrt(diffusion) * deps

    # Last step (0.04 -> 0): the mean of the Euler-Maruyama step, no noise.
    t_cur, t_next = t_steps[-2], t_steps[-1]
    return x_next + (t_next - t_cur) * drift(x_next, t_cur)
