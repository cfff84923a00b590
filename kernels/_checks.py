"""Input validation shared by the eager and Triton backends of every op.

Each check raises ValueError naming the argument, its shape, dtype or device; nothing here computes.
Both backends apply the same checks (the row limits of the Triton kernels included), so switching
backends never changes which inputs are accepted.
"""

from __future__ import annotations

import torch

from ._launch import check_float, check_rank, check_same_device, check_shape
from .latent_bn_ref import PATH_TYPES

ADALN_MAX_D = 16384
REPA_MAX_C = 16384


def _check_cond(name: str, c: torch.Tensor, B: int, D: int) -> None:
    check_float(name, c)
    check_shape(name, c, (B, D))
    if D > 1 and c.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous along D (stride 1), got strides {list(c.stride())}")


def check_adaln_inputs(x_BTD, shift_BD, scale_BD, y_BTD, gate_BD) -> None:
    """ValueError naming the argument for every adaln input the chosen backend cannot take."""
    check_float("x", x_BTD)
    check_rank("x", x_BTD, 3, "[B, T, D]")
    B, T, D = x_BTD.shape
    if (y_BTD is None) != (gate_BD is None):
        raise ValueError("adaln: y and gate must be given together (the gated residual) or both omitted")
    _check_cond("shift", shift_BD, B, D)
    _check_cond("scale", scale_BD, B, D)
    if y_BTD is not None:
        check_float("y", y_BTD)
        check_shape("y", y_BTD, (B, T, D))
        _check_cond("gate", gate_BD, B, D)
    if D > ADALN_MAX_D:
        raise ValueError(f"adaln: D={D} exceeds the {ADALN_MAX_D} limit of the one-row kernel")
    check_same_device(x=x_BTD, y=y_BTD, gate=gate_BD, shift=shift_BD, scale=scale_BD)


def check_repa_inputs(zs_tilde: torch.Tensor, zs: torch.Tensor) -> None:
    """ValueError naming the argument for every repa_loss input the chosen backend cannot take."""
    check_float("zs_tilde", zs_tilde)
    check_float("zs", zs)
    check_rank("zs_tilde", zs_tilde, 3, "[B, N, C]")
    check_rank("zs", zs, 3, "[B, N, C]")
    if zs_tilde.shape != zs.shape:
        raise ValueError(
            f"repa_loss: zs_tilde {list(zs_tilde.shape)} and zs {list(zs.shape)} must have the same shape "
            f"[B, N, C] (same token count N and feature dim C)"
        )
    if zs.shape[-1] > REPA_MAX_C:
        raise ValueError(f"repa_loss: C={zs.shape[-1]} exceeds the {REPA_MAX_C} limit of the one-row kernel")
    check_same_device(zs_tilde=zs_tilde, zs=zs)


def check_latent_bn_inputs(z, running_mean, running_var, num_batches_tracked, t=None, noise=None, path="linear"):
    """ValueError naming the argument for every latent_bn input (both backends take the same)."""
    check_float("z", z)
    check_rank("z", z, 4, "[B, C, H, W]")
    B, C = z.shape[:2]
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        check_shape(name, v, (C,))
        if v.dtype != torch.float32:
            raise ValueError(f"{name} must be fp32 (BatchNorm statistics are kept in fp32), got {v.dtype}")
    nbt = num_batches_tracked
    if nbt is not None and (nbt.dtype != torch.long or nbt.numel() != 1):
        raise ValueError(
            f"num_batches_tracked must be a one-element int64 tensor, got {num_batches_tracked.dtype} "
            f"{list(num_batches_tracked.shape)}"
        )
    if t is not None:
        check_float("t", t)
        if t.numel() != B:
            raise ValueError(f"t must hold one time per sample (B={B} elements), got shape {list(t.shape)}")
        check_float("noise", noise)
        check_shape("noise", noise, tuple(z.shape))
        if path not in PATH_TYPES:
            raise ValueError(f"path must be one of {PATH_TYPES}, got {path!r}")
    check_same_device(z=z, running_mean=running_mean, running_var=running_var, t=t, noise=noise)


