"""Eager PyTorch twin of kernels/latent_bn_triton.py: REPA-E's latent BatchNorm and the flow interpolation.

Holds the reference math (eager backend, oracle with `upcast=True`, benchmark baseline), the path
coefficients and `make_latent_bn_inputs`. No Triton.

    BatchNorm2d(C, eps=1e-4, momentum=0.1, affine=False)       (docs/METHOD.md#the-training-step)
    train: x0 = (z - mean_B) / sqrt(var_B + eps) with batch mean / biased var over (B, H, W);
           running_mean <- (1 - m) running_mean + m mean_B,  running_var <- (1 - m) running_var + m var_unbiased
    eval:  x0 = (z - running_mean) / sqrt(running_var + eps)
    interpolation: x_t = alpha_t x0 + sigma_t eps,  v* = alpha'_t x0 + sigma'_t eps
        linear: alpha = 1 - t, sigma = t, alpha' = -1, sigma' = 1
        cosine: alpha = cos(pi t / 2), sigma = sin(pi t / 2), alpha' = -pi/2 sin(pi t / 2), sigma' = pi/2 cos(pi t / 2)
    denormalize (docs/METHOD.md#sampling): z = x / rsqrt(running_var) + running_mean   (no eps)

A stats hook (SyncBN semantics) receives local per-channel statistics as a [3, C] tensor (fp32; fp64
for fp64 latents) (count, sum(z - K), sum((z - K)^2)) and must sum it over ranks in place. It is called
twice per training forward: K = running_mean, then K = the global mean that the first call gave, so
the variance is an exact two-pass one however far the running mean is from the batch mean.
"""

# B batch, C latent channels, H, W latent height and width

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

PATH_TYPES = ("linear", "cosine")
"""The interpolation paths x_t = alpha_t x0 + sigma_t eps (REPA-E's path_type); the one list every layer uses."""
StatsHook = Callable[[torch.Tensor], None]


def path_coefficients(t: torch.Tensor, path: str) -> tuple:
    """(alpha, sigma, d_alpha, d_sigma) at t, as REPA-E's SiT.interpolant computes them."""
    if path == "linear":
        return 1 - t, t, -1, 1
    if path == "cosine":
        half_pi = math.pi / 2
        return (
            torch.cos(t * half_pi),
            torch.sin(t * half_pi),
            -half_pi * torch.sin(t * half_pi),
            half_pi * torch.cos(t * half_pi),
        )
    raise ValueError(f"path must be one of {PATH_TYPES}, got {path!r}")


def _channel_view(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, 1, 1)


def latent_bn_ref(
    z: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor | None = None,
    *,
    use_batch_stats: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-4,
    stats_hook: StatsHook | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """x0 = BN(z), z: [B, C, H, W]; updates the running statistics in place when use_batch_stats.

    upcast=False without a hook is torch's own F.batch_norm (the definition of the op). With a hook
    the statistics are summed across ranks first; the backward through global batch statistics then
    needs a collective, which only the triton backend provides (ValueError here). upcast=True (or fp64
    z): explicit float64 math, results left in float64 under upcast.
    """
    if use_batch_stats and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    factor = momentum
    if use_batch_stats and momentum is None:
        assert num_batches_tracked is not None, "momentum=None (cumulative average) needs num_batches_tracked"
        factor = 1.0 / float(num_batches_tracked)
    fp64 = upcast or z.dtype == torch.float64
    if not fp64 and stats_hook is None:
        return F.batch_norm(z, running_mean, running_var, training=use_batch_stats, momentum=factor or 0.0, eps=eps)

    dtype = torch.float64 if fp64 else torch.float32
    out_dtype = dtype if upcast else z.dtype
    zz = z.to(dtype)
    rm, rv = running_mean.to(dtype), running_var.to(dtype)
    if not use_batch_stats:
        return ((zz - _channel_view(rm)) * _channel_view((rv + eps).rsqrt())).to(out_dtype)
    if stats_hook is not None and z.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "latent_bn: the eager backend cannot backpropagate through cross-rank batch statistics; "
            "detach z (as REPA-E's SiT pass does) or use the triton backend"
        )
    dims = (0, 2, 3)
    count = torch.full_like(rm, z.numel() // z.shape[1])
    shift = rm
    for _ in range(2 if stats_hook is not None else 1):  # with a hook: about rm, then about the global mean
        shifted = zz - _channel_view(shift)
        stats = torch.stack([count, shifted.sum(dims), shifted.square().sum(dims)])
        if stats_hook is not None:
            stats_hook(stats)
        n, s1, s2 = stats.unbind(0)
        k, shift = shift, shift + s1 / n
    mean = shift  # k + s1 / n
    var = (s2 / n - (s1 / n).square()).clamp_min(0)
    x0 = ((zz - _channel_view(k) - _channel_view(s1 / n)) * _channel_view((var + eps).rsqrt())).to(out_dtype)
    with torch.no_grad():
        running_mean.copy_(rm * (1 - factor) + mean * factor)
        running_var.copy_(rv * (1 - factor) + var * (n / (n - 1)) * factor)
    return x0


def latent_bn_interp_ref(
    z: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor | None = None,
    *,
    use_batch_stats: bool,
    path: str = "linear",
    momentum: float | None = 0.1,
    eps: float = 1e-4,
    stats_hook: StatsHook | None = None,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, v_target) from z [B, C, H, W], t [B] (any shape with B elements), noise like z."""
    x0 = latent_bn_ref(
        z, running_mean, running_var, num_batches_tracked,
        use_batch_stats=use_batch_stats, momentum=momentum, eps=eps, stats_hook=stats_hook, upcast=upcast,
    )
    t = t.reshape(-1, 1, 1, 1).to(x0.dtype)
    noise = noise.to(torch.float64) if upcast else noise
    alpha, sigma, d_alpha, d_sigma = path_coefficients(t, path)
    return alpha * x0 + sigma * noise, d_alpha * x0 + d_sigma * noise


def latent_bn_denorm_ref(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """z = x / rsqrt(running_var) + running_mean, as generate.py decodes latents."""
    return x / _channel_view(running_var.rsqrt()) + _channel_view(running_mean)


def make_latent_bn_inputs(
    B: int,
    C: int,
    H: int,
    W: int,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    magnitude: float = 1.0,
    requires_grad: bool = True,
) -> dict[str, torch.Tensor]:
    """Random latents with per-channel offsets and scales (like SD-VAE latents), t ~ U[0, 1), noise,
    and running statistics near (not at) the batch statistics. Keys: z, t, noise, running_mean,
    running_var, num_batches_tracked.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    ch_mean = torch.randn(C, generator=g) * magnitude
    ch_std = (torch.rand(C, generator=g) * 4 + 0.5) * magnitude
    z = torch.randn(B, C, H, W, generator=g) * ch_std.view(1, C, 1, 1) + ch_mean.view(1, C, 1, 1)
    out = {
        "z": z.to(device=device, dtype=dtype).requires_grad_(requires_grad),
        "t": torch.rand(B, generator=g).to(device=device),
        "noise": torch.randn(B, C, H, W, generator=g).to(device=device, dtype=dtype),
        "running_mean": (ch_mean + 0.1 * torch.randn(C, generator=g) * magnitude).to(device),
        "running_var": (ch_std.square() * (1 + 0.2 * torch.rand(C, generator=g))).to(device),
        "num_batches_tracked": torch.zeros((), dtype=torch.long, device=device),
    }
    return out


def allreduce_stats_hook(group=None) -> StatsHook:
    """A stats hook that sums the statistics over the ranks of a torch.distributed group (SyncBN)."""

    def hook(stats: torch.Tensor) -> None:
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM, group=group)

    return hook
