"""Fused REPA cosine alignment loss in Triton, forward and backward, one launch each.

Forward, per row r of M = B*N rows (fp32 math whatever the input dtypes; fp64 if one input is fp64):
    na = max(|a_r|, eps),  nb = max(|b_r|, eps),  cos_r = <a_r, b_r> / (na * nb)
    L = -(1/M) * sum_r cos_r
Each program sums its rows' cosines into one fp32 partial; the last program to finish (an atomic
ticket counter) adds the partials in index order and writes L. Deterministic, no host sync.
Backward (recomputes the norms; g = dL * (-1/M), loaded from the grad tensor on device):
    da_r = g * (b_r / (na * nb) - [|a_r| >= eps] * cos_r * a_r / na^2)
    db_r = g * (a_r / (na * nb) - [|b_r| >= eps] * cos_r * b_r / nb^2)
The [|a| >= eps] factor is F.normalize's clamp_min: below eps the norm is the constant eps.

Shapes: a (z_tilde, the projector output) and b (z, the encoder features): [B, N, C], any float dtype
each; L is a 0-d fp32 tensor (fp64 for fp64 inputs); da, db take the dtypes of a and b. Saved: a, b (no per-row state).
Grid: (cdiv(M, rows_per_prog),), BLOCK_M rows x BLOCK_C = next_pow2(C) columns per tile.
Limit: C <= 16384. Bytes: forward reads a, b; backward reads a, b and writes da (and db if needed).
"""

# B batch, N encoder tokens, C the feature width of both inputs (the glossary's E, encoder width:
# docs/ARCHITECTURE.md#shape-letters), M = B * N rows

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import REPA_NUM_WARPS, REPA_PARTIALS_BLOCK, acc_dtype, contiguous, repa_tiling, tl_dtype
from ._library import placeholder, registered_launcher


@triton.jit
def _repa_loss_fwd_kernel(
    A, B, PARTIAL, TICKET, LOSS,
    M, C, rows_per_prog, num_progs, eps, neg_inv_m,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,  # compute dtype: fp32, or fp64 when an input is fp64 (gradcheck)
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols[None, :] < C
    r_start = pid * rows_per_prog
    r_end = tl.minimum(r_start + rows_per_prog, M)
    acc = tl.zeros((BLOCK_M,), dtype=ACC)
    for r0 in range(r_start, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < r_end
        mask = row_ok[:, None] & col_mask
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        a = tl.load(A + offs, mask=mask, other=0.0).to(ACC)
        b = tl.load(B + offs, mask=mask, other=0.0).to(ACC)
        na = tl.maximum(tl.sqrt(tl.sum(a * a, axis=1)), eps)
        nb = tl.maximum(tl.sqrt(tl.sum(b * b, axis=1)), eps)
        cos = tl.sum(a * b, axis=1) / (na * nb)
        acc += tl.where(row_ok, cos, 0.0)
    tl.store(PARTIAL + pid, tl.sum(acc, axis=0))
    tl.debug_barrier()  # this program's partial is written before its ticket is taken
    ticket = tl.atomic_add(TICKET, 1, sem="acq_rel")
    if ticket == num_progs - 1:  # the last program reduces all partials in a fixed order
        total = tl.zeros((BLOCK_P,), dtype=ACC)
        for p0 in range(0, num_progs, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            total += tl.load(PARTIAL + p, mask=p < num_progs, other=0.0, volatile=True)
        tl.store(LOSS, tl.sum(total, axis=0) * neg_inv_m)


@triton.jit
def _repa_loss_bwd_kernel(
    A, B, DLOSS, DA, DB,
    M, C, rows_per_prog, eps, neg_inv_m,
    HAS_DA: tl.constexpr,
    HAS_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols[None, :] < C
    g = tl.load(DLOSS).to(ACC) * neg_inv_m
    r_start = pid * rows_per_prog
    r_end = tl.minimum(r_start + rows_per_prog, M)
    for r0 in range(r_start, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < r_end)[:, None] & col_mask
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        a = tl.load(A + offs, mask=mask, other=0.0).to(ACC)
        b = tl.load(B + offs, mask=mask, other=0.0).to(ACC)
        na_raw = tl.sqrt(tl.sum(a * a, axis=1))
        nb_raw = tl.sqrt(tl.sum(b * b, axis=1))
        na = tl.maximum(na_raw, eps)
        nb = tl.maximum(nb_raw, eps)
        inv_nab = 1.0 / (na * nb)
        cos = tl.sum(a * b, axis=1) * inv_nab
        if HAS_DA:
            ka = tl.where(na_raw >= eps, cos / (na * na), 0.0)
            da = g * (b * inv_nab[:, None] - a * ka[:, None])
            tl.store(DA + offs, da.to(DA.dtype.element_ty), mask=mask)
        if HAS_DB:
            kb = tl.where(nb_raw >= eps, cos / (nb * nb), 0.0)
            db = g * (a * inv_nab[:, None] - b * kb[:, None])
            tl.store(DB + offs, db.to(DB.dtype.element_ty), mask=mask)


def _repa_loss_fwd_fake(zs_tilde, zs, eps):
    return zs.new_empty((), dtype=acc_dtype(zs_tilde, zs))


@registered_launcher("repa_loss_fwd", fake=_repa_loss_fwd_fake,
                     schema="(Tensor zs_tilde, Tensor zs, float eps) -> Tensor")
def repa_loss_fwd(zs_tilde_BNC: torch.Tensor, zs_BNC: torch.Tensor, eps: float) -> torch.Tensor:
    """Launch the forward; returns the 0-d fp32 loss. Inputs as kernels.repa_loss validated them."""
    a, b = contiguous(zs_tilde_BNC), contiguous(zs_BNC)
    M, C = a.shape[0] * a.shape[1], a.shape[2]
    assert a.shape == b.shape and M > 0
    block_c, block_m, rows, num_progs = repa_tiling(a)
    acc = acc_dtype(a, b)
    partial = torch.empty(num_progs, device=a.device, dtype=acc)
    ticket = torch.zeros(1, device=a.device, dtype=torch.int32)
    loss = torch.empty((), device=a.device, dtype=acc)
    _repa_loss_fwd_kernel[(num_progs,)](
        a, b, partial, ticket, loss,
        M, C, rows, num_progs, eps, -1.0 / M,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_P=REPA_PARTIALS_BLOCK, ACC=tl_dtype(acc), num_warps=REPA_NUM_WARPS,
    )
    return loss


def _repa_loss_bwd_fake(dloss, zs_tilde, zs, eps, need_da, need_db):
    da = zs_tilde.new_empty(zs_tilde.shape) if need_da else placeholder(zs_tilde)
    return da, (zs.new_empty(zs.shape) if need_db else placeholder(zs))


@registered_launcher(
    "repa_loss_bwd", fake=_repa_loss_bwd_fake,
    schema="(Tensor dloss, Tensor zs_tilde, Tensor zs, float eps, bool need_da, bool need_db) -> (Tensor, Tensor)",
)
def repa_loss_bwd(dloss: torch.Tensor, zs_tilde_BNC: torch.Tensor, zs_BNC: torch.Tensor, eps: float, need_da: bool,
                  need_db: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward; returns (d zs_tilde, d zs), a placeholder where not needed."""
    a, b = contiguous(zs_tilde_BNC), contiguous(zs_BNC)
    M, C = a.shape[0] * a.shape[1], a.shape[2]
    da = torch.empty_like(a) if need_da else placeholder(a)
    db = torch.empty_like(b) if need_db else placeholder(b)
    block_c, block_m, rows, num_progs = repa_tiling(a)
    _repa_loss_bwd_kernel[(num_progs,)](
        a, b, dloss.reshape(()).contiguous(), da if need_da else a, db if need_db else b,
        M, C, rows, eps, -1.0 / M,
        HAS_DA=need_da, HAS_DB=need_db, BLOCK_M=block_m, BLOCK_C=block_c, ACC=tl_dtype(acc_dtype(a, b)),
        num_warps=REPA_NUM_WARPS,
    )
    return da, db


repa_loss_fwd_op, repa_loss_bwd_op = repa_loss_fwd.op, repa_loss_bwd.op  # the repae:: ops torch.compile records


class REPALossFn(torch.autograd.Function):
    """Autograd of one encoder's loss: (zs_tilde, zs, eps) -> 0-d fp32 loss."""

    @staticmethod
    def forward(ctx, zs_tilde, zs, eps):
        ctx.save_for_backward(zs_tilde, zs)
        ctx.eps = eps
        return repa_loss_fwd(zs_tilde, zs, eps)

    @staticmethod
    def backward(ctx, dloss):
        zs_tilde, zs = ctx.saved_tensors
        need_da, need_db = ctx.needs_input_grad[:2]
        if not (need_da or need_db):
            return None, None, None
        da, db = repa_loss_bwd(dloss, zs_tilde, zs, ctx.eps, need_da, need_db)
        return (da if need_da else None), (db if need_db else None), None


def repa_loss_triton(zs_tilde: torch.Tensor, zs: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """Triton backend of kernels.repa_loss for one encoder (inputs validated there)."""
    return REPALossFn.apply(zs_tilde, zs, eps)
