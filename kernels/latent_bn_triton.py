"""REPA-E's latent BatchNorm (affine=False) fused with the flow interpolation, in Triton.

Forward, per channel c over its n = B*H*W elements (fp32 math, fp64 for fp64 latents; running stats fp32):
    STATS_FUSED  (one launch, one program per channel): K = mean(z), then s1 = sum(z - K),
                 s2 = sum((z - K)^2): an exact two-pass variance; the running-stat update, the
                 normalisation and the interpolation follow in the same program.
    STATS_LOCAL  (SyncBN, launch 1 of 3): s1, s2 about K = running_mean[c]; writes (n, s1, s2, K) to
                 STATS [4, C]. The caller's hook sums rows 0..2 over ranks.
    STATS_RECENTER (SyncBN, launch 2 of 3): s1, s2 again, about K = the global mean of launch 1
                 (K + s1/n there); the hook sums them. Sums about the running mean alone lose the
                 variance to cancellation when the batch mean is far from it in units of the batch std
                 (first steps, a drifting VAE); about the global mean this is an exact two-pass variance.
    STATS_GLOBAL (SyncBN, launch 3 of 3): reads the summed (n, s1, s2) and K of launch 2.
    STATS_EVAL   : mean, var = running_mean, running_var.
    mean = K + s1/n,  var = s2/n - (s1/n)^2 (biased),  rstd = 1/sqrt(var + eps)
    x0 = ((z - K) - s1/n) * rstd   (K first: z - K is exact for z near K, so a mean far from 0 in units
                                    of the std keeps its digits; eval: K = running_mean, s1 = 0)
    running_mean <- (1-f) running_mean + f mean,  running_var <- (1-f) running_var + f var n/(n-1)
                 (f = momentum, or 1/num_batches_tracked for momentum=None; program 0 of each
                 channel writes, and num_batches_tracked += 1 in the same launch)
    x0 = (z - mean) * rstd;  x_t = alpha(t_b) x0 + sigma(t_b) eps;  v* = alpha'(t_b) x0 + sigma'(t_b) eps
Backward (dx0 = dX0 + alpha dx_t + alpha' dv*;  deps = sigma dx_t + sigma' dv*):
    eval:  dz = rstd * dx0
    train: dz = rstd * (dx0 - sum(dx0)/n - xhat * sum(dx0 xhat)/n)     (sums over the global batch;
           with a hook, launch 1 writes the local sums, the hook adds them over ranks, launch 2 applies)
Denormalisation: z = x / rsqrt(running_var) + running_mean (no eps), and its backward dx = dz / rsqrt(var).

Shapes: z, noise: [B, C, H, W] contiguous NCHW, any float dtype (outputs take z's dtype); t: B elements;
running stats [C] fp32; num_batches_tracked int64 0-d. Saved for backward: z, t, mean/rstd [C] fp32.
H*W (and C in the denormalisation) are compile-time constants: one specialization per latent shape,
and the element -> (b, c, hw) index math compiles to shifts, not 32-bit divisions. Grid: (C, chunks)
over B*H*W, 1024-element iterations; the launches that reduce a whole channel use (C, 1) with up to
8192-element iterations over 16 warps (see _channel_launch). Deterministic: every reduction is a
fixed-order sum inside one program (no atomics), so repeated calls are bitwise equal.
Bytes: forward reads z, eps and writes x_t, v* (or x0); backward reads dx_t, dv*, z and writes dz.
"""

# B batch, C latent channels, H, W latent height and width

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_latent_bn_inputs
from ._launch import acc_dtype, check_runnable, contiguous, device_sm_count, tl_dtype
from .latent_bn_ref import PATH_TYPES, StatsHook

STATS_EVAL, STATS_FUSED, STATS_LOCAL, STATS_GLOBAL, STATS_RECENTER = 0, 1, 2, 3, 4
BLOCK = 1024  # elements per loop iteration of a program that owns a chunk of a channel (4 warps)
CHANNEL_BLOCK = 8192  # ... of a program that owns a whole channel (the statistics launches)


@triton.jit
def _path_coefficients(t, PATH: tl.constexpr, ACC: tl.constexpr):
    """(alpha, sigma, d_alpha, d_sigma) of the linear (PATH=0) or cosine (PATH=1) path, in ACC."""
    if PATH == 0:
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
def _channel_sums(X, c, C, HW: tl.constexpr, n, shift, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Per-channel (sum(v), sum(v^2)) with v = X - shift."""
    acc1 = tl.zeros((BLOCK,), dtype=ACC)
    acc2 = tl.zeros((BLOCK,), dtype=ACC)
    for j0 in range(0, n, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < n
        offs = (j // HW).to(tl.int64) * C * HW + c * HW + j % HW
        v = tl.where(m, tl.load(X + offs, mask=m, other=0.0).to(ACC) - shift, 0.0)
        acc1 += v
        acc2 += v * v
    return tl.sum(acc1, axis=0), tl.sum(acc2, axis=0)


@triton.jit
def _latent_bn_fwd_kernel(
    Z, T, NOISE,  # inputs
    X0, XT, VT,  # outputs
    RM, RV, NBT, MEAN, RSTD, STATS, STATS_PREV,  # running stats (updated in place), saved stats, SyncBN stats
    C, HW: tl.constexpr, n, chunk, momentum, eps,  # HW constexpr: j // HW, j % HW become shifts, not divisions
    STATS_MODE: tl.constexpr,
    CUMULATIVE: tl.constexpr,  # momentum=None: f = 1/num_batches_tracked
    WRITE_X0: tl.constexpr,
    INTERP: tl.constexpr,
    PATH: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,  # compute dtype: fp32, or fp64 for fp64 latents (gradcheck)
):
    c = tl.program_id(0)
    pid_chunk = tl.program_id(1)
    rm = tl.load(RM + c)
    rv = tl.load(RV + c)
    if STATS_MODE == 2 or STATS_MODE == 4:  # STATS_LOCAL / STATS_RECENTER: local sums about k, then stop
        if STATS_MODE == 2:
            k = rm.to(ACC)
        else:  # the global mean from the summed sums of STATS_LOCAL
            k = tl.load(STATS_PREV + 3 * C + c) + tl.load(STATS_PREV + C + c) / tl.load(STATS_PREV + c)
        s1, s2 = _channel_sums(Z, c, C, HW, n, k, BLOCK, ACC)
        tl.store(STATS + c, n * 1.0)
        tl.store(STATS + C + c, s1)
        tl.store(STATS + 2 * C + c, s2)
        tl.store(STATS + 3 * C + c, k)
        return
    if STATS_MODE == 0:
        k = rm
        mean = rm
        rstd = 1.0 / tl.sqrt(rv + eps)
    else:
        if STATS_MODE == 1:  # STATS_FUSED: exact two-pass statistics inside this program
            total, _ = _channel_sums(Z, c, C, HW, n, 0.0, BLOCK, ACC)
            k = total / n
            s1, s2 = _channel_sums(Z, c, C, HW, n, k, BLOCK, ACC)
            count = n * 1.0
        else:  # STATS_GLOBAL: the hook summed (count, s1, s2) over ranks
            count = tl.load(STATS + c)
            s1 = tl.load(STATS + C + c)
            s2 = tl.load(STATS + 2 * C + c)
            k = tl.load(STATS + 3 * C + c)
        d = s1 / count
        mean = k + d
        var = tl.maximum(s2 / count - d * d, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        if pid_chunk == 0:
            if CUMULATIVE:
                f = 1.0 / tl.load(NBT).to(ACC)
            else:
                f = momentum
                if c == 0:
                    tl.store(NBT, tl.load(NBT) + 1)
            tl.store(RM + c, rm * (1.0 - f) + mean * f)
            tl.store(RV + c, rv * (1.0 - f) + var * (count / (count - 1.0)) * f)
    if pid_chunk == 0:
        tl.store(MEAN + c, mean)
        tl.store(RSTD + c, rstd)
    j_start = pid_chunk * chunk
    j_end = tl.minimum(j_start + chunk, n)
    for j0 in range(j_start, j_end, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < j_end
        b = j // HW
        offs = b.to(tl.int64) * C * HW + c * HW + j % HW
        x0 = tl.load(Z + offs, mask=m, other=0.0).to(ACC) - k  # exact when z is near k (Sterbenz)
        if STATS_MODE != 0:
            x0 = x0 - d  # the small remainder of the mean: (z - k) - d keeps digits that z - (k + d) loses
        x0 = x0 * rstd
        if WRITE_X0:
            tl.store(X0 + offs, x0.to(X0.dtype.element_ty), mask=m)
        if INTERP:
            t = tl.load(T + b, mask=m, other=0.0).to(ACC)
            alpha, sigma, d_alpha, d_sigma = _path_coefficients(t, PATH, ACC)
            e = tl.load(NOISE + offs, mask=m, other=0.0).to(ACC)
            tl.store(XT + offs, (alpha * x0 + sigma * e).to(XT.dtype.element_ty), mask=m)
            tl.store(VT + offs, (d_alpha * x0 + d_sigma * e).to(VT.dtype.element_ty), mask=m)


@triton.jit
def _latent_bn_bwd_kernel(
    DX0, DXT, DVT, Z, T, MEAN, RSTD, STATS,  # inputs (STATS [3, C]: count, sum dx0, sum dx0*xhat)
    DZ, DNOISE,  # outputs
    C, HW: tl.constexpr, n, chunk,
    STATS_MODE: tl.constexpr,
    HAS_DX0: tl.constexpr,
    INTERP: tl.constexpr,
    NEED_DNOISE: tl.constexpr,
    PATH: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,  # compute dtype: fp32, or fp64 for fp64 latents (gradcheck)
):
    c = tl.program_id(0)
    pid_chunk = tl.program_id(1)
    mean = tl.load(MEAN + c)
    rstd = tl.load(RSTD + c)
    if STATS_MODE != 0:
        if STATS_MODE != 3:  # STATS_FUSED or STATS_LOCAL: sums of dx0 and dx0 * xhat over this rank's batch
            acc1 = tl.zeros((BLOCK,), dtype=ACC)
            acc2 = tl.zeros((BLOCK,), dtype=ACC)
            for j0 in range(0, n, BLOCK):
                j = j0 + tl.arange(0, BLOCK)
                m = j < n
                b = j // HW
                offs = b.to(tl.int64) * C * HW + c * HW + j % HW
                g = _dx0(DX0, DXT, DVT, T, offs, b, m, HAS_DX0, INTERP, PATH, ACC)
                xhat = (tl.load(Z + offs, mask=m, other=0.0).to(ACC) - mean) * rstd
                acc1 += g
                acc2 += g * xhat
            sum_g = tl.sum(acc1, axis=0)
            sum_gx = tl.sum(acc2, axis=0)
            count = n * 1.0
            if STATS_MODE == 2:
                tl.store(STATS + c, count)
                tl.store(STATS + C + c, sum_g)
                tl.store(STATS + 2 * C + c, sum_gx)
                return
        else:  # STATS_GLOBAL
            count = tl.load(STATS + c)
            sum_g = tl.load(STATS + C + c)
            sum_gx = tl.load(STATS + 2 * C + c)
        mean_g = sum_g / count
        mean_gx = sum_gx / count
    j_start = pid_chunk * chunk
    j_end = tl.minimum(j_start + chunk, n)
    for j0 in range(j_start, j_end, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        m = j < j_end
        b = j // HW
        offs = b.to(tl.int64) * C * HW + c * HW + j % HW
        g = _dx0(DX0, DXT, DVT, T, offs, b, m, HAS_DX0, INTERP, PATH, ACC)
        if STATS_MODE == 0:
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
def _latent_bn_denorm_kernel(X, RV, RM, OUT, C: tl.constexpr, HW: tl.constexpr, numel, ADD_MEAN: tl.constexpr,
                             BLOCK: tl.constexpr, ACC: tl.constexpr):
    """OUT = X / rsqrt(RV[c]) (+ RM[c]): the sampling-time denormalisation and its backward."""
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
# Launchers
# ---------------------------------------------------------------------------------------------------


def _channel_launch(n: int) -> dict:
    """BLOCK and num_warps of a launch with one program per channel (batch statistics in one program).

    Such a launch has only C programs (4 for f8d4) on 132 SMs, each walking its n = B*H*W elements in
    a serial loop: it is bound by memory latency, not bandwidth, so each iteration should have as many
    bytes in flight as one SM allows: up to 8192 elements over 16 warps (16 per thread, four 128-bit
    loads for fp32) instead of 1024 over 4. compile_check: no spills at the recipe's shapes.
    PERF: chosen by that reasoning, not yet measured on a GPU.
    """
    block = min(CHANNEL_BLOCK, max(BLOCK, 1 << max(0, (n - 1).bit_length())))
    return {"BLOCK": block, "num_warps": max(4, block // 512)}


def _grid(z: torch.Tensor, stats_mode: int) -> tuple[tuple[int, int], int]:
    """((C, chunks), elements per program): the fused-stats mode needs the whole channel in one
    program; the others spread each channel over about 4 programs per SM in total.

    PERF: untuned placeholder (not yet measured on a GPU).
    """
    B, C, H, W = z.shape
    n = B * H * W
    if stats_mode == STATS_FUSED:
        return (C, 1), n
    chunks = max(1, min(triton.cdiv(n, BLOCK), triton.cdiv(4 * device_sm_count(z), C)))
    chunk = BLOCK * triton.cdiv(triton.cdiv(n, BLOCK), chunks)
    return (C, triton.cdiv(n, chunk)), chunk


def latent_bn_fwd(z, t, noise, running_mean, running_var, num_batches_tracked, *, use_batch_stats, momentum, eps,
                  path, write_x0, stats_hook):
    """Launch the forward; returns (x0 or None, x_t or None, v* or None, mean [C], rstd [C])."""
    check_latent_bn_inputs(z, running_mean, running_var, num_batches_tracked, t, noise, path)
    check_runnable(z.device)
    z, noise = contiguous(z), contiguous(noise)
    B, C, H, W = z.shape
    HW, n = H * W, B * H * W
    if use_batch_stats and n <= 1:
        raise ValueError(f"latent_bn: expected more than 1 value per channel when training, got z {list(z.shape)}")
    if use_batch_stats and momentum is None and num_batches_tracked is None:
        raise ValueError("latent_bn: momentum=None (cumulative average) needs num_batches_tracked")
    interp = t is not None
    x0 = torch.empty_like(z) if write_x0 else None
    xt = torch.empty_like(z) if interp else None
    vt = torch.empty_like(z) if interp else None
    mean = torch.empty(C, device=z.device, dtype=acc_dtype(z))
    rstd = torch.empty_like(mean)
    nbt = num_batches_tracked if num_batches_tracked is not None else torch.zeros((), dtype=torch.long, device=z.device)
    cumulative = use_batch_stats and momentum is None
    if cumulative:
        nbt.add_(1)  # read by the kernel as 1/num_batches_tracked
    stats = None
    t_arg = t.reshape(-1).contiguous() if interp else z
    common = dict(CUMULATIVE=cumulative, WRITE_X0=write_x0, INTERP=interp, PATH=PATH_TYPES.index(path),
                  ACC=tl_dtype(mean.dtype))
    per_channel, chunked = _channel_launch(n), {"BLOCK": BLOCK, "num_warps": 4}
    outs = (x0 if write_x0 else z, xt if interp else z, vt if interp else z)
    mode = STATS_EVAL if not use_batch_stats else (STATS_FUSED if stats_hook is None else STATS_GLOBAL)
    if mode == STATS_GLOBAL:  # two rounds of global sums: about the running mean, then about the global mean
        prev = None
        for stats_mode in (STATS_LOCAL, STATS_RECENTER):
            stats = torch.empty(4, C, device=z.device, dtype=mean.dtype)
            _latent_bn_fwd_kernel[(C, 1)](
                z, t_arg, noise if interp else z, *outs, running_mean, running_var, nbt, mean, rstd, stats,
                stats if prev is None else prev, C, HW, n, n, momentum or 0.0, eps, STATS_MODE=stats_mode, **common,
                **per_channel,
            )
            stats_hook(stats[:3])
            prev = stats
    grid, chunk = _grid(z, mode)
    _latent_bn_fwd_kernel[grid](
        z, t_arg, noise if interp else z, *outs, running_mean, running_var, nbt, mean, rstd,
        stats if stats is not None else mean, mean,
        C, HW, n, chunk, momentum or 0.0, eps, STATS_MODE=mode, **common,
        **(per_channel if mode == STATS_FUSED else chunked),
    )
    return x0, xt, vt, mean, rstd


def latent_bn_bwd(dx0, dxt, dvt, z, t, mean, rstd, *, use_batch_stats, path, need_dnoise, stats_hook):
    """Launch the backward; returns (dz, dnoise or None)."""
    B, C, H, W = z.shape
    HW, n = H * W, B * H * W
    interp = t is not None
    # every [B, C, H, W] operand is indexed as dense NCHW (the saved z may be a strided view of the caller's)
    dx0, dxt, dvt, z = contiguous(dx0), contiguous(dxt), contiguous(dvt), contiguous(z)
    if interp and (dxt is None or dvt is None):  # one of x_t, v* unused downstream
        dxt = torch.zeros_like(z) if dxt is None else dxt
        dvt = torch.zeros_like(z) if dvt is None else dvt
    dz = torch.empty_like(z)
    dnoise = torch.empty_like(z) if need_dnoise else None
    args = (dx0 if dx0 is not None else z, dxt if interp else z, dvt if interp else z, z,
            t.reshape(-1).contiguous() if interp else z, mean, rstd)
    common = dict(HAS_DX0=dx0 is not None, INTERP=interp, NEED_DNOISE=need_dnoise, PATH=PATH_TYPES.index(path),
                  ACC=tl_dtype(mean.dtype))
    per_channel, chunked = _channel_launch(n), {"BLOCK": BLOCK, "num_warps": 4}
    outs = (dz, dnoise if need_dnoise else dz)
    mode = STATS_EVAL if not use_batch_stats else (STATS_FUSED if stats_hook is None else STATS_GLOBAL)
    stats = mean
    if mode == STATS_GLOBAL:
        stats = torch.empty(3, C, device=z.device, dtype=mean.dtype)
        _latent_bn_bwd_kernel[(C, 1)](*args, stats, *outs, C, HW, n, n, STATS_MODE=STATS_LOCAL, **common,
                                      **per_channel)
        stats_hook(stats)
    grid, chunk = _grid(z, mode)
    _latent_bn_bwd_kernel[grid](*args, stats, *outs, C, HW, n, chunk, STATS_MODE=mode, **common,
                                **(per_channel if mode == STATS_FUSED else chunked))
    return dz, dnoise


def latent_bn_denorm_fwd(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                         add_mean: bool = True) -> torch.Tensor:
    """Launch the denormalisation (add_mean=True) or its backward (add_mean=False)."""
    check_latent_bn_inputs(x, running_mean, running_var, None)
    check_runnable(x.device)
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        _latent_bn_denorm_kernel[(triton.cdiv(x.numel(), BLOCK),)](
            x, running_var, running_mean, out, x.shape[1], x.shape[2] * x.shape[3], x.numel(),
            ADD_MEAN=add_mean, BLOCK=BLOCK, ACC=tl_dtype(acc_dtype(x)),
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------


class LatentBNFn(torch.autograd.Function):
    """BN (+ interpolation): returns x0, or (x_t, v*) when t and noise are given. Under torch.compile
    (dynamo traces forward and backward) the launches go through the repae:: ops below."""

    @staticmethod
    def forward(ctx, z, t, noise, running_mean, running_var, num_batches_tracked, use_batch_stats, momentum, eps, path,
                stats_hook):
        interp = t is not None
        launch = _fwd_through_op if torch.compiler.is_compiling() else latent_bn_fwd
        x0, xt, vt, mean, rstd = launch(
            z, t, noise, running_mean, running_var, num_batches_tracked, use_batch_stats=use_batch_stats,
            momentum=momentum, eps=eps, path=path, write_x0=not interp, stats_hook=stats_hook,
        )
        ctx.save_for_backward(z, t, mean, rstd)
        ctx.conf = (use_batch_stats, path, stats_hook, interp)
        ctx.set_materialize_grads(False)
        return (xt, vt) if interp else x0

    @staticmethod
    def backward(ctx, *grads):
        z, t, mean, rstd = ctx.saved_tensors
        use_batch_stats, path, stats_hook, interp = ctx.conf
        dx0, dxt, dvt = (None, *grads) if interp else (grads[0], None, None)
        need_dnoise = interp and ctx.needs_input_grad[2] and (dxt is not None or dvt is not None)
        if dx0 is None and dxt is None and dvt is None:
            return (None,) * 11
        launch = _bwd_through_op if torch.compiler.is_compiling() else latent_bn_bwd
        dz, dnoise = launch(dx0, dxt, dvt, z, t, mean, rstd, use_batch_stats=use_batch_stats, path=path,
                            need_dnoise=need_dnoise, stats_hook=stats_hook)
        return (dz if ctx.needs_input_grad[0] else None, None, dnoise if need_dnoise else None) + (None,) * 8


class LatentBNDenormFn(torch.autograd.Function):
    """z = x / rsqrt(running_var) + running_mean, with its backward."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var):
        ctx.save_for_backward(running_mean, running_var)
        if torch.compiler.is_compiling():
            check_latent_bn_inputs(x, running_mean, running_var, None)  # at trace time
            return latent_bn_denorm_op(x, running_mean, running_var, True)
        return latent_bn_denorm_fwd(x, running_mean, running_var, add_mean=True)

    @staticmethod
    def backward(ctx, dz):
        running_mean, running_var = ctx.saved_tensors
        launch = latent_bn_denorm_op if torch.compiler.is_compiling() else latent_bn_denorm_fwd
        return launch(dz, running_mean, running_var, False), None, None


# ---------------------------------------------------------------------------------------------------
# torch.library ops: what torch.compile records for each launch (one opaque graph node each, no graph
# break). The autograd Functions above call them while compiling (dynamo traces a Function's forward
# and backward) and the launchers directly otherwise (less dispatch overhead). A mutating op cannot
# carry its own autograd formula, which is why the Function, not the op, holds the backward. Empty
# placeholders stand for the outputs a mode does not write (an op returns tensors, never None).
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "repae::latent_bn_fwd", mutates_args=("running_mean", "running_var", "num_batches_tracked"),
    schema="(Tensor z, Tensor? t, Tensor? noise, Tensor(a!) running_mean, Tensor(b!) running_var, "
           "Tensor(c!)? num_batches_tracked, bool use_batch_stats, float? momentum, float eps, str path) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def latent_bn_fwd_op(z, t, noise, running_mean, running_var, num_batches_tracked, use_batch_stats, momentum, eps, path):
    """latent_bn_fwd (no hook) as an op: (x0, x_t, v*, mean, rstd); x0 empty with t, x_t and v* without."""
    x0, xt, vt, mean, rstd = latent_bn_fwd(z, t, noise, running_mean, running_var, num_batches_tracked,
                                           use_batch_stats=use_batch_stats, momentum=momentum, eps=eps, path=path,
                                           write_x0=t is None, stats_hook=None)
    if t is None:
        return x0, z.new_empty(0), z.new_empty(0), mean, rstd
    return z.new_empty(0), xt, vt, mean, rstd


@latent_bn_fwd_op.register_fake
def _(z, t, noise, running_mean, running_var, num_batches_tracked, use_batch_stats, momentum, eps, path):
    stats = z.new_empty(z.shape[1], dtype=acc_dtype(z))
    if t is None:
        return z.new_empty(z.shape), z.new_empty(0), z.new_empty(0), stats, torch.empty_like(stats)
    return z.new_empty(0), z.new_empty(z.shape), z.new_empty(z.shape), stats, torch.empty_like(stats)


def _fwd_through_op(z, t, noise, running_mean, running_var, num_batches_tracked, *, use_batch_stats, momentum, eps,
                    path, write_x0, stats_hook):
    """latent_bn_fwd's interface over the op (the caller keeps hooks out: they cannot enter a graph)."""
    check_latent_bn_inputs(z, running_mean, running_var, num_batches_tracked, t, noise, path)  # at trace time
    x0, xt, vt, mean, rstd = latent_bn_fwd_op(z, t, noise, running_mean, running_var, num_batches_tracked,
                                              use_batch_stats, momentum, eps, path)
    return (x0, None, None, mean, rstd) if t is None else (None, xt, vt, mean, rstd)


@torch.library.custom_op(
    "repae::latent_bn_bwd", mutates_args=(),
    schema="(Tensor? dx0, Tensor? dxt, Tensor? dvt, Tensor z, Tensor? t, Tensor mean, Tensor rstd, "
           "bool use_batch_stats, str path, bool need_dnoise) -> (Tensor, Tensor)",
)
def latent_bn_bwd_op(dx0, dxt, dvt, z, t, mean, rstd, use_batch_stats, path, need_dnoise):
    """latent_bn_bwd (no hook) as an op: (dz, dnoise), dnoise empty when not needed."""
    dz, dnoise = latent_bn_bwd(dx0, dxt, dvt, z, t, mean, rstd, use_batch_stats=use_batch_stats, path=path,
                               need_dnoise=need_dnoise, stats_hook=None)
    return dz, (dnoise if dnoise is not None else z.new_empty(0))


@latent_bn_bwd_op.register_fake
def _(dx0, dxt, dvt, z, t, mean, rstd, use_batch_stats, path, need_dnoise):
    return z.new_empty(z.shape), (z.new_empty(z.shape) if need_dnoise else z.new_empty(0))


def _bwd_through_op(dx0, dxt, dvt, z, t, mean, rstd, *, use_batch_stats, path, need_dnoise, stats_hook):
    """latent_bn_bwd's interface over the op."""
    dz, dnoise = latent_bn_bwd_op(dx0, dxt, dvt, z, t, mean, rstd, use_batch_stats, path, need_dnoise)
    return dz, (dnoise if need_dnoise else None)


@torch.library.custom_op("repae::latent_bn_denorm", mutates_args=(),
                         schema="(Tensor x, Tensor running_mean, Tensor running_var, bool add_mean) -> Tensor")
def latent_bn_denorm_op(x, running_mean, running_var, add_mean):
    """latent_bn_denorm_fwd as an op."""
    return latent_bn_denorm_fwd(x, running_mean, running_var, add_mean=add_mean)


@latent_bn_denorm_op.register_fake
def _(x, running_mean, running_var, add_mean):
    return x.new_empty(x.shape)


@torch.compiler.disable
def _apply_uncompiled(*args):
    """LatentBNFn with a stats hook under torch.compile: a graph break (the hook is a Python callable)."""
    return LatentBNFn.apply(*args)


def latent_bn_triton(z, running_mean, running_var, num_batches_tracked=None, *, use_batch_stats, momentum=0.1, eps=1e-4,
                     stats_hook: StatsHook | None = None):
    """Triton backend of kernels.latent_bn."""
    apply = _apply_uncompiled if stats_hook is not None else LatentBNFn.apply
    return apply(z, None, None, running_mean, running_var, num_batches_tracked, use_batch_stats, momentum, eps,
                 "linear", stats_hook)


def latent_bn_interp_triton(z, t, noise, running_mean, running_var, num_batches_tracked=None, *, use_batch_stats,
                            path="linear", momentum=0.1, eps=1e-4, stats_hook: StatsHook | None = None):
    """Triton backend of kernels.latent_bn_interp."""
    apply = _apply_uncompiled if stats_hook is not None else LatentBNFn.apply
    return apply(z, t, noise, running_mean, running_var, num_batches_tracked, use_batch_stats, momentum, eps, path,
                 stats_hook)


def latent_bn_denorm_triton(x, running_mean, running_var):
    """Triton backend of kernels.latent_bn_denorm."""
    return LatentBNDenormFn.apply(x, running_mean, running_var)
