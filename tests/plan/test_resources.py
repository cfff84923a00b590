"""plan/resources.py against hand counts: memory per rank by ZeRO stage and precision, the collectives and their ring
times, the small-collective latency, schedule cost, and reading a config's "deepspeed" section.

The memory table uses P = 1000 trained parameters on N = 4 ranks with 100-element gradient buckets, so every entry
is a product of small numbers: fp32 params 4 B, 16-bit 2 B, fp32 master 4 B, Adam 8 B per parameter, a shard
P/N = 250 elements.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from repae.model.flops import GPU_SPECS
from repae.plan.resources import (
    Collective,
    ZeroBuckets,
    engine_comm,
    engine_memory,
    engine_settings,
    ring_seconds,
    schedule_cost,
    small_collectives_seconds,
)

ROOT = Path(__file__).resolve().parents[2]
H100 = GPU_SPECS["h100"]
SMALL = ZeroBuckets(reduce_bucket_size=100, overlap_comm=False)

# mode, stage: params, grads, master_params, optimizer, comm_buffers (bytes per rank)
MEMORY = {
    ("fp32", 0): (4000, 4000, 0, 8000, 4000),   # ZeRO-0 flattens all 1000 grads (< 5e8) to all-reduce them
    ("fp32", 1): (4000, 4000, 1000, 2000, 800),  # master clone 250 x 4; one ipg buffer 100 x 4 + its flat copy
    ("fp32", 2): (4000, 1000, 1000, 2000, 800),  # grads 4000 / 4
    ("fp32", 3): (1000, 1000, 0, 2000, 400),     # params 4000 / 4; the fp32 partition is the master; one buffer
    ("bf16", 0): (2000, 2000, 4000, 8000, 2000),  # FP16_Optimizer: full fp32 masters and Adam states
    ("bf16", 2): (2000, 500, 1000, 2000, 400),   # ipg 100 x 2 + flat copy 100 x 2
    ("bf16", 3): (500, 500, 1000, 2000, 200),
    ("fp16", 1): (2000, 2000, 1000, 2000, 400),
    ("ddp", 0): (4000, 4000, 0, 8000, 4000),    # DDP buckets: a second copy of every fp32 gradient
}


@pytest.mark.parametrize("mode,stage", list(MEMORY))
def test_engine_memory_by_stage_and_mode(mode, stage):
    got = engine_memory(1000, mode=mode, zero_stage=stage, world=4, buckets=SMALL)
    parts = ("params", "grads", "master_params", "optimizer", "comm_buffers")
    assert got == dict(zip(parts, MEMORY[mode, stage]))


def test_overlap_comm_doubles_the_ipg_buffer():
    got = engine_memory(1000, mode="fp32", zero_stage=2, world=4, buckets=replace(SMALL, overlap_comm=True))
    assert got["comm_buffers"] == 2 * 100 * 4 + 100 * 4  # two ipg buffers + the flattened bucket


def test_reduce_per_owner_needs_no_flat_copy():
    buckets = replace(SMALL, use_multi_rank_bucket_allreduce=False)
    assert engine_memory(1000, mode="fp32", zero_stage=2, world=4, buckets=buckets)["comm_buffers"] == 400


def test_ipg_buffer_is_bucket_sized_whatever_the_model():
    # 10 parameters still get a 100-element buffer; the flat copy is only as big as the bucket's contents.
    assert engine_memory(10, mode="fp32", zero_stage=2, world=4, buckets=SMALL)["comm_buffers"] == 400 + 40


def test_one_rank_and_uneven_shards():
    assert engine_memory(1000, mode="fp32", zero_stage=2, world=1, buckets=SMALL)["comm_buffers"] == 400
    assert engine_memory(1000, mode="ddp", zero_stage=0, world=1)["comm_buffers"] == 0  # accelerate: no DDP
    assert engine_memory(1001, mode="fp32", zero_stage=2, world=4, buckets=SMALL)["grads"] == 251 * 4


def test_frozen_params_are_held_and_only_zero3_partitions_them():
    assert engine_memory(1000, mode="bf16", zero_stage=3, world=4, buckets=SMALL, frozen=200)["params"] == 600
    assert engine_memory(1000, mode="bf16", zero_stage=2, world=4, buckets=SMALL, frozen=200)["params"] == 2400


@pytest.mark.parametrize("kwargs,key", [
    ({"mode": "amp", "zero_stage": 0, "world": 4}, "mode"),
    ({"mode": "ddp", "zero_stage": 2, "world": 4}, "zero_stage"),
    ({"mode": "fp32", "zero_stage": 4, "world": 4}, "zero_stage"),
    ({"mode": "fp32", "zero_stage": 2, "world": 0}, "world"),
])
def test_bad_arguments_name_the_argument(kwargs, key):
    with pytest.raises(ValueError, match=f"^{key}:"):
        engine_memory(1000, **kwargs)


def test_engine_comm_per_stage():
    assert engine_comm(1000, mode="fp32", zero_stage=2, world=4) == [
        Collective("grad_all_reduce", "all_reduce", 4000), Collective("param_all_gather", "all_gather", 4000)]
    assert engine_comm(1000, mode="ddp", zero_stage=0, world=4) == [Collective("grad_all_reduce", "all_reduce", 4000)]
    per_owner = ZeroBuckets(use_multi_rank_bucket_allreduce=False)
    owner = engine_comm(1000, mode="bf16", zero_stage=1, world=4, buckets=per_owner)
    assert [(c.kind, c.bytes) for c in owner] == [("reduce_scatter", 2000), ("all_gather", 2000)]
    stage3 = engine_comm(1000, mode="bf16", zero_stage=3, world=4)
    assert [(c.kind, c.bytes) for c in stage3] == [("all_gather", 2000), ("all_gather", 2000), ("reduce_scatter", 2000)]
    assert engine_comm(1000, mode="fp32", zero_stage=2, world=1) == []


def test_comm_dtype_sets_the_gradient_bytes_only():
    comm = engine_comm(1000, mode="bf16", zero_stage=2, world=4, comm_dtype_bytes=4)
    assert [c.bytes for c in comm] == [4000, 2000]
    comm = engine_comm(1000, mode="fp32", zero_stage=0, world=4, buckets=ZeroBuckets(comm_dtype_bytes=2))
    assert [c.bytes for c in comm] == [2000]


def test_ring_seconds():
    S = 8_000_000_000
    assert ring_seconds(Collective("g", "all_reduce", S), 8, H100) == pytest.approx(2 * 7 / 8 * S / 450e9)
    assert ring_seconds(Collective("p", "all_gather", S), 8, H100) == pytest.approx(7 / 8 * S / 450e9)
    # Across nodes: one ring per NIC, each NIC carrying an eighth of the data: 8 x 50 GB/s (link_gbps).
    assert ring_seconds(Collective("g", "all_reduce", S), 16, H100) == pytest.approx(2 * 15 / 16 * S / 400e9)
    slow_nvlink = replace(H100, nvlink_gbps=300.0)  # then NVLink, not the NICs, limits the multi-node ring
    assert ring_seconds(Collective("g", "all_reduce", S), 16, slow_nvlink) == pytest.approx(2 * 15 / 16 * S / 300e9)
    assert ring_seconds(Collective("g", "all_reduce", S), 1, H100) == 0.0


def test_ring_seconds_without_a_bandwidth_names_the_field():
    with pytest.raises(ValueError, match="network_gbps"):
        ring_seconds(Collective("g", "all_reduce", 8), 16, replace(H100, network_gbps=0.0))


def test_small_collectives_pay_a_latency_each():
    assert small_collectives_seconds([4, 4], 8, H100) == pytest.approx(2 * (10e-6 + 2 * 7 / 8 * 4 / 450e9))
    assert small_collectives_seconds([4], 16, H100) == pytest.approx(30e-6 + 2 * 15 / 16 * 4 / 400e9)
    assert small_collectives_seconds([4], 1, H100) == 0.0


def test_schedule_cost():
    assert schedule_cost(0.5, 7200, 8) == pytest.approx({"wall_hours": 1.0, "wall_days": 1 / 24, "gpu_hours": 8.0})
    with pytest.raises(ValueError, match="^steps:"):
        schedule_cost(0.5, -1, 8)


def test_gpu_rows_have_links():
    for name, gpu in GPU_SPECS.items():
        assert gpu.gpus_per_node == (2 if name in ("h100-nvl", "h100-pcie") else 8), name  # bridged pairs vs HGX
        assert gpu.nvlink_gbps > gpu.network_gbps > 0, name
        assert gpu.bf16_tflops > gpu.tf32_tflops > gpu.fp32_tflops > 0, name


def test_engine_settings_of_the_sitxl_config():
    ds = json.loads((ROOT / "configs" / "sitxl_repae.json").read_text())["deepspeed"]
    stage, mode, buckets = engine_settings(ds)
    assert (stage, mode) == (2, "fp32")
    assert buckets == ZeroBuckets(reduce_bucket_size=500_000_000, allgather_bucket_size=500_000_000,
                                  overlap_comm=True, contiguous_gradients=True)


def test_engine_settings_defaults_and_precisions():
    assert engine_settings({}) == (0, "fp32", ZeroBuckets(overlap_comm=False))
    assert engine_settings({"zero_optimization": {"stage": 3}})[2].overlap_comm is True  # DeepSpeed's default
    assert engine_settings({"bf16": {"enabled": True}})[1] == "bf16"
    assert engine_settings({"bfloat16": {"enabled": True}})[1] == "bf16"
    assert engine_settings({"fp16": {"enabled": True}})[1] == "fp16"
    assert engine_settings({"communication_data_type": "bf16"})[2].comm_dtype_bytes == 2


@pytest.mark.parametrize("ds,key", [
    ({"zero_optimization": 2}, "deepspeed.zero_optimization:"),
    ({"zero_optimization": {"stage": 5}}, "deepspeed.zero_optimization.stage:"),
    ({"zero_optimization": {"stage": "2"}}, "deepspeed.zero_optimization.stage:"),
    ({"zero_optimization": {"reduce_bucket_size": "auto"}}, "deepspeed.zero_optimization.reduce_bucket_size:"),
    ({"zero_optimization": {"reduce_bucket_size": 0}}, "deepspeed.zero_optimization.reduce_bucket_size:"),
    ({"zero_optimization": {"overlap_comm": "yes"}}, "deepspeed.zero_optimization.overlap_comm:"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
     "deepspeed.zero_optimization.offload_optimizer.device:"),
    ({"bf16": {"enabled": "auto"}}, "deepspeed.bf16.enabled:"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "deepspeed.bf16.enabled and deepspeed.fp16.enabled:"),
    ({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}, "deepspeed.data_types.grad_accum_dtype:"),
    ({"communication_data_type": "fp8"}, "deepspeed.communication_data_type:"),
])
def test_engine_settings_bad_values_name_the_key(ds, key):
    with pytest.raises(ValueError) as err:
        engine_settings(ds)
    assert str(err.value).startswith(key)


def test_a_device_name_gets_its_most_specific_spec_row():
    from repae.model.flops import gpu_spec_for, peak_bf16_tflops

    assert gpu_spec_for("NVIDIA H100 80GB HBM3").name == "H100 SXM 80GB"
    assert gpu_spec_for("NVIDIA H100 PCIe").name == "H100 PCIe 80GB"  # not the SXM row, though "H100" matches too
    assert gpu_spec_for("NVIDIA H100 NVL").hbm_gbps == 3900.0
    assert gpu_spec_for("NVIDIA A100-SXM4-80GB").bf16_tflops == 312.0
    assert gpu_spec_for("NVIDIA GeForce RTX 4090") is None and peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None
