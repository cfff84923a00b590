"""Eager PyTorch twin of kernels/adaln_triton.py: the gated residual + norm + modulate of a DiT/SiT block.

Holds the reference math (the eager backend, the test oracle with `upcast=True`, the benchmark
baseline) and `make_adaln_inputs`, the one input factory used by tests and benchmarks. No Triton.

    x_new = x + gate[b] * y            (only when y and gate are given; else x_new = x)
    h     = Norm(x_new; eps, weight) * (1 + scale[b]) + shift[b]
    Norm  = LayerNorm (norm="layer") or RMSNorm (norm="rms"), with the elementwise weight [D] when given

This is exactly SiT's `x = x + gate.unsqueeze(1) * branch(...)` followed by
`modulate(norm(x), shift, scale)` (docs/METHOD.md#sit).
"""

# B batch, T SiT tokens, D SiT hidden width

from __future__ import annotations

import torch
import torch.nn.functional as F

NORMS = ("layer", "rms")


def adaln_ref(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    *,
    y: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    eps: float = 1e-6,
    norm: str = "layer",
    weight: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x_new, h). Inputs x, y: [B, T, D]; shift, scale, gate: [B, D]; weight: [D] or None.

    upcast=False is the eager backend: PyTorch's own dtype promotion, as the original model computes
    it (an fp32 residual stream promotes the bf16 branch; h is cast to out_dtype, default x.dtype).
    upcast=True is the oracle: everything in float64, results left in float64.
    """
    assert (y is None) == (gate is None), "y and gate go together"
    assert norm in NORMS, norm
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if upcast:
        x, shift, scale = x.double(), shift.double(), scale.double()
        y = None if y is None else y.double()
        gate = None if gate is None else gate.double()
        weight = None if weight is None else weight.double()
    x_new = x if y is None else x + gate.unsqueeze(1) * y
    norm_fn = F.layer_norm if norm == "layer" else F.rms_norm
    h = norm_fn(x_new, (x_new.shape[-1],), eps=eps)
    if weight is not None:  # applied apart from the norm so that any weight dtype promotes as PyTorch does
        h = h * weight
    h = h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return x_new, (h if upcast else h.to(out_dtype))


def make_adaln_inputs(
    B: int,
    T: int,
    D: int,
    dtype: torch.dtype,
    *,
    residual_dtype: torch.dtype | None = None,
    residual: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    magnitude: float = 1.0,
    requires_grad: bool = True,
    weight: bool = False,
) -> dict[str, torch.Tensor]:
    """Random adaLN inputs: x in residual_dtype (default dtype), y/gate/shift/scale/weight in dtype.

    shift, scale, gate ~ 0.1 * randn as in a trained SiT; `magnitude` scales x and y (large-value tests).
    Keys: x, shift, scale, when residual y and gate, and when weight an affine weight ~ 1 + 0.1 * randn
    (drawn last, so the other tensors do not depend on it).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    residual_dtype = dtype if residual_dtype is None else residual_dtype

    def rand(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt).requires_grad_(requires_grad)

    out = {
        "x": rand(B, T, D, std=magnitude, dt=residual_dtype),
        "shift": rand(B, D, std=0.1),
        "scale": rand(B, D, std=0.1),
    }
    if residual:
        out["y"] = rand(B, T, D, std=magnitude)
        out["gate"] = rand(B, D, std=0.1)
    if weight:
        out["weight"] = (1 + rand(D, std=0.1).detach()).requires_grad_(requires_grad)
    return out
