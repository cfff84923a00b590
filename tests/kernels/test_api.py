"""The public kernels API: backend switch, the REPAE_KERNELS override, and the nn.Module wrappers."""

import pytest
import torch
from parity import DEVICE

import repae.kernels as K


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("REPAE_KERNELS", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert K.resolve_backend("auto", cuda) == "triton"
    assert K.resolve_backend("eager", cuda) == "eager"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert K.resolve_backend("auto", cpu) == "eager"  # CPU without the interpreter: eager
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.resolve_backend("auto", cpu) == "triton"
    assert K.resolve_backend("triton", cpu) == "triton"
    monkeypatch.setenv("REPAE_KERNELS", "eager")  # forces eager everywhere
    assert K.resolve_backend("triton", cuda) == "eager"


def test_set_backend_validates_and_restores():
    before = K.get_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        K.set_backend("cuda")
    try:
        K.set_backend("eager")
        assert K.get_backend() == "eager"
    finally:
        K.set_backend(before)
    with pytest.raises(ValueError, match="backend must be one of"):
        K.adaln(torch.zeros(1, 1, 4), torch.zeros(1, 4), torch.zeros(1, 4), backend="fast")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        K.adaln(x, torch.zeros(1, 4), torch.zeros(1, 4), backend="triton")


def test_modules_equal_functional():
    inp = K.make_adaln_inputs(2, 3, 16, torch.float32, device=DEVICE, requires_grad=False)
    mod = K.AdaLN(eps=1e-6)
    for a, b in zip(mod(inp["x"], inp["shift"], inp["scale"], inp["y"], inp["gate"]),
                    K.adaln(inp["x"], inp["shift"], inp["scale"], y=inp["y"], gate=inp["gate"])):
        assert torch.equal(a, b)
    r = K.make_repa_inputs(2, 3, 16, torch.float32, device=DEVICE, requires_grad=False)
    assert torch.equal(K.REPALoss()(r["zs_tilde"], r["zs"]), K.repa_loss(r["zs_tilde"], r["zs"]))
    bn = K.LatentBatchNorm(4).to(DEVICE)
    z = torch.randn(3, 4, 2, 2, device=DEVICE)
    bn.train()
    x0_train = bn(z)  # module mode decides by default ...
    assert bn.num_batches_tracked.item() == 1
    x0_eval = bn(z, use_batch_stats=False)  # ... an explicit argument overrides it
    assert bn.num_batches_tracked.item() == 1
    assert not torch.allclose(x0_train, x0_eval)
    assert "affine=False" in repr(bn)


def test_repa_loss_list_of_encoders_is_the_mean():
    r1 = K.make_repa_inputs(2, 4, 8, torch.float32, device=DEVICE, seed=1, requires_grad=False)
    r2 = K.make_repa_inputs(2, 4, 12, torch.float32, device=DEVICE, seed=2, requires_grad=False)
    for backend in ("triton", "eager"):
        both = K.repa_loss([r1["zs_tilde"], r2["zs_tilde"]], [r1["zs"], r2["zs"]], backend=backend)
        one = K.repa_loss(r1["zs_tilde"], r1["zs"], backend=backend)
        two = K.repa_loss(r2["zs_tilde"], r2["zs"], backend=backend)
        torch.testing.assert_close(both, (one + two) / 2)
