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



@pytest.mark.parametrize("op", ["adaln", "adaln_first", "repa_loss", "latent_bn_train", "latent_bn_eval",
                                "latent_bn_interp", "latent_bn_denorm"])
def test_non_contiguous_inputs_and_grads_give_the_contiguous_results(op):
    """Every tensor argument, and every output gradient, as a strided view (transposed in memory; the
    adaLN conditions as row-strided column slices): outputs and the gradients of the underlying leaves
    equal (bitwise) those of the same call on contiguous copies."""
    g = torch.Generator().manual_seed(0)
    B, T, D, C = 2, 5, 24, 3

    def transposed(*shape):  # a leaf stored [..., W, H], viewed as [..., H, W]
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).to(DEVICE).requires_grad_(True)

    if op.startswith("adaln"):
        leaves = {"x": transposed(B, T, D), "y": transposed(B, T, D), "mod": torch.randn(B, 6 * D, generator=g)}

        def call(v, dense):
            def c(t):
                return t.contiguous() if dense else t

            x, y, mod = c(v["x"].transpose(1, 2)), c(v["y"].transpose(1, 2)), v["mod"]
            shift, scale, gate = (c(mod[:, k * D:(k + 1) * D]) for k in range(3))
            if op == "adaln_first":
                return K.adaln(x, shift, scale, backend="triton")
            return K.adaln(x, shift, scale, y=y, gate=gate, backend="triton")
    elif op == "repa_loss":
        leaves = {"a": transposed(B, T, D), "b": transposed(B, T, D)}

        def call(v, dense):
            def c(t):
                return t.contiguous() if dense else t

            return K.repa_loss(c(v["a"].transpose(1, 2)), c(v["b"].transpose(1, 2)), backend="triton")
    else:
        leaves = {"z": transposed(B, C, 4, 3), "noise": transposed(B, C, 4, 3)}
        t = torch.rand(B, generator=g).to(DEVICE)

        def call(v, dense):
            def c(t):
                return t.contiguous() if dense else t

            z, noise = c(v["z"].transpose(2, 3) * 2 + 1), c(v["noise"].transpose(2, 3))
            rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
            if op == "latent_bn_interp":
                return K.latent_bn_interp(z, t, noise, rm, rv, use_batch_stats=True, backend="triton")
            if op == "latent_bn_denorm":
                return K.latent_bn_denorm(z, rm, rv, backend="triton")
            return K.latent_bn(z, rm, rv, use_batch_stats=op == "latent_bn_train", backend="triton")
    if "mod" in leaves:
        leaves["mod"] = leaves["mod"].to(DEVICE).requires_grad_(True)

    def run(dense):
        for leaf in leaves.values():
            leaf.grad = None
        outs = call(leaves, dense)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g2 = torch.Generator().manual_seed(1)
        douts = [torch.randn(*o.shape[:-2], o.shape[-1], o.shape[-2], generator=g2).to(DEVICE, o.dtype)
                 .transpose(-1, -2) if o.dim() >= 2 else torch.ones_like(o) for o in outs]
        torch.autograd.backward(outs, douts)
        return [o.detach() for o in outs], {k: v.grad for k, v in leaves.items() if v.grad is not None}

    (outs_s, grads_s), (outs_d, grads_d) = run(dense=False), run(dense=True)
    for i, (a, b) in enumerate(zip(outs_s, outs_d)):
        assert torch.equal(a, b), f"{op}: output {i}"
    assert grads_s.keys() == grads_d.keys() and grads_s
    for k in grads_s:
        diff = (grads_s[k] - grads_d[k]).abs().max().item()
        assert torch.equal(grads_s[k], grads_d[k]), f"{op}: gradient of {k} differs by {diff:.3g}"
