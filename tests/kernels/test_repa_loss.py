"""Parity of the fused REPA cosine loss against its eager twin and REPA-E's per-sample loop."""

# B batch, N patch tokens, C encoder feature dim

import pytest
import torch
import torch.nn.functional as F
from parity import DEVICE, check_parity, fwd_bwd

from repae.kernels import make_repa_inputs, repa_loss, repa_loss_ref

SHAPES_CPU = [(2, 5, 77), (3, 16, 768), (1, 1, 8), (2, 33, 1000), (1, 7, 1)]
SHAPES_GPU = [(32, 256, 768), (32, 256, 1024), (7, 255, 1536), (1, 1, 8)]
# name: (zs_tilde dtype, zs dtype): the projector output in autocast precision, DINOv2 features fp32
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16_fp32": (torch.bfloat16, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16_fp32": (torch.float16, torch.float32),
}
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}


def _run_parity(B, N, C, dtype_name, *, magnitude=1.0, target_grad=True, zero_rows=False):
    a_dtype, b_dtype = DTYPES[dtype_name]
    inputs = make_repa_inputs(B, N, C, a_dtype, target_dtype=b_dtype, seed=B * 100 + C, device=DEVICE,
                              magnitude=magnitude)
    inputs["zs"].requires_grad_(target_grad)
    if zero_rows:  # the |z| < eps branch of F.normalize: an all-zero row and a 1e-14 row in each input
        with torch.no_grad():
            for t in inputs.values():
                t[0, 0].zero_()
                t[-1, -1].mul_(1e-14 / t[-1, -1].float().norm().clamp_min(1e-30))
    got, douts = fwd_bwd(repa_loss, inputs, ("loss",), backend="triton")
    eager, _ = fwd_bwd(repa_loss, inputs, ("loss",), douts=douts, backend="eager")
    oracle, _ = fwd_bwd(repa_loss_ref, inputs, ("loss",), douts=douts, upcast=True)
    assert got["loss"].dtype == torch.float32 and got["loss"].dim() == 0
    assert got["dzs_tilde"].dtype == a_dtype
    assert ("dzs" in got) == target_grad
    if zero_rows:  # grads below eps are ~1e12 x larger: compare them relative to their size
        for res in (got, eager, oracle):
            for k in [k for k in res if k.startswith("d")]:
                res[k] = res[k].double() / oracle[k].double().abs().max()
    check_parity(got, eager, oracle, atol=ATOL[a_dtype])
    return got


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("B,N,C", SHAPES_CPU)
def test_repa_loss_matches_ref(B, N, C, dtype_name):
    _run_parity(B, N, C, dtype_name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("B,N,C", SHAPES_GPU)
def test_repa_loss_matches_ref_full_size(B, N, C, dtype_name):
    _run_parity(B, N, C, dtype_name)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16_fp32"])
def test_repa_loss_norm_below_eps(dtype_name):
    _run_parity(3, 4, 24, dtype_name, zero_rows=True)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_repa_loss_large_magnitude(dtype_name):
    _run_parity(2, 9, 130, dtype_name, magnitude=1e4)


def test_repa_loss_frozen_target_has_no_grad():
    _run_parity(2, 5, 64, "bf16_fp32", target_grad=False)


def test_ref_equals_repae_per_sample_loop_fp64():
    """The vectorised reference is REPA-E's loop (sit.py: sum over encoders and samples, / (n_enc * b))."""
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(3, 10, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    zs_tilde = [torch.randn(3, 10, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    proj_loss, bsz = 0.0, zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            z_tilde_j = F.normalize(z_tilde_j, dim=-1)
            z_j = F.normalize(z_j, dim=-1)
            proj_loss = proj_loss + torch.mean(-(z_j * z_tilde_j).sum(dim=-1))
    proj_loss = proj_loss / (len(zs) * bsz)
    for backend in ("eager", "triton"):
        ours = repa_loss([t.to(DEVICE) for t in zs_tilde], [t.to(DEVICE) for t in zs], backend=backend)
        torch.testing.assert_close(ours.cpu(), proj_loss, atol=1e-12, rtol=1e-12)


def test_repa_loss_deterministic():
    inputs = make_repa_inputs(4, 33, 96, torch.bfloat16, device=DEVICE, seed=7)
    first, douts = fwd_bwd(repa_loss, inputs, ("loss",), backend="triton")
    second, _ = fwd_bwd(repa_loss, inputs, ("loss",), douts=douts, backend="triton")
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_repa_loss_gradcheck_float64():
    inputs = make_repa_inputs(2, 3, 5, torch.float64, device=DEVICE, seed=1)
    assert torch.autograd.gradcheck(lambda a, b: repa_loss(a, b, backend="triton"),
                                    (inputs["zs_tilde"], inputs["zs"]))


def test_repa_loss_non_contiguous():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 24, 6, generator=g).to(DEVICE).transpose(1, 2)  # [2, 6, 24], non-contiguous
    b = torch.randn(2, 6, 24, generator=g).to(DEVICE)
    torch.testing.assert_close(repa_loss(a, b, backend="triton"), repa_loss_ref(a, b), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_repa_loss_bad_inputs(backend):
    a = torch.randn(2, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"zs_tilde must be 3-D \[B, N, C\]"):
        repa_loss(a[0], a[0], backend=backend)
    with pytest.raises(ValueError, match="must have the same shape"):
        repa_loss(a, a[:, :3], backend=backend)
    with pytest.raises(ValueError, match="zs must be a floating-point tensor"):
        repa_loss(a, a.int(), backend=backend)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        repa_loss(a, a.to("meta"), backend=backend)
    with pytest.raises(ValueError, match="2 projector outputs for 1 encoders"):
        repa_loss([a, a], [a], backend=backend)
    with pytest.raises(ValueError, match="both be tensors or both be lists"):
        repa_loss(a, [a], backend=backend)
