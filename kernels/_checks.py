"""Input validation of the public functional API (kernels/functional.py), the one place inputs are checked.

Each check raises ValueError naming the argument, its shape, dtype or device; nothing here computes. The
functional API applies them once per call, before choosing a backend, so both backends accept the same inputs
(the row limits of the Triton kernels included) and switching backends never changes which inputs are
accepted. Below that boundary (references, launchers, autograd Functions, torch.library ops) only asserts.
"""

# B batch, T SiT tokens, D SiT hidden width, N encoder tokens, C latent channels (in the REPA loss: the feature
# width of both inputs, the glossary's E), H, W latent height and width (docs/ARCHITECTURE.md#shape-letters)

from __future__ import annotations

import torch

from . import _launch, _library
from .adaln_ref import NORMS
from .latent_bn_ref import PATH_TYPES

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ADALN_MAX_D = 16384
REPA_MAX_C = 16384


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise ValueError unless t is a floating-point tensor."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor (fp32, fp16, bf16 or fp64), got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless t has exactly this shape."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    """Raise ValueError unless t has `rank` dimensions; `layout` names them (e.g. '[B, T, D]')."""
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {list(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Raise ValueError unless every non-None tensor is on one device; return that device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def check_runnable(device: torch.device) -> None:
    """Raise ValueError when Triton cannot run on this device (CPU without the interpreter)."""
    if device.type == "cuda" or (device.type == "cpu" and (_launch.interpreter_on() or _library.as_ops_on())):
        return
    raise ValueError(
        f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got a tensor on "
        f"{device}; use backend='eager' or REPAE_KERNELS=eager"
    )


def _check_cond(name: str, c_BD: torch.Tensor, B: int, D: int) -> None:
    check_float(name, c_BD)
    check_shape(name, c_BD, (B, D))
    if D > 1 and c_BD.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous along D (stride 1), got strides {list(c_BD.stride())}")


def check_adaln_inputs(x_BTD, shift_BD, scale_BD, y_BTD, gate_BD, norm="layer", weight_D=None) -> None:
    """ValueError naming the argument for every adaln input a backend cannot take."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
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
    if weight_D is not None:
        check_float("weight", weight_D)
        check_shape("weight", weight_D, (D,))
    if D > ADALN_MAX_D:
        raise ValueError(f"adaln: D={D} exceeds the {ADALN_MAX_D} limit of the one-row kernel")
    check_same_device(x=x_BTD, y=y_BTD, gate=gate_BD, shift=shift_BD, scale=scale_BD, weight=weight_D)


def check_repa_inputs(zs_tilde_BNC: torch.Tensor, zs_BNC: torch.Tensor) -> None:
    """ValueError naming the argument for every repa_loss input (one encoder's pair) a backend cannot take."""
    check_float("zs_tilde", zs_tilde_BNC)
    check_float("zs", zs_BNC)
    check_rank("zs_tilde", zs_tilde_BNC, 3, "[B, N, C]")
    check_rank("zs", zs_BNC, 3, "[B, N, C]")
    if zs_tilde_BNC.shape != zs_BNC.shape:
        raise ValueError(
            f"repa_loss: zs_tilde {list(zs_tilde_BNC.shape)} and zs {list(zs_BNC.shape)} must have the same shape "
            f"[B, N, C] (same token count N and feature dim C)"
        )
    B, N, C = zs_BNC.shape
    if C > REPA_MAX_C:
        raise ValueError(f"repa_loss: C={C} exceeds the {REPA_MAX_C} limit of the one-row kernel")
    if B * N == 0:
        raise ValueError(f"repa_loss: empty input {list(zs_BNC.shape)} (the mean over zero tokens is undefined)")
    check_same_device(zs_tilde=zs_tilde_BNC, zs=zs_BNC)


def check_latent_bn_inputs(z_BCHW, running_mean, running_var, num_batches_tracked, *, use_batch_stats=False,
                           momentum=0.1, t_B=None, noise_BCHW=None, path="linear") -> None:
    """ValueError naming the argument for every latent_bn / latent_bn_interp / latent_bn_denorm input."""
    check_float("z", z_BCHW)
    check_rank("z", z_BCHW, 4, "[B, C, H, W]")
    B, C, H, W = z_BCHW.shape
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        check_shape(name, v, (C,))
        if v.dtype != torch.float32:
            raise ValueError(f"{name} must be fp32 (BatchNorm statistics are kept in fp32), got {v.dtype}")
    nbt = num_batches_tracked
    if nbt is not None and (nbt.dtype != torch.long or nbt.numel() != 1):
        raise ValueError(f"num_batches_tracked must be a one-element int64 tensor, got {nbt.dtype} {list(nbt.shape)}")
    if use_batch_stats and B * H * W <= 1:
        raise ValueError(f"latent_bn: expected more than 1 value per channel when training, got z {[B, C, H, W]}")
    if use_batch_stats and momentum is None and nbt is None:
        raise ValueError("latent_bn: momentum=None (cumulative average) needs num_batches_tracked")
    if t_B is not None:
        check_float("t", t_B)
        if t_B.numel() != B:
            raise ValueError(f"t must hold one time per sample (B={B} elements), got shape {list(t_B.shape)}")
        if t_B.requires_grad and torch.is_grad_enabled():
            raise ValueError("latent_bn_interp: t must not require grad (the time is sampled, not learned)")
        check_float("noise", noise_BCHW)
        check_shape("noise", noise_BCHW, (B, C, H, W))
        if path not in PATH_TYPES:
            raise ValueError(f"path must be one of {PATH_TYPES}, got {path!r}")
    check_same_device(z=z_BCHW, running_mean=running_mean, running_var=running_var, t=t_B, noise=noise_BCHW)
