"""Parity of the fused adaLN (gated residual + LayerNorm or RMSNorm, optional weight, + modulate) against its
eager twin."""

# B batch, T tokens, D hidden

import pytest
import torch
from parity import DEVICE, check_parity, fwd_bwd

from repae.kernels import AdaLN, adaln, adaln_ref, make_adaln_inputs

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
# the variants besides plain LayerNorm (covered by every test above): (norm, affine weight)
VARIANTS = [("rms", False), ("rms", True), ("layer", True)]
VARIANT_IDS = ["rms", "rms_weight", "layer_weight"]
# odd D with B=1/T=1, odd everything, a realistic width with several row chunks
SHAPES_VARIANTS = [(1, 1, 37), (3, 7, 1000), (2, 16, 1152)]


def _run_parity(B, T, D, dtype_name, *, residual=True, cond_grad=True, magnitude=1.0, norm="layer", weight=False):
    dtype, res_dtype, h_dtype = DTYPES[dtype_name]
    inputs = make_adaln_inputs(B, T, D, dtype, residual_dtype=res_dtype, residual=residual, seed=B * 1000 + D,
                               device=DEVICE, magnitude=magnitude, weight=weight)
    if not cond_grad:  # the REPA-E align pass: SiT frozen, only dx and dy are needed
        for k in ("shift", "scale", "gate", "weight"):
            if k in inputs:
                inputs[k].requires_grad_(False)
    names = ("x_new", "h")
    got, douts = fwd_bwd(adaln, inputs, names, backend="triton", out_dtype=h_dtype, norm=norm)
    eager, _ = fwd_bwd(adaln, inputs, names, douts=douts, backend="eager", out_dtype=h_dtype, norm=norm)
    oracle, _ = fwd_bwd(adaln_ref, inputs, names, douts=douts, upcast=True, norm=norm)
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


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16", "bf16_h_fp32_residual"])
@pytest.mark.parametrize("B,T,D", SHAPES_VARIANTS)
@pytest.mark.parametrize("norm,weight", VARIANTS, ids=VARIANT_IDS)
def test_adaln_variant_matches_ref(norm, weight, B, T, D, dtype_name):
    """RMSNorm and the affine weight: forward and every gradient (dweight included) by the 3-way rule."""
    got = _run_parity(B, T, D, dtype_name, norm=norm, weight=weight)
    assert ("dweight" in got) == weight


@pytest.mark.parametrize("norm,weight", VARIANTS, ids=VARIANT_IDS)
def test_adaln_variant_first_norm_and_align_pass(norm, weight):
    """Without a residual; and without condition/weight grads the same dx, dy bit for bit."""
    _run_parity(2, 5, 224, "bf16", residual=False, norm=norm, weight=weight)
    partial = _run_parity(2, 9, 224, "fp32", cond_grad=False, norm=norm, weight=weight)
    full = _run_parity(2, 9, 224, "fp32", norm=norm, weight=weight)
    assert not {"dshift", "dscale", "dgate", "dweight"} & partial.keys()
    assert torch.equal(partial["dx"], full["dx"]) and torch.equal(partial["dy"], full["dy"])


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("norm,weight", VARIANTS, ids=VARIANT_IDS)
def test_adaln_variant_large_magnitude(norm, weight, dtype_name):
    _run_parity(2, 7, 1000, dtype_name, magnitude=300.0, norm=norm, weight=weight)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("B,T,D", SHAPES_GPU)
@pytest.mark.parametrize("norm,weight", VARIANTS, ids=VARIANT_IDS)
def test_adaln_variant_matches_ref_full_size(norm, weight, B, T, D, dtype_name):
    _run_parity(B, T, D, dtype_name, norm=norm, weight=weight)


@pytest.mark.parametrize("norm,weight", VARIANTS, ids=VARIANT_IDS)
def test_adaln_variant_strided_and_deterministic(norm, weight):
    """chunk(6, dim=1) condition rows and a strided weight; two backward passes agree bit for bit."""
    B, T, D = 2, 5, 72
    g = torch.Generator().manual_seed(0)
    mod = (0.1 * torch.randn(B, 6 * D, generator=g)).to(DEVICE).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(2 * D, generator=g)).to(DEVICE)[::2].requires_grad_(True) if weight else None
    x = torch.randn(B, T, D, generator=g).to(DEVICE).requires_grad_(True)
    y = torch.randn(B, T, D, generator=g).to(DEVICE).requires_grad_(True)

    def run(backend, contiguous=False):
        shift, scale, gate = (c.contiguous() if contiguous else c for c in mod.chunk(6, dim=1)[:3])
        outs = adaln(x, shift, scale, y=y, gate=gate, norm=norm, weight=w, backend=backend)
        leaves = [x, y, mod] + ([w] if weight else [])
        return [*outs, *torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])]

    first, second, ref = run("triton"), run("triton"), run("eager", contiguous=True)
    for a, b, r in zip(first, second, ref):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_adaln_variant_gradcheck_float64(norm):
    """Every input with the weight, then RMS without weight or residual. RMS in full mode on a tiny shape,
    LayerNorm (its path is covered by test_adaln_gradcheck_float64) in fast mode: the interpreter is slow."""
    inputs = make_adaln_inputs(2, 2, 3, torch.float64, device=DEVICE, seed=5, weight=True)
    fast = norm == "layer"
    keys = ("x", "shift", "scale", "y", "gate", "weight")

    def f(x, shift, scale, y, gate, weight):
        return adaln(x, shift, scale, y=y, gate=gate, norm=norm, weight=weight, backend="triton")

    assert torch.autograd.gradcheck(f, tuple(inputs[k] for k in keys), fast_mode=fast)
    if norm == "rms":
        def g(x, shift, scale):
            return adaln(x, shift, scale, norm="rms", backend="triton")[1]

        assert torch.autograd.gradcheck(g, tuple(inputs[k] for k in ("x", "shift", "scale")))


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_adaln_variant_bad_inputs(backend):
    x = torch.randn(2, 3, 8, device=DEVICE)
    c = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"norm must be one of \('layer', 'rms'\), got 'batch'"):
        adaln(x, c, c, norm="batch", backend=backend)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\], got \[7\]"):
        adaln(x, c, c, weight=torch.ones(7, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="weight must be a floating-point tensor"):
        adaln(x, c, c, weight=torch.ones(8, dtype=torch.long, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        adaln(x, c, c, weight=torch.ones(8, device="meta"), backend=backend)


def test_adaln_module_rms_weight():
    """AdaLN(norm="rms", elementwise_affine=True) owns the weight: a state_dict key, a gradient, the op's h."""
    mod = AdaLN(norm="rms", elementwise_affine=True, dim=24, backend="triton").to(DEVICE)
    assert list(mod.state_dict()) == ["weight"] and "norm=rms" in repr(mod)
    inputs = make_adaln_inputs(2, 3, 24, torch.float32, device=DEVICE, seed=7)
    x_new, h = mod(inputs["x"], inputs["shift"], inputs["scale"], inputs["y"], inputs["gate"])
    h.sum().backward()
    assert mod.weight.grad is not None and mod.weight.grad.shape == (24,)
    _, h_ref = adaln_ref(inputs["x"], inputs["shift"], inputs["scale"], y=inputs["y"], gate=inputs["gate"],
                         norm="rms", weight=mod.weight)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    assert AdaLN(norm="rms").weight is None
    with pytest.raises(ValueError, match="needs dim"):
        AdaLN(elementwise_affine=True)
    with pytest.raises(ValueError, match="norm must be one of"):
        AdaLN(norm="group")
