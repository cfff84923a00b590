"""The planner's op counter (plan/counter.py) against byte counts worked out by hand, and its memory tracker against
the CPU allocator's own record of the real step (the profiler's memory timeline).

Hand counts: fp32 (4 bytes per element); x is made before the counter and is not counted; `live` means bytes of
tensors allocated inside the counter and not yet freed.
"""

# B batch, T tokens, D width

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from repae.plan.counter import CostCounter, classify, tensor_bytes

ROOT = Path(__file__).resolve().parents[2]


def _modes():
    return [pytest.param(False, id="real"), pytest.param(True, id="fake")]


@pytest.mark.parametrize("fake", _modes())
def test_linear_chain_memory_and_bytes_are_the_hand_count(fake):
    with FakeTensorMode() if fake else contextlib.nullcontext():
        l1, l2, x = nn.Linear(8, 16), nn.Linear(16, 4), torch.randn(5, 8)
        counter = CostCounter(tf32=False)
        with counter:
            h = l1(x)
            a = torch.relu(h)
            y = l2(a)
            loss = y.sum()
            counter.mark("forward")
            loss.backward()
            counter.mark("backward")
    f, b = counter.phases["forward"], counter.phases["backward"]
    fwd_live = 4 * (5 * 16 + 5 * 16 + 5 * 4 + 1)  # h, a, y, loss: all held by Python names
    grads = 4 * (16 * 8 + 16 + 4 * 16 + 4)  # the parameters' .grad stay
    assert (f.start_bytes, f.peak_bytes, f.end_bytes) == (0, fwd_live, fwd_live)
    # Backward's peak: at the last op the seed gradient (1 element), every parameter gradient and dL/dh are alive;
    # dL/da was freed once dL/dh was made from it.
    assert b.peak_bytes == fwd_live + 4 * 1 + grads + 4 * 5 * 16
    assert b.end_bytes == fwd_live + grads
    # Bytes: addmm reads x, W1 and b1 and writes h; relu reads h and writes a; ...
    ops = [(r.op, r.bytes, r.flops) for r in f.records]
    assert ops == [("aten.addmm.default", 4 * (5 * 8 + 16 * 8 + 16 + 5 * 16), 2 * 5 * 8 * 16),
                   ("aten.relu.default", 4 * (80 + 80), 80),
                   ("aten.addmm.default", 4 * (5 * 16 + 4 * 16 + 4 + 5 * 4), 2 * 5 * 16 * 4),
                   ("aten.sum.default", 4 * (20 + 1), 20)]
    assert [r.family for r in f.records] == ["gemm", "elementwise", "gemm", "reduction"]
    assert {r.ceiling for r in f.records} == {"fp32"}  # tf32 off: the fp32 cores


def _attention(x, lq, lk, lv, lo):
    """One-head attention written out, so that every intermediate is a tensor of known size."""
    q, k, v = lq(x), lk(x), lv(x)
    p = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)  # the scores are freed once p exists
    return lo(torch.bmm(p, v))


@pytest.mark.parametrize("fake", _modes())
def test_attention_block_memory_is_the_hand_count(fake):
    B, T, D = 2, 5, 8
    with FakeTensorMode() if fake else contextlib.nullcontext():
        layers = [nn.Linear(D, D) for _ in range(4)]
        x = torch.randn(B, T, D)
        counter = CostCounter(tf32=True)
        with counter:
            y = _attention(x, *layers)  # held: y is alive at the mark
            counter.mark("forward")
    assert y.shape == (B, T, D)
    f = counter.phases["forward"]
    BTD, BTT = B * T * D, B * T * T
    # Saved for backward and alive at the end: q, k, v (bmm inputs), p (softmax output, bmm input), o (lo's input)
    # and y. The peak is either at the softmax (q, k, v, scores, p) or at the end.
    assert f.end_bytes == 4 * (3 * BTD + BTT + BTD + BTD)
    assert f.peak_bytes == 4 * max(3 * BTD + 2 * BTT, 3 * BTD + BTT + 2 * BTD)
    bmm = [r for r in f.records if r.op == "aten.bmm.default"]
    assert [r.flops for r in bmm] == [2 * B * T * T * D, 2 * B * T * T * D]
    assert {r.family for r in bmm} == {"attention"} and {r.ceiling for r in bmm} == {"tf32"}
    assert [r.family for r in f.records if "softmax" in r.op] == ["norm"]


def test_bf16_matmuls_meet_the_tensor_core_ceiling_and_views_cost_nothing():
    with FakeTensorMode():
        w, x = torch.randn(16, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
        counter = CostCounter(tf32=True)
        with counter:
            y = x @ w.t()  # t() is a view: no record
            y.view(-1).add_(1.0)  # in place: reads and writes y
            counter.mark("p")
    records = counter.phases["p"].records
    assert [r.op for r in records] == ["aten.mm.default", "aten.add_.Tensor"]
    assert records[0].ceiling == "tensor16" and records[0].bytes == 2 * (4 * 8 + 16 * 8 + 4 * 16)
    assert records[1].bytes == 2 * (64 + 64)
    assert counter.phases["p"].end_bytes == 2 * 64


def test_helpers():
    assert tensor_bytes(torch.zeros(3, 1).expand(3, 1000)) == 12  # a broadcast dimension is read once
    assert classify("repae.adaln_fwd.default", False) == "fused"
    assert classify("aten.native_layer_norm.default", False) == "norm"
    assert classify("aten.sum.dim_IntList", False) == "reduction"
    assert classify("aten.convolution.default", True) == "conv"
    with pytest.raises(ValueError, match="marked twice"):
        c = CostCounter(tf32=True)
        c.mark("a")
        c.mark("a")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tracked_peak_of_the_real_step_is_the_allocators(precision):
    """The tiny config's whole REPA-E step on real CPU tensors (eager ops): the tracker's peak of live bytes against
    the peak of the CPU allocator's own allocations and frees over the same span, as torch.profiler records them
    (it also sees what ops allocate inside themselves). Tolerance 1 %: the two differ by allocator alignment."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    from repae.plan import trace as trace_module
    from repae.train.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny_cpu.json", [f"schedule.precision={precision}"])
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    class Profiled(CostCounter):  # the profiler spans exactly the counter's span
        def __enter__(self):
            prof.__enter__()
            return super().__enter__()

        def __exit__(self, *exc):
            out = super().__exit__(*exc)
            prof.__exit__(None, None, None)
            return out

    original = trace_module.CostCounter
    trace_module.CostCounter = Profiled
    try:
        trace = trace_module.trace_step(cfg, 4, backend="eager", fake=False)
    finally:
        trace_module.CostCounter = original
    tracked = max(p.peak_bytes for p in trace.phases.values())
    events, nodes = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        e = nodes.pop()
        nodes.extend(e.children)
        if e.typed[0] == _EventType.Allocation:  # alloc_size < 0: a free
            events.append((e.start_time_ns, e.typed[1].alloc_size))
    live = allocated = 0
    for _, size in sorted(events):
        live += size
        allocated = max(allocated, live)
    assert live == 0  # everything the step allocated was freed or accounted: the span is closed
    assert tracked > 10e6  # the 64-px VAE's activations: the check is not vacuous
    assert tracked == pytest.approx(allocated, rel=0.01)


def test_our_kernels_are_counted_as_one_fused_op_on_fake_tensors():
    """as_custom_ops(): the triton backend on fake CPU tensors runs the repae:: op's shape function; the counter
    records one fused op that reads x once and writes h once (plus its small per-row statistics)."""
    from repae.kernels import adaln, as_custom_ops

    B, T, D = 3, 7, 40
    with FakeTensorMode(), as_custom_ops():
        x, shift, scale = torch.randn(B, T, D), torch.randn(B, D), torch.randn(B, D)
        counter = CostCounter(tf32=True)
        with counter:
            _, h = adaln(x, shift, scale, backend="triton")
            counter.mark("p")
    assert h.shape == (B, T, D)
    (record,) = counter.phases["p"].records
    assert record.op.startswith("repae.adaln") and record.family == "fused"
    io = 4 * (2 * B * T * D + 2 * B * D)  # x in, h out, shift and scale in
    assert io <= record.bytes <= io + 4 * 2 * B * T * 2  # + at most two fp32/fp64 statistics per row
