"""The benchmark builders of bench/harness.py run (not timed) at small shapes on any machine, so the
benchmark plumbing is known to work before a GPU session spends its minutes on it."""

import pytest
import torch
from harness import CASE_BUILDERS, MODES
from parity import DEVICE

SMALL = {
    "adaln": ((2, 4, 24), torch.bfloat16, torch.float32, torch.bfloat16),
    "repa_loss": ((2, 4, 24), torch.bfloat16, torch.float32),
    "latent_bn": ((2, 4, 4, 4), torch.float32),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["triton", "eager"])
@pytest.mark.parametrize("op", list(SMALL))
def test_bench_builder_runs(op, provider, mode):
    bench = CASE_BUILDERS[op](provider, mode, *SMALL[op], device=DEVICE)
    bench.fn()
    bench.fn()
    assert bench.nbytes > 0
    if mode == "fwd_bwd":
        assert all(t.grad is not None for t in bench.grad_to_none if t.requires_grad)


SMALL_MODELS = {
    "sit_block": ({"hidden_size": 144, "num_heads": 2, "tokens": 16}, 2),
    "sit": ({"model": "SiT-S/2", "overrides": dict(input_size=8, depth=2, encoder_depth=1, hidden_size=144,
                                                   num_heads=2, z_dims=(32,), projector_dim=64)}, 2),
    "vae": ({"vae": "f8d4", "resolution": 32}, 1),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["fused", "eager"])
@pytest.mark.parametrize("kind", list(SMALL_MODELS))
def test_model_bench_builder_runs(kind, provider, mode):
    from model_harness import model_case

    width, batch = SMALL_MODELS[kind]
    bench, flops = model_case(provider, mode, kind, width, batch, device=DEVICE)
    bench.fn()
    assert flops > 0
    if mode == "fwd_bwd":
        assert all(t.grad is not None for t in bench.grad_to_none)
