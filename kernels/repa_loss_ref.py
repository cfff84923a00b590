"""Eager PyTorch twin of kernels/repa_loss_triton.py: REPA's patch-wise negative cosine alignment loss.

Holds the reference math (eager backend, oracle with `upcast=True`, benchmark baseline) and
`make_repa_inputs`. No Triton.

    L = -mean_{b,n} < normalize(z_tilde[b, n]), normalize(z[b, n]) >,  normalize = F.normalize(eps=1e-12)

This is REPA-E's per-sample loop (docs/METHOD.md#loss-weights-and-optimizers) written as one batched expression;
normalize and the dot product run in fp32 (REPA issue #46: fp16 F.normalize gives NaNs).
"""

# B batch, N encoder tokens, C the feature width of both inputs (the glossary's E, encoder width:
# docs/ARCHITECTURE.md#shape-letters)

from __future__ import annotations

import torch
import torch.nn.functional as F


def repa_loss_ref(
    zs_tilde: torch.Tensor, zs: torch.Tensor, *, eps: float = 1e-12, upcast: bool = False
) -> torch.Tensor:
    """0-d loss for one encoder. zs_tilde (projector output), zs (encoder features): [B, N, C].

    upcast=False: fp32 math (the eager backend; fp64 if an input is fp64). upcast=True: float64 (the
    oracle). Returns a 0-d tensor in the compute dtype.
    """
    dtype = torch.float64 if (upcast or torch.float64 in (zs_tilde.dtype, zs.dtype)) else torch.float32
    a, b = zs_tilde.to(dtype), zs.to(dtype)
    cos = (F.normalize(a, dim=-1, eps=eps) * F.normalize(b, dim=-1, eps=eps)).sum(dim=-1)  # (B, N)
    return -cos.mean()


def make_repa_inputs(
    B: int,
    N: int,
    C: int,
    dtype: torch.dtype,
    *,
    target_dtype: torch.dtype | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    magnitude: float = 1.0,
    requires_grad: bool = True,
) -> dict[str, torch.Tensor]:
    """Random (zs_tilde, zs): zs_tilde in dtype (projector output), zs in target_dtype (default dtype).

    zs is correlated with zs_tilde (cosines near 0.5) so the loss is not trivially 0.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(B, N, C, generator=g) * magnitude
    b = 0.5 * a + torch.randn(B, N, C, generator=g) * magnitude
    target_dtype = dtype if target_dtype is None else target_dtype
    return {
        "zs_tilde": a.to(device=device, dtype=dtype).requires_grad_(requires_grad),
        "zs": b.to(device=device, dtype=target_dtype).requires_grad_(requires_grad),
    }
