"""REPA-E's latent BatchNorm (affine=False) fused with the flow interpolation, in Triton.

Forward, per channel c over its n = B*H*W elements (fp32 math, fp64 for fp64 latents; running stats fp32).
Where the normalising statistics come from is the STATS_FROM constexpr, one of three named sources:
    RUNNING  (eval): k = running_mean, d = 0, rstd = 1/sqrt(running_var + eps).
    BATCH    (one rank, one program per channel): k = mean(z), then s1 = sum(z - k), s2 = sum((z - k)^2):
             an exact two-pass variance computed inside the normalising program.
    SUMMED   (SyncBN, after two rounds of _latent_bn_stats_kernel, each followed by the caller's hook that
             sums (count, s1, s2) over ranks): round 1 sums about k = running_mean, round 2 about k = the
             global mean of round 1 (k + s1/n there); the normalising launch reads round 2's sums and k.
             Sums about the running mean alone lose the variance to cancellation when the batch mean is far
             from it in units of the batch std (first steps, a drifting VAE); about the global mean this is
             an exact two-pass variance.
    batch sources: d = s1/n, mean = k + d, var = s2/n - d^2 (biased, clamped at 0), rstd = 1/sqrt(var + eps)
    x0 = ((z - k) - d) * rstd        (z - k first: exact for z near k, so a mean far from 0 in units of the
                                      std keeps its digits that z - (k + d) would lose)
    x_t = alpha(t_b) x0 + sigma(t_b) noise,  v* = alpha'(t_b) x0 + sigma'(t_b) noise      (INTERP)
    batch sources also update, in program 0 of each channel:
    running_mean <- (1-f) running_mean + f mean,  running_var <- (1-f) running_var + f var n/(n-1)
        f = momentum, and num_batches_tracked += 1 in the same launch (program 0 of channel 0); or, for
        momentum=None, f = 1/num_batches_tracked after the launcher added 1 to it.
Backward (g = dx0 + alpha dx_t + alpha' dv*;  dnoise = sigma dx_t + sigma' dv*):
    RUNNING: dz = rstd * g
    BATCH, SUMMED: dz = rstd * (g - sum(g)/n - xhat * sum(g xhat)/n), xhat = (z - mean) * rstd, the sums over
    the global batch: in-program (BATCH), or written per rank by _latent_bn_bwd_stats_kernel and summed by
    the hook (SUMMED).
Denormalisation: z = x / rsqrt(running_var) + running_mean (no eps), computed as x * (1 / rsqrt(var)) + mean;
its backward dx = dz * (1 / rsqrt(var)).

Shapes: z, noise: [B, C, H, W] (indexed as dense NCHW), any float dtype (outputs take z's dtype); t: B
elements; running stats [C] fp32; num_batches_tracked int64 0-d. Saved for backward: z, t, mean/rstd [C] in
the compute dtype. H*W (and C in the denormalisation) are compile-time constants: one specialization per
latent shape, and the element -> (b, c, hw) index math compiles to shifts, not 32-bit divisions.
Grids and blocks: kernels/_launch.py (bn_grid: (C, chunks) over B*H*W; a launch that reduces whole channels,
BATCH and the statistics kernels, has one program per channel). Deterministic: every reduction is a
fixed-order sum inside one program (no atomics), so repeated calls are bitwise equal.
Bytes: forward reads z, noise and writes x_t, v* (or x0); backward reads dx_t, dv*, z and writes dz (and
dnoise); BATCH and SUMMED read z once more per statistics pass.
"""

# B batch, C latent channels, H, W latent height and width

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import acc_dtype, bn_channel_launch, bn_denorm_grid, bn_grid, contiguous, tl_dtype
from ._library import placeholder, registered_launcher
from .latent_bn_ref import PATH_TYPES, StatsHook

# STATS_FROM: where a normalising launch takes its statistics from (see the docstring above).
RUNNING = tl.constexpr(0)
BATCH = tl.constexpr(1)
SUMMED = tl.constexpr(2)
# PATH: the interpolation path, in the order of PATH_TYPES.
LINEAR = tl.constexpr(PATH_TYPES.index("linear"))
COSINE = tl.constexpr(PATH_TYPES.index("cosine"))


@triton.jit
def _path_coefficients(t, PATH: tl.constexpr, ACC: tl.constexpr):
    """(alpha, sigma, d_alpha, d_sigma) of the LINEAR or COSINE path at t, in ACC."""
    if PATH == LINEAR:
        alpha = 1.0 - t
        sigma = t
        d_alpha = tl.full(t.shape, -1.0, ACC)
        d_sigma = tl.full(t.shape, 1.0, ACC)
    else:
        half_pi = 1.5707963267948966
        c = tl.cos(t * half_pi)
        s = tl.sin(t * half_pi)
        alpha = c
        sigma = s
        d_alpha = -half_pi * s
        d_sigma = half_pi * c
    return alpha, sigma, d_alpha, d_sigma


@triton.jit
def _channel_block(j0, j_end, c, C, HW: tl.constexpr, BLOCK: tl.constexpr):
    """(NCHW offsets, sample index b, mask) of elements j0 .. j0+BLOCK-1 (below j_end) of channel c."""
    j = j0 + tl.arange(0, BLOCK)
    b = j // HW
    return b.to(tl.int64) * C * HW + c * HW + j % HW, b, j < j_end


@triton.jit
def _channel_sums(Z, c, C, HW: tl.constexpr, n, shift, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """(sum(v), sum(v^2)) over channel c, v = z - shift."""
    acc1 = tl.zeros((BLOCK,), dtype=ACC)
    acc2 = tl.zeros((BLOCK,), dtype=ACC)
    for j0 in range(0, n, BLOCK):
        offs, _, m = _channel_block(j0, n, c, C, HW, BLOCK)
        v = tl.where(m, tl.load(Z + offs, mask=m, other=0.0).to(ACC) - shift, 0.0)
        acc1 += v
        acc2 += v * v
    return tl.sum(acc1, axis=0), tl.sum(acc2, axis=0)


@triton.jit
def _latent_bn_stats_kernel(
    Z, RM, PREV,  # inputs: latents, running mean, the summed STATS of round 1 (read in round 2)
    STATS,  # output [4, C]: count, s1, s2 (summed over ranks by the caller's hook), k
    C, HW: tl.constexpr, n,
    ABOUT_PREV_MEAN: tl.constexpr,  # round 2: k = the global mean of PREV; round 1: k = running mean
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,  # compute dtype: fp32, or fp64 for fp64 latents (gradcheck)
):
    """One SyncBN statistics round of the forward: this rank's sums of channel c about k."""
    c = tl.program_id(0)
    if ABOUT_PREV_MEAN:
        k = tl.load(PREV + 3 * C + c) + tl.load(PREV + C + c) / tl.load(PREV + c)
    else:
        k = tl.load(RM + c).to(ACC)
    s1, s2 = _channel_sums(Z, c, C, HW, n, k, BLOCK, ACC)
    tl.store(STATS + c, n * 1.0)
    tl.store(STATS + C + c, s1)
    tl.store(STATS + 2 * C + c, s2)
    tl.store(STATS + 3 * C + c, k)


@triton.jit
def _update_running_stats(RM, RV, NBT, c, rm, rv, mean, var, count, momentum, CUMULATIVE: tl.constexpr,
                          ACC: tl.constexpr):
    """running <- (1 - f) running + f batch (unbiased var); f = momentum (counting the batch) or 1/NBT."""
    if CUMULATIVE:
        f = 1.0 / tl.load(NBT).to(ACC)
    else:
        f = momentum
        if c == 0:
            tl.store(NBT, tl.load(NBT) + 1)
    tl.store(RM + c, rm * (1.0 - f) + mean * f)
    tl.store(RV + c, rv * (1.0 - f) + var * (count / (count - 1.0)) * f)


@triton.jit
def _normalizing_stats(Z, RM, RV, NBT, STATS, c, C, HW: tl.constexpr, n, pid_chunk, momentum, eps,
                       STATS_FROM: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """(k, d, rstd) of channel c, x0 = ((z - k) - d) * rstd; with batch statistics program 0 of the channel also
    updates the running statistics."""
    rm = tl.load(RM + c)
    rv = tl.load(RV + c)
    if STATS_FROM == RUNNING:
        k = rm
        d = tl.zeros_like(rm)
        rstd = 1.0 / tl.sqrt(rv + eps)
    else:
        if STATS_FROM == BATCH:
            total, _ = _channel_sums(Z, c, C, HW, n, 0.0, BLOCK, ACC)
            k = total / n
            s1, s2 = _channel_sums(Z, c, C, HW, n, k, BLOCK, ACC)
            count = n * 1.0
        else:  # SUMMED: round 2's (count, s1, s2) over all ranks, about its k
            count = tl.load(STATS + c)
            s1 = tl.load(STATS + C + c)
            s2 = tl.load(STATS + 2 * C + c)
            k = tl.load(STATS + 3 * C + c)
        d = s1 / count
        var = tl.maximum(s2 / count - d * d, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        if pid_chunk == 0:
            _update_running_stats(RM, RV, NBT, c, rm, rv, k + d, var, count, momentum, CUMULATIVE, ACC)
    return k, d, rstd


@triton.jit
def _latent_bn_fwd_kernel(
    Z, T, NOISE,  # inputs
    X0, XT, VT,  # outputs
    RM, RV, NBT, MEAN, RSTD, STATS,  # running stats (updated in place), saved stats, SUMMED statistics [4, C]
    C, HW: tl.constexpr, n, chunk, momentum, eps,  # HW constexpr: j // HW, j % HW become shifts, not divisions
    STATS_FROM: tl.constexpr,  # RUNNING, BATCH or SUMMED
    CUMULATIVE: tl.constexpr,  # momentum=None: f = 1/num_batches_tracked
    WRITE_X0: tl.constexpr, INTERP: tl.constexpr, PATH: tl.constexpr,  # writes x0, or x_t and v* on PATH
    BLOCK: tl.constexpr, ACC: tl.constexpr,  # ACC: compute dtype, fp32 or fp64 for fp64 latents (gradcheck)
):
    """Normalise elements [pid_chunk * chunk, +chunk) of channel c (and interpolate)."""
    c = tl.program_id(0)
    pid_chunk = tl.program_id(1)
    k, d, rstd = _normalizing_stats(Z, RM, RV, NBT, STATS, c, C, HW, n, pid_chunk, momentum, eps, STATS_FROM,
                                    CUMULATIVE, BLOCK, ACC)
    if pid_chunk == 0:
        tl.store(MEAN + c, k + d)
        tl.store(RSTD + c, rstd)
    j_start = pid_chunk * chunk
    j_end = tl.minimum(j_start + chunk, n)
    for j0 in range(j_start, j_end, BLOCK):
        offs, b, m = _channel_block(j0, j_end, c, C, HW, BLOCK)
        x0 = ((tl.load(Z + offs, mask=m, other=0.0).to(ACC) - k) - d) * rstd  # z - k exact near k (Sterbenz)
        if WRITE_X0:
            tl.store(X0 + offs, x0.to(X0.dtype.element_ty), mask=m)
        if INTERP:
            t = tl.load(T + b, mask=m, other=0.0).to(ACC)
            alpha, sigma, d_alpha, d_sigma = _path_coefficients(t, PATH, ACC)
            e = tl.load(NOISE + offs, mask=m, other=0.0).to(ACC)
            tl.store(XT + offs, (alpha * x0 + sigma * e).to(XT.dtype.element_ty), mask=m)
            tl.store(VT + offs, (d_alpha * x0 + d_sigma * e).to(VT.dtype.element_ty), mask=m)


@triton.jit
def _dx0(DX0, DXT, DVT, T, offs, b, m, HAS_DX0: tl.constexpr, INTERP: tl.constexpr, PATH: tl.constexpr,
         ACC: tl.constexpr):
    """Total gradient reaching x0: dX0 + alpha dx_t + alpha' dv*."""
    g = tl.zeros(offs.shape, dtype=ACC)
    if HAS_DX0:
        g += tl.load(DX0 + offs, mask=m, other=0.0).to(ACC)
    if INTERP:
        t = tl.load(T + b, mask=m, other=0.0).to(ACC)
        alpha, sigma, d_alpha, d_sigma = _path_coefficients(t, PATH, ACC)
        g += alpha * tl.load(DXT + offs, mask=m, other=0.0).to(ACC)
        g += d_alpha * tl.load(DVT + offs, mask=m, other=0.0).to(ACC)
    return g


@triton.jit
def _grad_sums(DX0, DXT, DVT, Z, T, c, C, HW: tl.constexpr, n, mean, rstd, HAS_DX0: tl.constexpr,
               INTERP: tl.constexpr, PATH: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """(sum(g), sum(g * xhat)) over channel c, g the gradient reaching x0."""
    acc1 = tl.zeros((BLOCK,), dtype=ACC)
    acc2 = tl.zeros((BLOCK,), dtype=ACC)
    for j0 in range(0, n, BLOCK):
        offs, b, m = _channel_block(j0, n, c, C, HW, BLOCK)
        g = _dx0(DX0, DXT, DVT, T, offs, b, m, HAS_DX0, INTERP, PATH, ACC)
        xhat = (tl.load(Z + offs, mask=m, other=0.0).to(ACC) - mean) * rstd
        acc1 += g
        acc2 += g * xhat
    return tl.sum(acc1, axis=0), tl.sum(acc2, axis=0)


@triton.jit
def _latent_bn_bwd_stats_kernel(
    DX0, DXT, DVT, Z, T, MEAN, RSTD,  # inputs
    STATS,  # output [3, C]: count, sum(g), sum(g * xhat) of this rank (summed over ranks by the caller's hook)
    C, HW: tl.constexpr, n,
    HAS_DX0: tl.constexpr, INTERP: tl.constexpr, PATH: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """The SyncBN statistics of the backward: this rank's gradient sums of channel c."""
    c = tl.program_id(0)
    sum_g, sum_gx = _grad_sums(DX0, DXT, DVT, Z, T, c, C, HW, n, tl.load(MEAN + c), tl.load(RSTD + c), HAS_DX0,
                               INTERP, PATH, BLOCK, ACC)
    tl.store(STATS + c, n * 1.0)
    tl.store(STATS + C + c, sum_g)
    tl.store(STATS + 2 * C + c, sum_gx)


@triton.jit
def _latent_bn_bwd_kernel(
    DX0, DXT, DVT, Z, T, MEAN, RSTD, STATS,  # inputs (STATS: SUMMED [3, C] count, sum(g), sum(g * xhat))
    DZ, DNOISE,  # outputs
    C, HW: tl.constexpr, n, chunk,
    STATS_FROM: tl.constexpr,  # RUNNING, BATCH or SUMMED, as in the forward
    HAS_DX0: tl.constexpr, INTERP: tl.constexpr, NEED_DNOISE: tl.constexpr, PATH: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr,  # ACC: compute dtype, fp32 or fp64 for fp64 latents (gradcheck)
):
    """dz (and dnoise) of elements [pid_chunk * chunk, +chunk) of channel c."""
    c = tl.program_id(0)
    pid_chunk = tl.program_id(1)
    mean = tl.load(MEAN + c)
    rstd = tl.load(RSTD + c)
    if STATS_FROM == BATCH:
        sum_g, sum_gx = _grad_sums(DX0, DXT, DVT, Z, T, c, C, HW, n, mean, rstd, HAS_DX0, INTERP, PATH, BLOCK, ACC)
        count = n * 1.0
    elif STATS_FROM == SUMMED:
        count = tl.load(STATS + c)
        sum_g = tl.load(STATS + C + c)
        sum_gx = tl.load(STATS + 2 * C + c)
    if STATS_FROM != RUNNING:
        mean_g = sum_g / count
        mean_gx = sum_gx / count
    j_start = pid_chunk * chunk
    j_end = tl.minimum(j_start + chunk, n)
    for j0 in range(j_start, j_end, BLOCK):
        offs, b, m = _channel_block(j0, j_end, c, C, HW, BLOCK)
        g = _dx0(DX0, DXT, DVT, T, offs, b, m, HAS_DX0, INTERP, PATH, ACC)
        if STATS_FROM == RUNNING:
            dz = g * rstd
        else:
            xhat = (tl.load(Z + offs, mask=m, other=0.0).to(ACC) - mean) * rstd
            dz = (g - mean_g - xhat * mean_gx) * rstd
        tl.store(DZ + offs, dz.to(DZ.dtype.element_ty), mask=m)
        if NEED_DNOISE:
            t = tl.load(T + b, mask=m, other=0.0).to(ACC)
            alpha, sigma, d_alpha, d_sigma = _path_coefficients(t, PATH, ACC)
            dxt = tl.load(DXT + offs, mask=m, other=0.0).to(ACC)
            dvt = tl.load(DVT + offs, mask=m, other=0.0).to(ACC)
            tl.store(DNOISE + offs, (sigma * dxt + d_sigma * dvt).to(DNOISE.dtype.element_ty), mask=m)


@triton.jit
def _latent_bn_denorm_kernel(X, RV, RM, OUT, C: tl.constexpr, HW: tl.constexpr, numel, ADD_MEAN: tl.constexpr,
                             BLOCK: tl.constexpr, ACC: tl.constexpr):
    """OUT = X * (1 / rsqrt(RV[c])) (+ RM[c]): the sampling-time denormalisation and its backward."""
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < numel
    c = (i // HW) % C
    inv_scale = 1.0 / (1.0 / tl.sqrt(tl.load(RV + c, mask=m, other=1.0).to(ACC)))
    out = tl.load(X + i, mask=m, other=0.0).to(ACC) * inv_scale
    if ADD_MEAN:
        out += tl.load(RM + c, mask=m, other=0.0).to(ACC)
    tl.store(OUT + i, out.to(OUT.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------------
# Launchers (inputs as kernels.latent_bn* validated them; registered as repae:: ops for torch.compile)
# ---------------------------------------------------------------------------------------------------


def _stats_from(use_batch_stats: bool, stats_hook: StatsHook | None) -> tl.constexpr:
    return RUNNING if not use_batch_stats else (BATCH if stats_hook is None else SUMMED)


def _summed_stats(z: torch.Tensor, running_mean: torch.Tensor, stats_hook: StatsHook, acc: torch.dtype):
    """The two SyncBN statistics rounds of the forward; returns round 2's [4, C] (count, s1, s2 summed, k)."""
    B, C, H, W = z.shape
    n = B * H * W
    prev = None
    for about_prev_mean in (False, True):
        stats = torch.empty(4, C, device=z.device, dtype=acc)
        _latent_bn_stats_kernel[(C,)](z, running_mean, stats if prev is None else prev, stats, C, H * W, n,
                                      ABOUT_PREV_MEAN=about_prev_mean, ACC=tl_dtype(acc), **bn_channel_launch(n))
        stats_hook(stats[:3])
        prev = stats
    return prev


def _latent_bn_fwd_fake(z, t, noise, running_mean, running_var, num_batches_tracked, use_batch_stats, momentum, eps,
                        path):
    stats = z.new_empty(z.shape[1], dtype=acc_dtype(z))
    if t is None:
        return z.new_empty(z.shape), placeholder(z), placeholder(z), stats, torch.empty_like(stats)
    return placeholder(z), z.new_empty(z.shape), z.new_empty(z.shape), stats, torch.empty_like(stats)


@registered_launcher(
    "latent_bn_fwd", fake=_latent_bn_fwd_fake, mutates_args=("running_mean", "running_var", "num_batches_tracked"),
    schema="(Tensor z, Tensor? t, Tensor? noise, Tensor(a!) running_mean, Tensor(b!) running_var, "
           "Tensor(c!)? num_batches_tracked, bool use_batch_stats, float? momentum, float eps, str path) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def latent_bn_fwd(z, t, noise, running_mean, running_var, num_batches_tracked, use_batch_stats, momentum, eps, path,
                  stats_hook=None):
    """Launch the forward; returns (x0, x_t, v*, mean [C], rstd [C]): x0 a placeholder with t, x_t and v*
    placeholders without. stats_hook (SyncBN) is eager-only."""
    assert not (use_batch_stats and momentum is None and num_batches_tracked is None)
    z, noise = contiguous(z), contiguous(noise)
    B, C, H, W = z.shape
    interp = t is not None
    x0 = placeholder(z) if interp else torch.empty_like(z)
    xt, vt = (torch.empty_like(z), torch.empty_like(z)) if interp else (placeholder(z), placeholder(z))
    mean = torch.empty(C, device=z.device, dtype=acc_dtype(z))
    rstd = torch.empty_like(mean)
    nbt = num_batches_tracked if num_batches_tracked is not None else torch.zeros((), dtype=torch.long, device=z.device)
    cumulative = use_batch_stats and momentum is None
    if cumulative:
        nbt.add_(1)  # read by the kernel as 1/num_batches_tracked
    stats_from = _stats_from(use_batch_stats, stats_hook)
    summed = _summed_stats(z, running_mean, stats_hook, mean.dtype) if stats_from is SUMMED else mean
    grid, chunk, launch = bn_grid(z, whole_channel=stats_from is BATCH)
    _latent_bn_fwd_kernel[grid](
        z, t.reshape(-1).contiguous() if interp else z, noise if interp else z,
        z if interp else x0, xt if interp else z, vt if interp else z,  # z stands for outputs never written
        running_mean, running_var, nbt, mean, rstd, summed,
        C, H * W, B * H * W, chunk, momentum or 0.0, eps,
        STATS_FROM=stats_from.value, CUMULATIVE=cumulative, WRITE_X0=not interp, INTERP=interp,
        PATH=PATH_TYPES.index(path), ACC=tl_dtype(mean.dtype), **launch,
    )
    return x0, xt, vt, mean, rstd


def _latent_bn_bwd_fake(dx0, dxt, dvt, z, t, mean, rstd, use_batch_stats, path, need_dnoise):
    return z.new_empty(z.shape), (z.new_empty(z.shape) if need_dnoise else placeholder(z))


@registered_launcher(
    "latent_bn_bwd", fake=_latent_bn_bwd_fake,
    schema="(Tensor? dx0, Tensor? dxt, Tensor? dvt, Tensor z, Tensor? t, Tensor mean, Tensor rstd, "
           "bool use_batch_stats, str path, bool need_dnoise) -> (Tensor, Tensor)",
)
def latent_bn_bwd(dx0, dxt, dvt, z, t, mean, rstd, use_batch_stats, path, need_dnoise, stats_hook=None):
    """Launch the backward; returns (dz, dnoise), dnoise a placeholder when not needed. stats_hook is eager-only."""
    B, C, H, W = z.shape
    interp = t is not None
    # every [B, C, H, W] operand is indexed as dense NCHW (the saved z may be a strided view of the caller's)
    dx0, dxt, dvt, z = contiguous(dx0), contiguous(dxt), contiguous(dvt), contiguous(z)
    if interp and (dxt is None or dvt is None):  # one of x_t, v* unused downstream
        dxt = torch.zeros_like(z) if dxt is None else dxt
        dvt = torch.zeros_like(z) if dvt is None else dvt
    dz = torch.empty_like(z)
    dnoise = torch.empty_like(z) if need_dnoise else placeholder(z)
    args = (dx0 if dx0 is not None else z, dxt if interp else z, dvt if interp else z, z,
            t.reshape(-1).contiguous() if interp else z, mean, rstd)
    flags = dict(HAS_DX0=dx0 is not None, INTERP=interp, PATH=PATH_TYPES.index(path), ACC=tl_dtype(mean.dtype))
    stats_from = _stats_from(use_batch_stats, stats_hook)
    summed = mean
    if stats_from is SUMMED:
        summed = torch.empty(3, C, device=z.device, dtype=mean.dtype)
        _latent_bn_bwd_stats_kernel[(C,)](*args, summed, C, H * W, B * H * W, **flags, **bn_channel_launch(B * H * W))
        stats_hook(summed)
    grid, chunk, launch = bn_grid(z, whole_channel=stats_from is BATCH)
    _latent_bn_bwd_kernel[grid](*args, summed, dz, dnoise if need_dnoise else dz, C, H * W, B * H * W, chunk,
                                STATS_FROM=stats_from.value, NEED_DNOISE=need_dnoise, **flags, **launch)
    return dz, dnoise


def _latent_bn_denorm_fake(x, running_mean, running_var, add_mean):
    return x.new_empty(x.shape)


@registered_launcher("latent_bn_denorm", fake=_latent_bn_denorm_fake,
                     schema="(Tensor x, Tensor running_mean, Tensor running_var, bool add_mean) -> Tensor")
def latent_bn_denorm_fwd(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                         add_mean: bool) -> torch.Tensor:
    """Launch the denormalisation (add_mean=True) or its backward (add_mean=False)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        grid, launch = bn_denorm_grid(x.numel())
        _latent_bn_denorm_kernel[grid](x, running_var, running_mean, out, x.shape[1], x.shape[2] * x.shape[3],
                                       x.numel(), ADD_MEAN=add_mean, ACC=tl_dtype(acc_dtype(x)), **launch)
    return out


latent_bn_fwd_op, latent_bn_bwd_op, latent_bn_denorm_op = latent_bn_fwd.op, latent_bn_bwd.op, latent_bn_denorm_fwd.op


# ---------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------


class LatentBNFn(torch.autograd.Function):
    """BN (+ interpolation): returns x0, or (x_t, v*) when t and noise are given."""

    @staticmethod
    def forward(ctx, z, t, noise, running_mean, running_var, num_batches_tracked, use_batch_stats, momentum, eps, path,
                stats_hook):
        x0, xt, vt, mean, rstd = latent_bn_fwd(z, t, noise, running_mean, running_var, num_batches_tracked,
                                               use_batch_stats, momentum, eps, path, stats_hook=stats_hook)
        ctx.save_for_backward(z, t, mean, rstd)
        ctx.conf = (use_batch_stats, path, stats_hook, t is not None)
        ctx.set_materialize_grads(False)
        return (xt, vt) if t is not None else x0

    @staticmethod
    def backward(ctx, *grads):
        z, t, mean, rstd = ctx.saved_tensors
        use_batch_stats, path, stats_hook, interp = ctx.conf
        dx0, dxt, dvt = (None, *grads) if interp else (grads[0], None, None)
        need_dnoise = interp and ctx.needs_input_grad[2] and (dxt is not None or dvt is not None)
        if dx0 is None and dxt is None and dvt is None:
            return (None,) * 11
        dz, dnoise = latent_bn_bwd(dx0, dxt, dvt, z, t, mean, rstd, use_batch_stats, path, need_dnoise,
                                   stats_hook=stats_hook)
        return (dz if ctx.needs_input_grad[0] else None, None, dnoise if need_dnoise else None) + (None,) * 8


class LatentBNDenormFn(torch.autograd.Function):
    """z = x / rsqrt(running_var) + running_mean, with its backward."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var):
        ctx.save_for_backward(running_mean, running_var)
        return latent_bn_denorm_fwd(x, running_mean, running_var, True)

    @staticmethod
    def backward(ctx, dz):
        running_mean, running_var = ctx.saved_tensors
        return latent_bn_denorm_fwd(dz, running_mean, running_var, False), None, None


@torch.compiler.disable
def _apply_uncompiled(*args):
    """LatentBNFn with a stats hook under torch.compile: a graph break (the hook is a Python callable)."""
    return LatentBNFn.apply(*args)


def latent_bn_triton(z, running_mean, running_var, num_batches_tracked=None, *, use_batch_stats, momentum=0.1, eps=1e-4,
                     stats_hook: StatsHook | None = None):
    """Triton backend of kernels.latent_bn (inputs validated there)."""
    return latent_bn_interp_triton(z, None, None, running_mean, running_var, num_batches_tracked,
                                   use_batch_stats=use_batch_stats, momentum=momentum, eps=eps, stats_hook=stats_hook)


def latent_bn_interp_triton(z, t, noise, running_mean, running_var, num_batches_tracked=None, *, use_batch_stats,
                            path="linear", momentum=0.1, eps=1e-4, stats_hook: StatsHook | None = None):
    """Triton backend of kernels.latent_bn_interp (and of latent_bn, without t and noise)."""
    apply = _apply_uncompiled if stats_hook is not None else LatentBNFn.apply
    return apply(z, t, noise, running_mean, running_var, num_batches_tracked, use_batch_stats, momentum, eps, path,
                 stats_hook)


def latent_bn_denorm_triton(x, running_mean, running_var):
    """Triton backend of kernels.latent_bn_denorm (inputs validated there)."""
    return LatentBNDenormFn.apply(x, running_mean, running_var)
