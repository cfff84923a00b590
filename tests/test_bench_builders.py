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
