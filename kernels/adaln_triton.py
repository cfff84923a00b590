"""Fused adaLN of a DiT/SiT block in Triton: gated residual + LayerNorm or RMSNorm (optional weight) + modulate.

Forward (one pass over the rows of one sample chunk; fp32 math and stats, fp64 for fp64 inputs):
    x_new = x + gate[b] * y                      (HAS_RESIDUAL; x_new is rounded to x's dtype, and the
                                                  norm reads that stored value, as eager does)
    layer: mean, rstd = stats of x_new over D    (two-pass in registers: mean, then sum (x - mean)^2)
           xhat = (x_new - mean) * rstd
    rms:   rstd = 1 / sqrt(mean_D(x_new^2) + eps), xhat = x_new * rstd      (IS_RMS; mean stored as 0)
    n = xhat * w                                 (HAS_WEIGHT: elementwise affine weight w [D]; else n = xhat)
    h = n * (1 + scale[b]) + shift[b]            stored in out_dtype
Backward (one pass; xhat recomputed from x_new and the saved stats):
    g      = dh * (1 + scale[b]) * w             (w = 1 without HAS_WEIGHT)
    layer: dx_new = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat)) + dR   (dR: grad flowing into x_new)
    rms:   dx_new = rstd * (g - xhat * mean_D(g * xhat)) + dR
    dx = dx_new,  dy = gate[b] * dx_new
    dgate[b] = sum_T dx_new * y,  dscale[b] = sum_T dh * n,  dshift[b] = sum_T dh     (COND_GRAD)
    dw = sum_{B,T} dh * (1 + scale[b]) * xhat                                           (WEIGHT_GRAD)

Shapes: x, y: [B, T, D] (x fp32/bf16/fp16, y any float); gate, shift, scale: [B, D] any float, rows may
be strided (the `chunk(6, dim=1)` views of the adaLN projection are used without a copy); w: [D] any float.
Saved for backward: x_new (or x), y, gate, scale, w, mean/rstd [B*T] fp32.
Grid: (B, cdiv(T, rows_per_prog)); each program walks rows_per_prog rows of one sample, so the
per-sample condition vectors are loaded once and the T-reductions of the backward accumulate in
registers. Per-chunk partials [B, chunks, D] fp32 (and dw's, summed over B too) are summed with torch in
a fixed order: the backward is deterministic (no atomics). Limit: D <= 16384 (one row in registers).
Bytes per call (E = B*T*D elements): forward reads x, y and writes x_new, h (4E); backward reads dh,
dR, x_new, y and writes dx, dy (6E), plus 3*B*chunks*D*4 bytes of partials when COND_GRAD (B*chunks*D*4
more when WEIGHT_GRAD).
"""

# B batch, T SiT tokens, D SiT hidden width

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import acc_dtype, adaln_chunking, contiguous, next_pow2, row_warps, tl_dtype
from ._library import placeholder, registered_launcher


@triton.jit
def _adaln_fwd_kernel(
    X, Y, GATE, SHIFT, SCALE, W,  # inputs
    XNEW, H, MEAN, RSTD,  # outputs
    stride_gate_b, stride_shift_b, stride_scale_b,  # row strides of the [B, D] conditions
    T, D, rows_per_prog, eps,
    HAS_RESIDUAL: tl.constexpr,
    IS_RMS: tl.constexpr,  # RMSNorm (no mean subtraction) instead of LayerNorm
    HAS_WEIGHT: tl.constexpr,  # elementwise affine weight W [D]
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,  # compute dtype: fp32, or fp64 for fp64 inputs (gradcheck)
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    shift = tl.load(SHIFT + b * stride_shift_b + cols, mask=mask, other=0.0).to(ACC)
    scale1 = 1.0 + tl.load(SCALE + b * stride_scale_b + cols, mask=mask, other=0.0).to(ACC)
    if HAS_RESIDUAL:
        gate = tl.load(GATE + b * stride_gate_b + cols, mask=mask, other=0.0).to(ACC)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    t_start = chunk * rows_per_prog
    t_end = tl.minimum(t_start + rows_per_prog, T)
    for t in range(t_start, t_end):
        row = (b * T + t).to(tl.int64)
        offs = row * D + cols
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        if HAS_RESIDUAL:
            y = tl.load(Y + offs, mask=mask, other=0.0).to(ACC)
            x_store = (x + gate * y).to(XNEW.dtype.element_ty)
            tl.store(XNEW + offs, x_store, mask=mask)
            x = x_store.to(ACC)
        if IS_RMS:
            mean = 0.0
            xc = tl.where(mask, x, 0.0)
        else:
            mean = tl.sum(x, axis=0) / D
            xc = tl.where(mask, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        if HAS_WEIGHT:
            h = xc * rstd * w * scale1 + shift
        else:
            h = xc * rstd * scale1 + shift
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)


@triton.jit
def _adaln_bwd_kernel(
    DH, DXNEW, XNEW, Y, GATE, SCALE, W, MEAN, RSTD,  # inputs
    DX, DY, DGATE_PART, DSCALE_PART, DSHIFT_PART, DW_PART,  # outputs
    stride_gate_b, stride_scale_b,
    T, D, rows_per_prog, num_chunks,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DXNEW: tl.constexpr,
    COND_GRAD: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,  # write per-program dw partials (needs HAS_WEIGHT)
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    scale1 = 1.0 + tl.load(SCALE + b * stride_scale_b + cols, mask=mask, other=0.0).to(ACC)
    if HAS_RESIDUAL:
        gate = tl.load(GATE + b * stride_gate_b + cols, mask=mask, other=0.0).to(ACC)
    if COND_GRAD:
        acc_gate = tl.zeros((BLOCK_D,), dtype=ACC)
        acc_scale = tl.zeros((BLOCK_D,), dtype=ACC)
        acc_shift = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    if WEIGHT_GRAD:
        acc_w = tl.zeros((BLOCK_D,), dtype=ACC)
    t_start = chunk * rows_per_prog
    t_end = tl.minimum(t_start + rows_per_prog, T)
    for t in range(t_start, t_end):
        row = (b * T + t).to(tl.int64)
        offs = row * D + cols
        rstd = tl.load(RSTD + row)
        x = tl.load(XNEW + offs, mask=mask, other=0.0).to(ACC)
        if IS_RMS:
            xhat = tl.where(mask, x * rstd, 0.0)
        else:
            mean = tl.load(MEAN + row)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(ACC)
        g = dh * scale1
        if WEIGHT_GRAD:
            acc_w += g * xhat
        if HAS_WEIGHT:
            g = g * w
        c_xhat = tl.sum(g * xhat, axis=0) / D
        if IS_RMS:
            dx = (g - xhat * c_xhat) * rstd
        else:
            c_mean = tl.sum(g, axis=0) / D
            dx = (g - (xhat * c_xhat + c_mean)) * rstd
        if HAS_DXNEW:
            dx += tl.load(DXNEW + offs, mask=mask, other=0.0).to(ACC)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_RESIDUAL:
            tl.store(DY + offs, (gate * dx).to(DY.dtype.element_ty), mask=mask)
        if COND_GRAD:
            if HAS_RESIDUAL:
                y = tl.load(Y + offs, mask=mask, other=0.0).to(ACC)
                acc_gate += dx * y
            if HAS_WEIGHT:
                acc_scale += dh * xhat * w
            else:
                acc_scale += dh * xhat
            acc_shift += dh
    if WEIGHT_GRAD:
        tl.store(DW_PART + (b * num_chunks + chunk).to(tl.int64) * D + cols, acc_w, mask=mask)
    if COND_GRAD:
        part = (b * num_chunks + chunk).to(tl.int64) * D + cols
        if HAS_RESIDUAL:
            tl.store(DGATE_PART + part, acc_gate, mask=mask)
        tl.store(DSCALE_PART + part, acc_scale, mask=mask)
        tl.store(DSHIFT_PART + part, acc_shift, mask=mask)


def _adaln_fwd_fake(x, shift, scale, y, gate, eps, out_dtype, weight=None, rms=False):
    B, T, D = x.shape
    stats = x.new_empty(B * T, dtype=acc_dtype(x))
    x_new = x.new_empty(x.shape) if y is not None else placeholder(x)
    return x_new, x.new_empty((B, T, D), dtype=out_dtype), stats, torch.empty_like(stats)


@registered_launcher(
    "adaln_fwd", fake=_adaln_fwd_fake,
    schema="(Tensor x, Tensor shift, Tensor scale, Tensor? y, Tensor? gate, float eps, ScalarType out_dtype, "
           "Tensor? weight=None, bool rms=False) -> (Tensor, Tensor, Tensor, Tensor)",
)
def adaln_fwd(
    x_BTD: torch.Tensor,
    shift_BD: torch.Tensor,
    scale_BD: torch.Tensor,
    y_BTD: torch.Tensor | None,
    gate_BD: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    weight_D: torch.Tensor | None = None,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward; returns (x_new, h, mean_BT, rstd_BT), x_new a placeholder without a residual (it is
    x itself), mean_BT zeros for rms. Inputs as kernels.adaln validated them."""
    assert x_BTD.dim() == 3 and (y_BTD is None) == (gate_BD is None)
    x_BTD, y_BTD, weight_D = contiguous(x_BTD), contiguous(y_BTD), contiguous(weight_D)
    B, T, D = x_BTD.shape
    has_residual = y_BTD is not None
    x_new = torch.empty_like(x_BTD) if has_residual else placeholder(x_BTD)
    h = torch.empty(B, T, D, device=x_BTD.device, dtype=out_dtype)
    mean = torch.empty(B * T, device=x_BTD.device, dtype=acc_dtype(x_BTD))
    rstd = torch.empty_like(mean)
    if B * T == 0:
        return x_new, h, mean, rstd
    rows, chunks = adaln_chunking(x_BTD)
    block = next_pow2(D)
    gate_arg = gate_BD if has_residual else shift_BD  # never read without HAS_RESIDUAL
    _adaln_fwd_kernel[(B, chunks)](
        x_BTD, y_BTD if has_residual else x_BTD, gate_arg, shift_BD, scale_BD,
        weight_D if weight_D is not None else shift_BD,  # never read without HAS_WEIGHT
        x_new if has_residual else x_BTD, h, mean, rstd,
        gate_arg.stride(0), shift_BD.stride(0), scale_BD.stride(0),
        T, D, rows, eps,
        HAS_RESIDUAL=has_residual, IS_RMS=rms, HAS_WEIGHT=weight_D is not None, BLOCK_D=block,
        ACC=tl_dtype(mean.dtype), num_warps=row_warps(block),
    )
    return x_new, h, mean, rstd


def _adaln_bwd_fake(dh, dxnew, xnew, scale, y, gate, mean, rstd, cond_grad, weight=None, rms=False,
                    weight_grad=False):
    B, _, D = xnew.shape
    dy = y.new_empty(y.shape) if y is not None else placeholder(xnew)
    dw = mean.new_empty(D) if weight_grad else placeholder(mean)
    return xnew.new_empty(xnew.shape), dy, (mean.new_empty((3, B, D)) if cond_grad else placeholder(mean)), dw


@registered_launcher(
    "adaln_bwd", fake=_adaln_bwd_fake,
    schema="(Tensor dh, Tensor? dxnew, Tensor xnew, Tensor scale, Tensor? y, Tensor? gate, Tensor mean, Tensor rstd, "
           "bool cond_grad, Tensor? weight=None, bool rms=False, bool weight_grad=False) "
           "-> (Tensor, Tensor, Tensor, Tensor)",
)
def adaln_bwd(
    dh_BTD: torch.Tensor,
    dxnew_BTD: torch.Tensor | None,
    xnew_BTD: torch.Tensor,
    scale_BD: torch.Tensor,
    y_BTD: torch.Tensor | None,
    gate_BD: torch.Tensor | None,
    mean_BT: torch.Tensor,
    rstd_BT: torch.Tensor,
    cond_grad: bool,
    weight_D: torch.Tensor | None = None,
    rms: bool = False,
    weight_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward; returns (dx, dy, cond, dw) with cond = [dgate, dscale, dshift] as one fp32 [3, B, D]
    tensor (dgate rows zero without a residual) and dw the fp32 [D] weight grad; dy without a residual, cond
    without cond_grad and dw without weight_grad are placeholders."""
    assert not weight_grad or weight_D is not None
    B, T, D = xnew_BTD.shape
    has_residual = y_BTD is not None
    # every [B, T, D] operand is indexed as dense rows (a saved y may be a strided view of the caller's)
    dh_BTD, dxnew_BTD, xnew_BTD, y_BTD, weight_D = (
        contiguous(t) for t in (dh_BTD, dxnew_BTD, xnew_BTD, y_BTD, weight_D))
    dx = torch.empty_like(xnew_BTD)
    dy = torch.empty_like(y_BTD) if has_residual else placeholder(xnew_BTD)
    rows, chunks = adaln_chunking(xnew_BTD)
    parts = torch.empty(3, B, chunks, D, device=xnew_BTD.device, dtype=mean_BT.dtype) if cond_grad else None
    w_parts = torch.empty(B * chunks, D, device=xnew_BTD.device, dtype=mean_BT.dtype) if weight_grad else None
    if B * T > 0:
        block = next_pow2(D)
        gate_arg = gate_BD if has_residual else scale_BD
        p_gate, p_scale, p_shift = (parts[0], parts[1], parts[2]) if cond_grad else (dx, dx, dx)
        _adaln_bwd_kernel[(B, chunks)](
            dh_BTD, dxnew_BTD if dxnew_BTD is not None else dh_BTD, xnew_BTD,
            y_BTD if has_residual else xnew_BTD, gate_arg, scale_BD,
            weight_D if weight_D is not None else scale_BD, mean_BT, rstd_BT,  # W never read without HAS_WEIGHT
            dx, dy if has_residual else dx, p_gate, p_scale, p_shift, w_parts if weight_grad else dx,
            gate_arg.stride(0), scale_BD.stride(0),
            T, D, rows, chunks,
            HAS_RESIDUAL=has_residual, HAS_DXNEW=dxnew_BTD is not None, COND_GRAD=cond_grad,
            IS_RMS=rms, HAS_WEIGHT=weight_D is not None, WEIGHT_GRAD=weight_grad, BLOCK_D=block,
            ACC=tl_dtype(mean_BT.dtype), num_warps=row_warps(block),
        )
    if weight_grad and B * T == 0:
        w_parts.zero_()
    dw = w_parts.sum(dim=0) if weight_grad else placeholder(mean_BT)  # fixed-order reduction: deterministic
    if not cond_grad:
        return dx, dy, placeholder(mean_BT), dw
    if B * T == 0:
        parts.zero_()
    cond = parts.sum(dim=2)  # (3, B, D), fixed-order reduction over chunks: deterministic
    if not has_residual:
        cond[0].zero_()  # the kernel writes no dgate partials without a residual
    return dx, dy, cond, dw


adaln_fwd_op, adaln_bwd_op = adaln_fwd.op, adaln_bwd.op  # the repae:: ops torch.compile records


class AdaLNFn(torch.autograd.Function):
    """Autograd of the fused adaLN: forward returns (x_new, h) with a residual, h alone without one."""

    @staticmethod
    def forward(ctx, x, shift, scale, y, gate, weight, eps, out_dtype, rms):
        x_new, h, mean, rstd = adaln_fwd(x, shift, scale, y, gate, eps, out_dtype, weight, rms)
        ctx.has_residual, ctx.rms = y is not None, rms
        ctx.save_for_backward(x_new if ctx.has_residual else x, scale, y, gate, weight, mean, rstd)
        ctx.cond_dtypes = (shift.dtype, scale.dtype, None if gate is None else gate.dtype,
                           None if weight is None else weight.dtype)
        ctx.set_materialize_grads(False)
        return (x_new, h) if ctx.has_residual else h

    @staticmethod
    def backward(ctx, *grads):
        x_new, scale, y, gate, weight, mean, rstd = ctx.saved_tensors
        dxnew, dh = grads if ctx.has_residual else (None, grads[0])
        if dh is None:
            dh = torch.zeros_like(x_new)
        _, need_shift, need_scale, need_y, need_gate, need_weight = ctx.needs_input_grad[:6]
        dx, dy, cond, dw = adaln_bwd(dh, dxnew, x_new, scale, y, gate, mean, rstd,
                                     need_shift or need_scale or need_gate, weight, ctx.rms, need_weight)
        shift_dtype, scale_dtype, gate_dtype, weight_dtype = ctx.cond_dtypes
        return (
            dx,
            cond[2].to(shift_dtype) if need_shift else None,
            cond[1].to(scale_dtype) if need_scale else None,
            dy if need_y else None,  # y and gate are None without a residual: need_y, need_gate False
            cond[0].to(gate_dtype) if need_gate else None,
            dw.to(weight_dtype) if need_weight else None,  # weight is None when absent: need_weight False
            None,
            None,
            None,
        )


def adaln_triton(x, shift, scale, *, y=None, gate=None, eps=1e-6, norm="layer", weight=None, out_dtype=None):
    """Triton backend of kernels.adaln (inputs validated there): returns (x_new, h)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    out = AdaLNFn.apply(x, shift, scale, y, gate, weight, eps, out_dtype, norm == "rms")
    return out if y is not None else (x, out)  # a block's first norm: x_new is x itself
