"""Parity helpers shared by the kernel tests: run an op forward+backward, compare three ways.

The pass rule (flash-attn's): max|got - oracle| <= 2 * max|eager - oracle| + atol, where `eager` is the
PyTorch reference in the inputs' dtypes and `oracle` the same reference in float64. A failure names
the tensor, the max error and where it is.

Under the Triton interpreter (CPU), an fp32 -> bf16 store truncates instead of rounding to nearest
even (measured: 1062.94 is stored as 1056, not 1064), so a bf16 result may sit one bf16 ulp further
from the oracle than on a GPU. Only there, and only for bf16 results, each element's error is reduced
by one ulp of the oracle before the rule is applied. On a GPU the rule applies unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def fwd_bwd(
    fn: Callable,
    inputs: dict[str, torch.Tensor],
    out_names: tuple[str, ...],
    *,
    upcast: bool = False,
    douts: list[torch.Tensor] | None = None,
    seed: int = 1234,
    **kwargs,
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Call fn(**inputs, **kwargs) on fresh leaves (float64 copies when upcast), backpropagate random
    output grads (or `douts`, cast to each output's dtype) and return ({name: tensor}, douts).

    Results hold the outputs under out_names and the input grads under "d" + input name.
    """
    leaves = {}
    for k, v in inputs.items():
        t = v.detach().clone()
        if upcast and t.is_floating_point():
            t = t.double()
        leaves[k] = t.requires_grad_(v.requires_grad)
    outs = fn(**leaves, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert len(outs) == len(out_names), (len(outs), out_names)
    if douts is None:
        g = torch.Generator().manual_seed(seed)
        douts = [torch.randn(o.shape, generator=g).to(device=o.device, dtype=o.dtype) for o in outs]
    douts = [d.to(o.dtype) for d, o in zip(douts, outs)]
    wrt = [k for k, v in leaves.items() if v.requires_grad]
    grads = torch.autograd.grad(outs, [leaves[k] for k in wrt], douts, allow_unused=True) if wrt else []
    res = {name: o.detach() for name, o in zip(out_names, outs)}
    res.update({"d" + k: g for k, g in zip(wrt, grads) if g is not None})
    return res, douts


def assert_close_3way(got: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor, *, atol: float, name: str):
    """flash-attn's rule: max|got - oracle| <= 2 * max|eager - oracle| + atol (all in float64)."""
    assert got.shape == oracle.shape, f"{name}: shape {list(got.shape)} != oracle {list(oracle.shape)}"
    g, e, o = got.double(), eager.double(), oracle.double()
    assert torch.isfinite(o).all(), f"{name}: the oracle itself is not finite"
    assert torch.isfinite(g).all(), f"{name}: non-finite values in the result"
    err = (g - o).abs()
    if got.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1" and not got.is_cuda:
        ulp = torch.where(o != 0, torch.exp2(torch.floor(torch.log2(o.abs())) - 7), torch.zeros_like(o))
        err = (err - ulp).clamp_min(0)  # the interpreter's truncating bf16 store (module docstring)
    eager_err = (e - o).abs().max().item() if e.numel() else 0.0
    bound = 2 * eager_err + atol
    if err.numel() and err.max().item() > bound:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{name}: max|got - oracle| = {err.max().item():.3e} at {idx} (got {g[idx].item():.6g}, oracle "
            f"{o[idx].item():.6g}) > 2 * max|eager - oracle| ({eager_err:.3e}) + atol ({atol:.1e})"
        )


def check_parity(got: dict, eager: dict, oracle: dict, atol: float) -> None:
    """assert_close_3way for every name; the three runs must produce the same set of tensors."""
    assert got.keys() == eager.keys() == oracle.keys(), (got.keys(), eager.keys(), oracle.keys())
    for name in got:
        assert_close_3way(got[name], eager[name], oracle[name], atol=atol, name=name)
