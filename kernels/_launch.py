"""Shared launch helpers for the Triton kernels: input checks, block/warp choice, SM count.

Holds no kernel and no math. Everything here is cheap host-side Python that every launcher uses, so
that the error messages (which name the argument, its shape, dtype and device) read the same for
every op.
"""

from __future__ import annotations

import functools
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def interpreter_on() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.cache
def sm_count(device_index: int) -> int:
    """Number of SMs of a CUDA device (cached); 8 stands in for the CPU interpreter."""
    if device_index < 0:
        return 8
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sm_count(t: torch.Tensor) -> int:
    """SM count of the device that holds t."""
    return sm_count(t.device.index if t.is_cuda else -1)


def warps_for_block(block: int, lo: int = 1, hi: int = 16) -> int:
    """num_warps for a one-row program over `block` elements: ~256 elements per warp, clamped."""
    return max(lo, min(hi, block // 256))


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
    if device.type == "cuda" or (device.type == "cpu" and interpreter_on()):
        return
    raise ValueError(
        f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got a tensor on "
        f"{device}; use backend='eager' or REPAE_KERNELS=eager"
    )


def contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor itself when contiguous, else a contiguous copy (kernels index rows as dense)."""
    return None if t is None else t.contiguous()


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Compute dtype of a kernel: fp64 when any input is fp64 (gradcheck), else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The triton.language dtype for fp32 / fp64 (imported lazily: this module loads without Triton)."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]
