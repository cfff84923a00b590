"""Launch heuristics of every Triton kernel, in one place with the reasoning, plus the host-side facts they use.

Holds no kernel, no math and no input validation (that is kernels/_checks.py). Nothing here imports Triton at
module level (`import repae.kernels` must not), so `cdiv` is written out.

The kernels are memory-bound one-pass reductions; the choices below keep enough programs in flight to cover
every SM, and enough bytes in flight per program to hide memory latency, while each reduction stays inside one
program (fixed order: deterministic). The numbers are reasoned starting points, untuned unless a PERF note says
otherwise; compile_check.py reports registers, spills and access widths at the recipe's shapes.
"""

# B batch, T SiT tokens, D SiT hidden width, N encoder tokens, C latent channels (in the REPA loss: the feature
# width of both inputs, the glossary's E), H, W latent height and width (docs/ARCHITECTURE.md#shape-letters)

from __future__ import annotations

import functools
import os

import torch

CPU_SMS = 8
"""What the CPU interpreter counts as SMs: enough programs to exercise the chunked paths."""


def interpreter_on() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.cache
def sm_count(device_index: int) -> int:
    """Number of SMs of a CUDA device (cached); CPU_SMS for the CPU interpreter (index -1)."""
    if device_index < 0:
        return CPU_SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sm_count(t: torch.Tensor) -> int:
    """SM count of the device that holds t."""
    return sm_count(t.device.index if t.is_cuda else -1)


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


# ---------------------------------------------------------------------------------------------------
# adaLN: one program walks rows of one sample, a whole row of D in registers
# ---------------------------------------------------------------------------------------------------


def row_warps(block: int) -> int:
    """num_warps for a program holding one row of `block` elements: ~256 elements (8 per thread, two 128-bit
    fp32 loads) per warp, 1 to 16 warps: fewer elements per thread than that leaves loads narrow, more spills."""
    return max(1, min(16, block // 256))


def adaln_chunking(x_BTD: torch.Tensor) -> tuple[int, int]:
    """(rows_per_prog, num_chunks) of the adaLN grid (B, num_chunks): about 8 programs per SM, never more
    rows than T. A program loads its sample's conditions once and, in the backward, accumulates their
    gradients over its rows in registers; more rows per program means fewer [B, chunks, D] partials to sum.

    PERF: untuned starting point (flash-attn's LayerNorm backward uses 8 programs per SM).
    """
    B, T, _ = x_BTD.shape
    target_programs = 8 * device_sm_count(x_BTD)
    num_chunks = max(1, min(T, target_programs // max(B, 1)))
    rows_per_prog = cdiv(T, num_chunks)
    return rows_per_prog, cdiv(T, rows_per_prog)


# ---------------------------------------------------------------------------------------------------
# REPA loss: [BLOCK_M, BLOCK_C] tiles of whole rows, ~4 programs per SM
# ---------------------------------------------------------------------------------------------------

REPA_NUM_WARPS = 4
REPA_PARTIALS_BLOCK = 1024
"""Partials the last program of the forward adds per iteration (one per program: 4 per SM fits in one)."""


def repa_tiling(a_BNC: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_M, rows_per_prog, num_progs) of the REPA loss over M = B*N rows of C: a tile of ~4096
    elements (BLOCK_C = next_pow2(C) covers a row, BLOCK_M rows of it: 32 fp32 per thread over 4 warps), and
    about 4 programs per SM, each looping over its rows and keeping one partial (few partials to add).

    PERF: untuned starting point.
    """
    M, C = a_BNC.shape[0] * a_BNC.shape[1], a_BNC.shape[2]
    block_c = next_pow2(C)
    block_m = max(1, 4096 // block_c)
    target = 4 * device_sm_count(a_BNC)
    rows = block_m * max(1, cdiv(M, target * block_m))
    return block_c, block_m, rows, cdiv(M, rows)


# ---------------------------------------------------------------------------------------------------
# Latent BN: programs own (a chunk of) one channel of n = B*H*W elements
# ---------------------------------------------------------------------------------------------------

BN_BLOCK = 1024
"""Elements per loop iteration of a program that owns a chunk of a channel (4 warps, 8 per thread)."""
BN_CHANNEL_BLOCK = 8192
"""Elements per loop iteration of a program that owns a whole channel (up to 16 warps)."""


def bn_chunked_launch() -> dict:
    """BLOCK and num_warps of a launch that spreads each channel over several programs."""
    return {"BLOCK": BN_BLOCK, "num_warps": 4}


def bn_channel_launch(n: int) -> dict:
    """BLOCK and num_warps of a launch with one program per channel (the batch statistics in one program).

    Such a launch has only C programs (4 for f8d4) on 132 SMs, each walking its n = B*H*W elements in a serial
    loop: it is bound by memory latency, not bandwidth, so each iteration should have as many bytes in flight
    as one SM allows: up to 8192 elements over 16 warps (16 per thread, four 128-bit loads for fp32) instead
    of 1024 over 4. compile_check: no spills at the recipe's shapes.
    PERF: chosen by that reasoning, not yet measured on a GPU.
    """
    block = min(BN_CHANNEL_BLOCK, max(BN_BLOCK, next_pow2(n)))
    return {"BLOCK": block, "num_warps": max(4, block // 512)}


def bn_grid(z_BCHW: torch.Tensor, whole_channel: bool) -> tuple[tuple[int, int], int, dict]:
    """((C, chunks), elements per program, launch config) of a normalising latent-BN launch. A launch that
    computes the batch statistics itself needs each channel in one program; the others spread each channel
    over chunks of BN_BLOCK multiples, about 4 programs per SM in total.

    PERF: untuned starting point.
    """
    B, C, H, W = z_BCHW.shape
    n = B * H * W
    if whole_channel:
        return (C, 1), n, bn_channel_launch(n)
    chunks = max(1, min(cdiv(n, BN_BLOCK), cdiv(4 * device_sm_count(z_BCHW), C)))
    chunk = BN_BLOCK * cdiv(cdiv(n, BN_BLOCK), chunks)
    return (C, cdiv(n, chunk)), chunk, bn_chunked_launch()


def bn_denorm_grid(numel: int) -> tuple[tuple[int], dict]:
    """Grid and launch config of the elementwise denormalisation: BN_BLOCK elements per program."""
    return (cdiv(numel, BN_BLOCK),), {"BLOCK": BN_BLOCK}
