"""Parity of the fused adaLN (gated residual + LayerNorm + modulate) against its eager twin."""

# B batch, T tokens, D hidden

import pytest
import torch
from parity import DEVICE, check_parity, fwd_bwd

from repae.kernels import adaln, adaln_ref, make_adaln_inputs

# (B, T, D): realistic width, odd width 72*3+8, odd everything, T=1/B=1, D=1, the DINO width
SHAPES_CPU = [(2, 16, 1152), (2, 5, 224), (3, 7, 1000), (1, 1, 72), (2, 3, 1), (1, 9, 768)]
SHAPES_GPU = [(32, 256, 1152), (4, 256, 768), (3, 7, 1000), (1, 1, 72), (8, 256, 1024), (16, 256, 384)]
# name: (branch/condition dtype, residual dtype, h dtype)
DTYPES = {
    "fp32": (torch.float32, torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "bf16_h_fp32_residual": (torch.bfloat16, torch.float32, torch.bfloat16),
}
ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _run_parity(B, T, D, dtype_name, *, residual=True, cond_grad=True, magnitude=1.0):
    dtype, res_dtype, h_dtype = DTYPES[dtype_name]
    inputs = make_adaln_inputs(B, T, D, dtype, residual_dtype=res_dtype, residual=residual, seed=B * 1000 + D,
                               device=DEVICE, magnitude=magnitude)
    if not cond_grad:  # the REPA-E align pass: SiT frozen, only dx and dy are needed
        for k in ("shift", "scale", "gate"):
            if k in inputs:
                inputs[k].requires_grad_(False)
    names = ("x_new", "h")
    got, douts = fwd_bwd(adaln, inputs, names, backend="triton", out_dtype=h_dtype)
    eager, _ = fwd_bwd(adaln, inputs, names, douts=douts, backend="eager", out_dtype=h_dtype)
    oracle, _ = fwd_bwd(adaln_ref, inputs, names, douts=douts, upcast=True)
    check_parity(got, eager, oracle, atol=ATOL[dtype])
    assert got["x_new"].dtype == res_dtype and got["h"].dtype == h_dtype
    for k, v in inputs.items():
        if v.requires_grad:
            assert got["d" + k].dtype == v.dtype, (k, got["d" + k].dtype, v.dtype)
    return got


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("B,T,D", SHAPES_CPU)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "first_norm"])
def test_adaln_matches_ref(B, T, D, dtype_name, residual):
    _run_parity(B, T, D, dtype_name, residual=residual)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("B,T,D", SHAPES_GPU)
def test_adaln_matches_ref_full_size(B, T, D, dtype_name):
    _run_parity(B, T, D, dtype_name)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16_h_fp32_residual"])
def test_adaln_align_pass_skips_condition_grads(dtype_name):
    """Without condition grads the kernel gives the same dx, dy bit for bit, and no condition grads."""
    partial = _run_parity(2, 9, 224, dtype_name, cond_grad=False)
    full = _run_parity(2, 9, 224, dtype_name, cond_grad=True)
    assert "dshift" not in partial and "dscale" not in partial and "dgate" not in partial
    assert torch.equal(partial["dx"], full["dx"]) and torch.equal(partial["dy"], full["dy"])


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16", "bf16_h_fp32_residual"])
def test_adaln_large_magnitude(dtype_name):
    """Residual streams with |x| ~ 300 and an offset: the two-pass variance keeps LayerNorm exact."""
    _run_parity(2, 7, 1000, dtype_name, magnitude=300.0)


def test_adaln_stats_are_fp32_and_deterministic():
    from repae.kernels.adaln_triton import adaln_fwd

    inputs = make_adaln_inputs(2, 11, 224, torch.bfloat16, device=DEVICE, seed=3)
    _, _, mean, rstd = adaln_fwd(inputs["x"].detach(), inputs["shift"].detach(), inputs["scale"].detach(),
                                 inputs["y"].detach(), inputs["gate"].detach(), 1e-6, torch.bfloat16)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (22,)
    first, douts = fwd_bwd(adaln, inputs, ("x_new", "h"), backend="triton")
    second, _ = fwd_bwd(adaln, inputs, ("x_new", "h"), douts=douts, backend="triton")
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_adaln_strided_inputs():
    """chunk(6, dim=1) views of the adaLN projection and a non-contiguous x are handled, not copied wrong."""
    B, T, D = 2, 5, 72
    g = torch.Generator().manual_seed(0)
    mod = (0.1 * torch.randn(B, 6 * D, generator=g)).to(DEVICE)
    shift, scale, gate = mod.chunk(6, dim=1)[:3]
    x = torch.randn(B, D, T, generator=g).to(DEVICE).transpose(1, 2)  # non-contiguous [B, T, D]
    y = torch.randn(B, T, D, generator=g).to(DEVICE)
    assert not x.is_contiguous() and not shift.is_contiguous()
    got = adaln(x, shift, scale, y=y, gate=gate, backend="triton")
    ref = adaln_ref(x.contiguous(), shift.contiguous(), scale.contiguous(), y=y, gate=gate.contiguous())
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_adaln_gradcheck_float64():
    inputs = make_adaln_inputs(2, 3, 8, torch.float64, device=DEVICE, seed=5)

    def f(x, shift, scale, y, gate):
        return adaln(x, shift, scale, y=y, gate=gate, backend="triton")

    assert torch.autograd.gradcheck(f, tuple(inputs[k] for k in ("x", "shift", "scale", "y", "gate")))

    def g(x, shift, scale):
        return adaln(x, shift, scale, backend="triton")[1]

    assert torch.autograd.gradcheck(g, tuple(inputs[k] for k in ("x", "shift", "scale")))


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_adaln_bad_inputs(backend):
    x = torch.randn(2, 3, 8, device=DEVICE)
    c = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"x must be 3-D \[B, T, D\]"):
        adaln(x[0], c, c, backend=backend)
    with pytest.raises(ValueError, match=r"shift must have shape \[2, 8\]"):
        adaln(x, c[:1], c, backend=backend)
    with pytest.raises(ValueError, match=r"y must have shape \[2, 3, 8\]"):
        adaln(x, c, c, y=x[:, :2], gate=c, backend=backend)
    with pytest.raises(ValueError, match="y and gate must be given together"):
        adaln(x, c, c, y=x, backend=backend)
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        adaln(x.long(), c, c, backend=backend)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        adaln(x, c.to("meta"), c, backend=backend)
    with pytest.raises(ValueError, match="exceeds the 16384 limit"):
        adaln(torch.zeros(1, 1, 16385, device=DEVICE), torch.zeros(1, 16385, device=DEVICE),
              torch.zeros(1, 16385, device=DEVICE), backend=backend)
