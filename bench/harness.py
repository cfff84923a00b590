"""Benchmark builders: for each op, provider and mode, a closure to time and the bytes it must move.

Providers: "triton" (ours), "eager" (the PyTorch reference of kernels/<op>_ref.py), "compile"
(torch.compile of that same reference expression). Modes: "fwd", "fwd_bwd". Inputs come from the
kernels' own make_*_inputs; nothing here re-implements an op. tests/test_bench_builders.py runs these
builders on CPU so the plumbing is checked even where no GPU is lent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timing import BenchFn

import repae.kernels as K

PROVIDERS = ("triton", "eager", "compile")
MODES = ("fwd", "fwd_bwd")


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _wrap(op: Callable, provider: str, **fixed) -> Callable:
    """The op under the provider: ours through the triton backend, or its eager reference (compiled)."""
    if provider == "triton":
        return lambda **kw: op(**kw, **fixed, backend="triton")
    ref = {K.adaln: K.adaln_ref, K.repa_loss: K.repa_loss_ref, K.latent_bn_interp: K.latent_bn_interp_ref}[op]

    def eager(**kw):
        return ref(**kw, **fixed)

    return torch.compile(eager) if provider == "compile" else eager


def _fwd_bwd(fn: Callable, inputs: dict, mode: str) -> Callable:
    """The closure to time: forward under no_grad, or forward + backward of fixed random output grads."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(**inputs)
        return run
    probe = fn(**inputs)
    outs = probe if isinstance(probe, tuple) else (probe,)
    douts = [torch.randn_like(o) for o in outs]

    def run():
        o = fn(**inputs)
        torch.autograd.backward(o if isinstance(o, tuple) else (o,), douts)

    return run


def adaln_case(provider: str, mode: str, shape, dtype, residual_dtype, h_dtype, device) -> BenchFn:
    inputs = K.make_adaln_inputs(*shape, dtype, residual_dtype=residual_dtype, device=device)
    fn = _fwd_bwd(_wrap(K.adaln, provider, out_dtype=h_dtype), inputs, mode)
    x, y = inputs["x"], inputs["y"]
    h_bytes = x.numel() * torch.empty((), dtype=h_dtype).element_size()
    fwd = 2 * _nbytes(x) + _nbytes(y) + h_bytes  # read x, y; write x_new, h
    bwd = h_bytes + 3 * _nbytes(x) + 2 * _nbytes(y)  # read dh, dx_new, x_new, y; write dx, dy
    return BenchFn(fn, fwd + (bwd if mode == "fwd_bwd" else 0), list(inputs.values()))


def repa_loss_case(provider: str, mode: str, shape, dtype, target_dtype, device) -> BenchFn:
    inputs = K.make_repa_inputs(*shape, dtype, target_dtype=target_dtype, device=device)
    inputs["zs"].requires_grad_(False)  # frozen encoder features, as in training
    fn = _fwd_bwd(_wrap(K.repa_loss, provider), inputs, mode)
    a, b = inputs["zs_tilde"], inputs["zs"]
    fwd = _nbytes(a, b)
    return BenchFn(fn, fwd + (_nbytes(a, b, a) if mode == "fwd_bwd" else 0), [a])


def latent_bn_case(provider: str, mode: str, shape, dtype, device, *, batch_stats: bool = True) -> BenchFn:
    inputs = K.make_latent_bn_inputs(*shape, dtype, device=device)
    tensors = {k: inputs[k] for k in ("z", "t", "noise")}
    stats = dict(running_mean=inputs["running_mean"], running_var=inputs["running_var"],
                 num_batches_tracked=inputs["num_batches_tracked"])
    fn = _fwd_bwd(_wrap(K.latent_bn_interp, provider, use_batch_stats=batch_stats, **stats), tensors, mode)
    z = inputs["z"]
    fwd = 4 * _nbytes(z)  # read z, noise; write x_t, v*
    return BenchFn(fn, fwd + (4 * _nbytes(z) if mode == "fwd_bwd" else 0), [z])


CASE_BUILDERS = {"adaln": adaln_case, "repa_loss": repa_loss_case, "latent_bn": latent_bn_case}
