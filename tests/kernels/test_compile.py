"""torch.compile sees each Triton launch as one torch.library op: no graph break, same results.

`torch.library.opcheck` checks each op's registration (schema, fake tensor kernel, autograd); a
function calling every op compiles with fullgraph=True (a graph break would raise) and gives bitwise
the outputs, input gradients and running statistics of the uncompiled (autograd.Function) path."""

# B batch, T tokens, D hidden, N patch tokens, E encoder dim, C latent channels

import pytest
import torch
from parity import DEVICE

import repae.kernels as K
from repae.kernels.adaln_triton import adaln_bwd_op, adaln_fwd_op
from repae.kernels.latent_bn_triton import latent_bn_bwd_op, latent_bn_denorm_op, latent_bn_fwd_op
from repae.kernels.repa_loss_triton import repa_loss_bwd_op, repa_loss_fwd_op

B, T, D, E, C = 2, 5, 40, 24, 3


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)

    return {
        "x": r(B, T, D), "y": r(B, T, D, dtype=torch.bfloat16), "cond": r(B, 3 * D),
        "zs_tilde": r(B, T, E, dtype=torch.bfloat16), "zs": r(B, T, E),
        "z": r(B, C, 4, 3) * 2 + 1, "t": torch.rand(B, generator=g).to(DEVICE), "noise": r(B, C, 4, 3),
    }


def _every_op(x, y, cond, zs_tilde, zs, z, t, noise, rm, rv, nbt):
    shift, scale, gate = cond.chunk(3, dim=1)
    x1, h1 = K.adaln(x, shift, scale, out_dtype=torch.bfloat16)
    x2, h2 = K.adaln(x1, shift, scale, y=y, gate=gate)
    loss = K.repa_loss(zs_tilde, zs)
    x_t, v = K.latent_bn_interp(z, t, noise, rm, rv, nbt, use_batch_stats=True, path="cosine")
    x_t_eval, _ = K.latent_bn_interp(z, t, noise, rm, rv, nbt, use_batch_stats=False)
    x0 = K.latent_bn(z, rm, rv, nbt, use_batch_stats=True)
    z_back = K.latent_bn_denorm(x0, rm, rv)
    return h1, x2, h2, loss, x_t, v, x_t_eval, z_back


def _run(fn, inputs, douts=None):
    leaves = {k: v.clone().requires_grad_(k != "t") for k, v in inputs.items()}
    stats = [torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE), torch.zeros((), dtype=torch.long,
                                                                                         device=DEVICE)]
    outs = fn(**leaves, rm=stats[0], rv=stats[1], nbt=stats[2])
    if douts is None:
        g = torch.Generator().manual_seed(1)
        douts = [torch.randn(o.shape, generator=g).to(device=DEVICE, dtype=o.dtype) for o in outs]
    torch.autograd.backward(outs, douts)
    grads = {k: v.grad for k, v in leaves.items() if v.requires_grad}
    return outs, grads, stats, douts


def test_fullgraph_compile_matches_uncompiled():
    torch._dynamo.reset()
    inputs = _inputs()
    outs, grads, stats, douts = _run(_every_op, inputs)
    outs_c, grads_c, stats_c, _ = _run(torch.compile(_every_op, fullgraph=True), inputs, douts)
    for i, (a, b) in enumerate(zip(outs, outs_c)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output {i}"
    for k in grads:
        assert torch.equal(grads[k], grads_c[k]), f"grad of {k}"
    for a, b in zip(stats, stats_c):
        assert torch.equal(a, b)


def test_compiled_bad_input_is_the_same_clear_error():
    """(With fullgraph=True dynamo reports the same ValueError text inside its Unsupported error.)"""
    torch._dynamo.reset()
    x = torch.zeros(B, T, D, device=DEVICE)
    with pytest.raises(ValueError, match=r"shift must have shape \[2, 40\], got \[2, 41\]"):
        torch.compile(lambda x, s: K.adaln(x, s, s))(x, torch.zeros(B, D + 1, device=DEVICE))


# The ops carry no autograd formula of their own (the autograd Functions hold the backward and call them
# while compiling), so opcheck sees inputs that do not require grad.


@pytest.mark.parametrize("residual", [True, False])
def test_opcheck_adaln(residual):
    i = _inputs()
    shift, scale, gate = i["cond"].chunk(3, dim=1)
    y, gate = (i["y"], gate) if residual else (None, None)
    args = (i["x"], shift, scale, y, gate, 1e-6, torch.bfloat16)
    torch.library.opcheck(adaln_fwd_op, args)
    x_new, h, mean, rstd = adaln_fwd_op(*args)
    torch.library.opcheck(adaln_bwd_op, (torch.randn_like(h), torch.randn_like(i["x"]) if residual else None,
                                         x_new if residual else i["x"], scale, y, gate, mean, rstd, True))
    torch.library.opcheck(adaln_bwd_op, (torch.randn_like(h), None, x_new if residual else i["x"], scale, y, gate,
                                         mean, rstd, False))


def test_opcheck_repa_loss():
    i = _inputs()
    torch.library.opcheck(repa_loss_fwd_op, (i["zs_tilde"], i["zs"], 1e-12))
    for need_db in (True, False):
        torch.library.opcheck(repa_loss_bwd_op, (torch.ones((), device=DEVICE), i["zs_tilde"], i["zs"], 1e-12, True,
                                                 need_db))


@pytest.mark.parametrize("interp", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_latent_bn(interp, training):
    i = _inputs()
    z, t, noise = i["z"], (i["t"] if interp else None), (i["noise"] if interp else None)
    stats = (torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE),
             torch.zeros((), dtype=torch.long, device=DEVICE))
    torch.library.opcheck(latent_bn_fwd_op, (z, t, noise, *stats, training, 0.1, 1e-4, "linear"))
    _, _, _, mean, rstd = latent_bn_fwd_op(z, t, noise, *stats, training, 0.1, 1e-4, "linear")
    d = torch.randn_like(z)
    torch.library.opcheck(latent_bn_bwd_op, (None if interp else d, d if interp else None, d if interp else None,
                                             z, t, mean, rstd, training, "linear", interp))
    torch.library.opcheck(latent_bn_denorm_op, (z, stats[0], stats[1], True))


def test_fullgraph_compile_rms_weight_matches_uncompiled():
    """The RMSNorm + affine weight specialisations through the same ops: no graph break, bitwise equal."""
    torch._dynamo.reset()
    inputs = {k: v for k, v in _inputs().items() if k in ("x", "y", "cond")}
    inputs["weight"] = 1 + 0.1 * torch.randn(D, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def fn(x, y, cond, weight):
        shift, scale, gate = cond.chunk(3, dim=1)
        x1, h1 = K.adaln(x, shift, scale, norm="rms", weight=weight, out_dtype=torch.bfloat16)
        x2, h2 = K.adaln(x1, shift, scale, y=y, gate=gate, norm="rms", weight=weight)
        _, h3 = K.adaln(x2, shift, scale, y=y, gate=gate, weight=weight)
        return h1, x2, h2, h3

    def run(f, douts=None):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        outs = f(**leaves)
        if douts is None:
            g = torch.Generator().manual_seed(1)
            douts = [torch.randn(o.shape, generator=g).to(device=DEVICE, dtype=o.dtype) for o in outs]
        torch.autograd.backward(outs, douts)
        return outs, {k: v.grad for k, v in leaves.items()}, douts

    outs, grads, douts = run(fn)
    outs_c, grads_c, _ = run(torch.compile(fn, fullgraph=True), douts)
    for i, (a, b) in enumerate(zip(outs, outs_c)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output {i}"
    for k in grads:
        assert torch.equal(grads[k], grads_c[k]), f"grad of {k}"


@pytest.mark.parametrize("residual", [True, False])
def test_opcheck_adaln_rms_weight(residual):
    i = _inputs()
    shift, scale, gate = i["cond"].chunk(3, dim=1)
    y, gate = (i["y"], gate) if residual else (None, None)
    w = torch.ones(D, device=DEVICE, dtype=torch.bfloat16)
    args = (i["x"], shift, scale, y, gate, 1e-6, torch.bfloat16, w, True)
    torch.library.opcheck(adaln_fwd_op, args)
    x_new, h, mean, rstd = adaln_fwd_op(*args)
    xn = x_new if residual else i["x"]
    for cond_grad, weight_grad in ((True, True), (False, True), (False, False)):
        torch.library.opcheck(adaln_bwd_op, (torch.randn_like(h), torch.randn_like(i["x"]) if residual else None,
                                             xn, scale, y, gate, mean, rstd, cond_grad, w, True, weight_grad))
