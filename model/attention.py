"""Multi-head self-attention of the SiT block, with a choice of backend (no norm, no residual here).

Same parameters and keys as timm's `Attention(dim, num_heads, qkv_bias=True, qk_norm=...)` used by the
original SiT (`qkv`, optional `q_norm`/`k_norm` LayerNorm(head_dim), `proj`), same math:
softmax(q k^T * K^-0.5) v per head. Backends:

    "flash_attn"      flash-attn's `flash_attn_func` (if installed; CUDA, fp16/bf16 inputs)
    "sdpa"            F.scaled_dot_product_attention, PyTorch picks the kernel
    "sdpa_cudnn", "sdpa_flash", "sdpa_efficient"
                      F.scaled_dot_product_attention restricted to that kernel (errors if it cannot run)
    "math"            the explicit eager formula (timm's non-fused path): the reference the others match
    "auto"            flash_attn when installed and the inputs allow it; else on CUDA sdpa with cuDNN
                      first (the fastest on Hopper for head_dim 72), then flash, efficient, math;
                      on CPU plain sdpa.

The backend a module actually runs is logged once (logger "repae.model") and kept in `last_backend`.
"""

# B batch, T tokens, D hidden, A heads, K head dim (docs/ARCHITECTURE.md#shape-letters)

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("repae.model")

ATTN_BACKENDS = ("auto", "flash_attn", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "math")
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def _sdpa_backends(name: str) -> list:
    from torch.nn.attention import SDPBackend

    table = {
        "sdpa_cudnn": [SDPBackend.CUDNN_ATTENTION],
        "sdpa_flash": [SDPBackend.FLASH_ATTENTION],
        "sdpa_efficient": [SDPBackend.EFFICIENT_ATTENTION],
        # auto on CUDA: cuDNN first (set_priority), then the others, math last.
        "auto_cuda": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH],
    }
    return table[name]


def resolve_attn_backend(name: str, q_BTAK: torch.Tensor) -> str:
    """The backend a call with this query runs ("auto" resolved); ValueError for an unknown name."""
    if name not in ATTN_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTN_BACKENDS}, got {name!r}")
    if name == "flash_attn" and not HAS_FLASH_ATTN:
        raise ValueError("attention backend 'flash_attn' requested but flash-attn is not installed "
                         "(pip install flash-attn --no-build-isolation, or use 'auto'/'sdpa')")
    if name != "auto":
        return name
    if HAS_FLASH_ATTN and q_BTAK.is_cuda and q_BTAK.dtype in (torch.float16, torch.bfloat16):
        return "flash_attn"
    return "sdpa_auto_cuda" if q_BTAK.is_cuda else "sdpa"


def attention_math(q_BATK: torch.Tensor, k_BATK: torch.Tensor, v_BATK: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(K)) v, written out (timm Attention with fused_attn=False)."""
    q_BATK = q_BATK * q_BATK.shape[-1] ** -0.5
    attn_BATT = (q_BATK @ k_BATK.transpose(-2, -1)).softmax(dim=-1)
    return attn_BATT @ v_BATK


def multihead_attention(q_BTAK: torch.Tensor, k_BTAK: torch.Tensor, v_BTAK: torch.Tensor, backend: str) -> torch.Tensor:
    """Attention over T for every (batch, head), inputs and output [B, T, H, K]; `backend` already resolved."""
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        return flash_attn_func(q_BTAK, k_BTAK, v_BTAK)
    q, k, v = (t.transpose(1, 2) for t in (q_BTAK, k_BTAK, v_BTAK))  # (B, H, T, K)
    if backend == "math":
        out = attention_math(q, k, v)
    elif backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        from torch.nn.attention import sdpa_kernel

        key = "auto_cuda" if backend == "sdpa_auto_cuda" else backend
        with sdpa_kernel(_sdpa_backends(key), set_priority=key == "auto_cuda"):
            out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """timm-compatible multi-head self-attention: forward(x [B, T, D]) -> [B, T, D]."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, qk_norm: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention: hidden size {dim} is not divisible by num_heads={num_heads}")
        if backend not in ATTN_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTN_BACKENDS}, got {backend!r}")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # timm's default norm_layer for qk_norm is nn.LayerNorm (eps 1e-5, affine).
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.last_backend: str | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).reshape(B, T, 3, self.num_heads, self.head_dim).unbind(2)  # (B, T, H, K)
        q, k = self.q_norm(q), self.k_norm(k)
        backend = resolve_attn_backend(self.backend, q)
        if backend != self.last_backend:
            logger.info("attention backend: %s (requested %s, head_dim %d, %s %s)", backend, self.backend,
                        self.head_dim, q.dtype, q.device.type)
            self.last_backend = backend
        out_BTAK = multihead_attention(q, k, v, backend)
        return self.proj(out_BTAK.reshape(B, T, D))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend}"
