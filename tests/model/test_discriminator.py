"""PatchGAN discriminator (docs/METHOD.md#vae-and-gan-losses): parameter count, exact keys, init statistics and RNG
order, output shape, input checks, BatchNorm settings, strict save/reload through model/weights.py.

The reference network is the original's 12-layer list written out by hand (no loop), initialized in the
original's order: PyTorch's default init at construction, then weights_init over main.0 .. main.11. With the
same seed it must equal ours bitwise. Init statistics are checked with tolerances of >= 6 standard errors
of the estimate (stated per check). Runtime ~2 s on 2 CPU cores (one 256x256 forward, the rest 64x64).
"""

# B batch, P logit-map side

from __future__ import annotations

import pytest
import torch
from torch import nn

from repae.model.discriminator import NLayerDiscriminator, build_discriminator, weights_init
from repae.model.weights import save_weights

NUM_PARAMS = 2_765_633
KEYS = {  # state-dict keys and shapes of the original (docs/METHOD.md#vae-and-gan-losses), in order
    "main.0.weight": (64, 3, 4, 4), "main.0.bias": (64,),
    "main.2.weight": (128, 64, 4, 4),
    "main.3.weight": (128,), "main.3.bias": (128,), "main.3.running_mean": (128,), "main.3.running_var": (128,),
    "main.3.num_batches_tracked": (),
    "main.5.weight": (256, 128, 4, 4),
    "main.6.weight": (256,), "main.6.bias": (256,), "main.6.running_mean": (256,), "main.6.running_var": (256,),
    "main.6.num_batches_tracked": (),
    "main.8.weight": (512, 256, 4, 4),
    "main.9.weight": (512,), "main.9.bias": (512,), "main.9.running_mean": (512,), "main.9.running_var": (512,),
    "main.9.num_batches_tracked": (),
    "main.11.weight": (1, 512, 4, 4), "main.11.bias": (1,),
}


def reference_discriminator() -> nn.Sequential:
    """Spec 4.5 layer by layer, then the original's weights_init pass (global RNG)."""

    def lrelu():
        return nn.LeakyReLU(0.2, True)

    main = nn.Sequential(
        nn.Conv2d(3, 64, 4, 2, 1), lrelu(),
        nn.Conv2d(64, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128), lrelu(),
        nn.Conv2d(128, 256, 4, 2, 1, bias=False), nn.BatchNorm2d(256), lrelu(),
        nn.Conv2d(256, 512, 4, 1, 1, bias=False), nn.BatchNorm2d(512), lrelu(),
        nn.Conv2d(512, 1, 4, 1, 1),
    )
    for m in main:  # taming's weights_init, written out
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.constant_(m.bias, 0.0)
    return main


@pytest.fixture(scope="module")
def disc():
    torch.manual_seed(0)
    return NLayerDiscriminator()


def test_parameter_count_and_exact_keys(disc):
    assert sum(p.numel() for p in disc.parameters()) == NUM_PARAMS
    assert {k: tuple(v.shape) for k, v in disc.state_dict().items()} == KEYS
    assert list(disc.state_dict()) == list(KEYS)
    for idx in (3, 6, 9):
        bn = disc.main[idx]
        assert isinstance(bn, nn.BatchNorm2d) and bn.eps == 1e-5 and bn.momentum == 0.1 and bn.affine
    for idx in (1, 4, 7, 10):
        assert isinstance(disc.main[idx], nn.LeakyReLU) and disc.main[idx].negative_slope == 0.2


def test_matches_the_spec_layer_list_bitwise_with_the_same_seed(disc):
    torch.manual_seed(0)
    ref = reference_discriminator()
    ours = disc.state_dict()
    for key, value in ref.state_dict().items():
        assert torch.equal(ours["main." + key], value), key
    x = torch.randn(2, 3, 64, 64)
    ref.eval(), disc.eval()
    try:
        torch.testing.assert_close(disc(x), ref(x), rtol=0, atol=0)
    finally:
        disc.train()


def test_generator_gives_the_global_seed_weights_and_depends_on_it_alone(disc):
    state = torch.get_rng_state()
    a = NLayerDiscriminator(generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left untouched
    for key, value in disc.state_dict().items():
        assert torch.equal(a.state_dict()[key], value), key
    b = NLayerDiscriminator(generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a.main[0].weight, b.main[0].weight)


def test_init_statistics(disc):
    # conv weights ~ N(0, 0.02): std of a sample std is 0.02 / sqrt(2n) (<= 2.6e-4 for main.0, n = 3072);
    # tolerance 2e-3 on main.0 and main.11 (n = 8192), 3e-4 on the large convs (n >= 131072, se <= 4e-5).
    for idx, tol in ((0, 2e-3), (2, 3e-4), (5, 3e-4), (8, 3e-4), (11, 2e-3)):
        w = disc.main[idx].weight
        assert abs(w.std().item() - 0.02) < tol, (idx, w.std().item())
        assert abs(w.mean().item()) < 6 * 0.02 / w.numel() ** 0.5, (idx, w.mean().item())
    # BN weight ~ N(1, 0.02): se of the mean 0.02 / sqrt(128) = 1.8e-3; tolerance 0.011 (6 se). Bias 0.
    for idx in (3, 6, 9):
        bn = disc.main[idx]
        assert abs(bn.weight.mean().item() - 1.0) < 0.011, (idx, bn.weight.mean().item())
        assert abs(bn.weight.std().item() - 0.02) < 0.01
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    # conv biases keep PyTorch's default init: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), not zero
    for idx, fan_in in ((0, 3 * 16), (11, 512 * 16)):
        b = disc.main[idx].bias
        assert b.abs().max().item() <= fan_in**-0.5 and b.abs().max().item() > 0


def test_weights_init_alone():
    conv, bn, lin = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Linear(4, 4)
    bias, lin_w = conv.bias.detach().clone(), lin.weight.detach().clone()
    for m in (conv, bn, lin):
        weights_init(m, torch.Generator().manual_seed(0))
    assert torch.equal(conv.bias, bias) and torch.equal(lin.weight, lin_w)  # bias and non-conv modules untouched
    assert torch.equal(bn.bias, torch.zeros(8))


def test_output_shapes():
    torch.manual_seed(0)
    d = NLayerDiscriminator()
    assert d(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)  # spec: 256 -> 30x30 logits
    assert d(torch.randn(2, 3, 64, 48)).shape == (2, 1, 6, 4)  # side // 8 - 2
    assert d(torch.randn(2, 3, 24, 24)).shape == (2, 1, 1, 1)  # smallest input
    assert d.output_size(256) == 30 and d.output_size(512) == 62
    assert NLayerDiscriminator(1, ndf=8, n_layers=2)(torch.randn(2, 1, 32, 32)).shape == (2, 1, 6, 6)


@pytest.mark.parametrize("shape,dtype", [
    ((2, 1, 64, 64), torch.float32),   # wrong channel count
    ((3, 64, 64), torch.float32),      # no batch dim
    ((2, 3, 16, 64), torch.float32),   # too small for a 1x1 logit map
    ((2, 3, 64, 64), torch.int64),     # not float
])
def test_bad_inputs_name_the_shape(disc, shape, dtype):
    with pytest.raises(ValueError, match=r"\(" + ", ".join(map(str, shape)) + r"\)"):
        disc(torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("kwargs", [{"input_nc": 0}, {"ndf": 2.5}, {"n_layers": -1}])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        NLayerDiscriminator(**kwargs)


def test_batchnorm_train_mode_updates_running_stats_and_grads_reach_the_input():
    torch.manual_seed(0)
    d = NLayerDiscriminator()
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    d(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert int(d.main[3].num_batches_tracked) == 1 and d.main[3].running_mean.abs().sum() > 0


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_strict_save_and_reload(tmp_path, suffix):
    torch.manual_seed(0)
    d = NLayerDiscriminator()
    d(torch.randn(4, 3, 32, 32))  # move the running stats off their init values
    path = tmp_path / f"sdvae-f8d4-discriminator-ckpt{suffix}"
    if suffix == ".pt":
        torch.save(d.state_dict(), path)  # the released files hold the state dict directly
    else:
        save_weights(d.state_dict(), path)
    e = build_discriminator(path, generator=torch.Generator().manual_seed(1))
    assert e.training  # returned in train mode, the original's mode
    for key, value in d.state_dict().items():
        assert torch.equal(e.state_dict()[key], value), key
    d.eval(), e.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(d(x), e(x))


def test_reload_rejects_a_mismatched_file(tmp_path):
    sd = NLayerDiscriminator(generator=torch.Generator().manual_seed(0)).state_dict()
    sd["main.12.weight"] = sd.pop("main.11.weight")
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"main\.11\.weight.*\n.*main\.12\.weight"):
        build_discriminator(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        build_discriminator(tmp_path / "nowhere.pt")
