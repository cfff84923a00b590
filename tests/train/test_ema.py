"""EMA (docs/METHOD.md#the-training-step) against REPA-E's update_ema, transcribed here as the per-tensor loop it is.

The foreach update must equal the loop bit for bit (torch.equal) over several steps, for parameters (the
frozen pos_embed included) and float buffers (BN running stats), with integer buffers copied. Also: decay 0
and copy_from, state-dict keys equal to the model's (a tiny real SiT too), strict loading, mismatch errors
naming the key, bf16 sources, and on CUDA the fused foreach kernels with no host sync. ~2 s on 2 CPU cores.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from repae.train.ema import EMA

DECAYS = (0.9999, 0.99, 0.5)


@torch.no_grad()
def original_update_ema(ema_model, model, decay=0.9999):
    """REPA-E's update_ema: per-tensor mul_/add_ for params and float buffers, copy_ for the others."""
    ema_params = OrderedDict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name.replace("module.", "")].mul_(decay).add_(param.data, alpha=1 - decay)
    ema_buffers = OrderedDict(ema_model.named_buffers())
    for name, buffer in model.named_buffers():
        name = name.replace("module.", "")
        if buffer.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            ema_buffers[name].mul_(decay).add_(buffer.data, alpha=1 - decay)
        else:
            ema_buffers[name].copy_(buffer)


class Toy(nn.Module):
    """A frozen pos_embed first (as SiT), a BatchNorm (float + int buffers), a conv and a linear head."""

    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 4, 6), requires_grad=False)
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 6, 3)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = self.conv(self.bn(x)).mean(dim=(2, 3))
        return self.head(h + self.pos_embed.mean(dim=(0, 1)))


def perturb(model, seed):
    """One fake training step: a train-mode forward (BN stats, num_batches_tracked) and a random param update."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    model(torch.randn(4, 3, 8, 8, generator=g).to(model.conv.weight.dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


def assert_states_equal(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------- update


@pytest.mark.parametrize("decay", DECAYS)
def test_foreach_update_is_bit_identical_to_the_loop(decay):
    torch.manual_seed(0)
    model = Toy()
    ema = EMA(model)
    ref = copy.deepcopy(model).requires_grad_(False)
    for step in range(3):
        perturb(model, seed=step)
        ema.update(model, decay=decay)
        original_update_ema(ref, model, decay=decay)
        assert_states_equal(ema.module, ref)
    # every tensor moved: pos_embed (frozen) and the BN statistics are averaged, num_batches_tracked copied
    assert int(ema.module.bn.num_batches_tracked) == 3 == int(model.bn.num_batches_tracked)
    for name in ("pos_embed", "bn.running_mean", "bn.running_var", "head.weight"):
        assert not torch.equal(ema.state_dict()[name], model.state_dict()[name]), name


def test_ema_module_is_a_frozen_eval_fp32_copy():
    torch.manual_seed(1)
    model = Toy().train()
    model.head.weight.grad = torch.ones_like(model.head.weight)
    ema = EMA(model)
    assert not ema.module.training and not any(m.training for m in ema.module.modules())
    assert not any(p.requires_grad for p in ema.module.parameters()) and ema.module.head.weight.grad is None
    assert model.training and model.head.weight.requires_grad  # the source is untouched
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert not torch.equal(ema.module.head.weight, model.head.weight)  # no shared storage
    # a bf16 model gives an fp32 EMA; num_batches_tracked stays int64
    ema16 = EMA(Toy().bfloat16())
    assert all(t.dtype == torch.float32 for k, t in ema16.state_dict().items() if "num_batches" not in k)
    assert ema16.module.bn.num_batches_tracked.dtype == torch.int64


def test_bf16_source_averages_into_fp32_like_the_loop():
    """A bf16-cast engine module (DeepSpeed bf16): add_ upcasts its params, exactly as the original loop."""
    torch.manual_seed(2)
    model = Toy()
    ema = EMA(model)
    ref = copy.deepcopy(model).requires_grad_(False)
    model = model.bfloat16()
    for step in range(3):
        perturb(model, seed=10 + step)
        ema.update(model, decay=0.99)
        original_update_ema(ref, model, decay=0.99)
        assert_states_equal(ema.module, ref)


def test_decay_zero_and_copy_from():
    """update(decay=0) and copy_from both give the model's values; copy_from also clears a NaN EMA."""
    torch.manual_seed(3)
    model = Toy()
    ema = EMA(model)
    perturb(model, seed=1)
    ema.update(model, decay=0.0)
    assert_states_equal(ema.module, model)
    perturb(model, seed=2)
    with torch.no_grad():
        ema.module.head.weight.fill_(float("nan"))
    ema.copy_from(model)
    assert_states_equal(ema.module, model)
    with pytest.raises(ValueError, match="decay"):
        ema.update(model, decay=1.5)
    with pytest.raises(ValueError, match="decay"):
        ema.update(model, decay=torch.tensor(0.5))


# ---------------------------------------------------------------- state dict


def test_state_dict_keys_are_the_models_and_load_is_strict_and_in_place():
    torch.manual_seed(4)
    model = Toy()
    ema = EMA(model)
    assert list(ema.state_dict()) == list(model.state_dict())
    perturb(model, seed=3)
    ema.update(model, decay=0.9)
    saved = {k: v.clone() for k, v in ema.state_dict().items()}

    other = EMA(Toy())
    other.load_state_dict(saved)
    assert_states_equal(other.module, ema.module)
    # the lists collected at construction still point at the module's tensors: updates keep matching
    ref = copy.deepcopy(other.module)
    perturb(model, seed=4)
    other.update(model, decay=0.9)
    original_update_ema(ref, model, decay=0.9)
    assert_states_equal(other.module, ref)

    bad = dict(saved)
    del bad["bn.running_var"]
    with pytest.raises(ValueError, match="bn.running_var"):
        other.load_state_dict(bad)


def test_tiny_sit_keys_and_pos_embed():
    """A real SiT: the EMA's state dict is key-for-key the model's, pos_embed (frozen) included and averaged."""
    from repae.model.sit import build_sit

    torch.manual_seed(5)
    sit = build_sit("SiT-S/2", input_size=8, in_channels=4, depth=2, hidden_size=64, num_heads=2, z_dims=(32,),
                    projector_dim=32, encoder_depth=1, num_classes=10)
    ema = EMA(sit)
    assert list(ema.state_dict()) == list(sit.state_dict())
    assert not sit.pos_embed.requires_grad and "pos_embed" in ema._avg_names
    assert "bn.num_batches_tracked" in ema._copy_names and "bn.running_var" in ema._avg_names
    ref = copy.deepcopy(sit).requires_grad_(False)
    with torch.no_grad():
        for p in sit.parameters():
            p.add_(0.01)
        sit.bn.running_var.mul_(2.0)
        sit.bn.num_batches_tracked.add_(7)
    ema.update(sit, decay=0.9999)
    original_update_ema(ref, sit, decay=0.9999)
    assert_states_equal(ema.module, ref)
    assert int(ema.module.bn.num_batches_tracked) == 7


# ---------------------------------------------------------------- mismatches


class ToyExtra(Toy):
    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(2, 2)


class ToyWide(Toy):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 7)


def test_mismatches_name_the_key():
    ema = EMA(Toy())
    with pytest.raises(ValueError, match="'extra.weight' is not in the EMA"):
        ema.update(ToyExtra())
    ema_extra = EMA(ToyExtra())
    with pytest.raises(ValueError, match="'extra.weight' is missing from the source"):
        ema_extra.update(Toy())
    with pytest.raises(ValueError, match=r"'head.weight' has shape \(7, 6\)"):
        ema.update(ToyWide())
    src = Toy()
    src.bn.num_batches_tracked = src.bn.num_batches_tracked.int()
    with pytest.raises(ValueError, match="'bn.num_batches_tracked' is torch.int32"):
        ema.update(src)
    with pytest.raises(ValueError, match="_orig_mod"):
        ema.copy_from(nn.ModuleDict({"_orig_mod": Toy()}))
    ema.module.double()  # buffers replaced behind the EMA's back: refused, not silently stale
    with pytest.raises(RuntimeError, match=r"ema.to\(...\)"):
        ema.update(Toy())
    ema.to("cpu")  # re-collects (and keeps fp32)
    ema.update(Toy())


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_fused_foreach_on_cuda_is_bit_identical_and_sync_free():
    """On CUDA _foreach_* run fused multi-tensor kernels: still bitwise equal to the loop, and no host sync."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(300, 700), nn.BatchNorm1d(700), nn.Linear(700, 33)).cuda()
    ema = EMA(model)
    ref = copy.deepcopy(model).requires_grad_(False)
    for step in range(3):
        model.train()
        model(torch.randn(16, 300, device="cuda"))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        torch.cuda.set_sync_debug_mode("error")
        try:
            ema.update(model, decay=DECAYS[step])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        original_update_ema(ref, model, decay=DECAYS[step])
        assert_states_equal(ema.module, ref)
