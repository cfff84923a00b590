"""The plan of a run (plan/report.py, plan/cli.py): the roofline arithmetic on GPUs made to be compute- or
memory-bound, the memory and communication sums, the official recipe next to ours, and the command."""

# N GPUs

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from repae.model.flops import GPU_SPECS
from repae.plan import resources
from repae.plan.cli import main
from repae.plan.report import UPDATE_PHASE, make_plan
from repae.plan.trace import LDM_PHASES, PHASES
from repae.train.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "sitxl_repae.json"
H100 = GPU_SPECS["h100"]


@pytest.fixture(scope="module", autouse=True)
def traces_once():
    """One trace per (config, batch, backend, precision) for the whole file: make_plan only reads a trace, and the
    CPU suite's time is budgeted."""
    from repae.plan import report

    cache, trace = {}, report.trace_step

    def cached(cfg, batch, **kw):
        key = (repr(cfg), batch, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = trace(cfg, batch, **kw)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "trace_step", cached)
        yield


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIG)


@pytest.fixture(scope="module")
def plan8(cfg):
    return make_plan(cfg, H100, 8)


def test_floor_is_flops_at_the_peak_when_memory_is_free(cfg):
    """One ceiling for every op and an endless HBM: the floor is the step's FLOPs over that ceiling."""
    gpu = replace(H100, tf32_tflops=H100.bf16_tflops, fp32_tflops=H100.bf16_tflops, hbm_gbps=1e12)
    plan = make_plan(cfg, gpu, 64)
    assert plan["step"]["floor_ms"] == pytest.approx(plan["step"]["tflop"] / H100.bf16_tflops * 1e3, rel=1e-9)
    assert plan["step"]["mfu_at_floor"] == pytest.approx(1.0)
    assert {p["bound"] for p in plan["phases"].values()} == {"compute"}


def test_floor_is_bytes_over_bandwidth_when_flops_are_free(cfg):
    gpu = replace(H100, bf16_tflops=1e9, tf32_tflops=1e9, fp32_tflops=1e9)
    plan = make_plan(cfg, gpu, 64)
    gbytes = sum(p["gbyte"] for p in plan["phases"].values())
    assert plan["step"]["floor_ms"] == pytest.approx(gbytes / H100.hbm_gbps * 1e3, rel=1e-9)
    assert {p["bound"] for p in plan["phases"].values()} == {"memory"}


def test_plan_at_8_gpus(plan8):
    assert list(plan8["phases"]) == list(PHASES) and plan8["images_per_gpu"] == 32
    sit_fwd = plan8["phases"]["sit_forward"]
    assert sit_fwd["gflop"] == pytest.approx(32 * 241.4, rel=0.01)  # SiT-XL/2 forward (tests/plan/test_flops.py)
    assert plan8["step"]["floor_ms"] == pytest.approx(sum(p["floor_ms"] for p in plan8["phases"].values()))
    # ZeRO-2 at 8 GPUs: the SiT's AdamW states are an eighth of 8 bytes per parameter.
    sit = plan8["memory"]["engines"]["sit"]
    assert sit["optimizer"] == pytest.approx(8 * 683_242_512 / 8, abs=8)
    # Communication: the SiT's fp32 gradient all-reduce on NVLink by the ring model.
    grad = next(c for c in plan8["communication"]["collectives"] if c["engine"] == "sit" and "grad" in c["name"])
    assert grad["bytes"] == 4 * 683_242_512
    assert grad["seconds"] == pytest.approx(2 * 7 / 8 * grad["bytes"] / (H100.nvlink_gbps * 1e9))


def test_memory_is_the_sum_of_its_parts_in_the_worst_phase(plan8):
    m = plan8["memory"]
    engines = m["engines"]
    static = (sum(v for parts in engines.values() for k, v in parts.items() if k != "comm_buffers")
              + sum(m["frozen"].values()) + m["batch"])
    for phase, total in m["by_phase"].items():
        buffers = sum(engines[e]["comm_buffers"] for e, p in UPDATE_PHASE.items() if p == phase)
        activations = plan8["phases"][phase]["peak_activation_gb"] * 1e9
        assert total == pytest.approx(static + activations + buffers, rel=1e-9), phase
    assert m["total"] == max(m["by_phase"].values())
    assert m["worst_phase"] == "vae_backward_step"  # the f8d4 VAE's activations at 256 px dominate


def test_one_gpu_has_no_communication(cfg):
    plan = make_plan(cfg, H100, 1, recipe="official")
    assert plan["communication"]["collectives"] == [] and plan["communication"]["seconds"] == 0.0
    assert plan["images_per_gpu"] == 256


def test_official_recipe_moves_more_bytes_for_the_same_flops(cfg, plan8):
    off = make_plan(cfg, H100, 8, recipe="official")
    assert off["recipe"]["mode"] == "ddp" and off["recipe"]["backend"] == "eager"
    assert off["step"]["tflop"] == pytest.approx(plan8["step"]["tflop"], rel=1e-3)
    for phase in ("sit_forward", "sit_backward_step", "align_forward"):  # our fused adaLN / REPA loss / latent BN
        assert off["phases"][phase]["gbyte"] > 1.2 * plan8["phases"][phase]["gbyte"], phase
    # DDP keeps whole fp32 gradients and Adam states on every rank, and a second copy of the gradients in buckets.
    sit = off["memory"]["engines"]["sit"]
    assert sit["grads"] == sit["comm_buffers"] == 4 * 683_242_512 and sit["optimizer"] == 8 * 683_242_512


def test_64_gpus_use_the_network(cfg):
    plan = make_plan(cfg, H100, 64)
    assert plan["images_per_gpu"] == 4
    grad = next(c for c in plan["communication"]["collectives"] if c["engine"] == "sit" and "grad" in c["name"])
    node_nics = H100.gpus_per_node * H100.network_gbps  # one NCCL ring per NIC (plan/resources.py link_gbps)
    assert grad["seconds"] == pytest.approx(2 * 63 / 64 * grad["bytes"] / (node_nics * 1e9))
    cost = plan["schedule"]["at_floor"]
    assert cost == resources.schedule_cost(plan["step"]["floor_ms"] / 1e3, 400_000, 64)


def test_command_prints_the_tables():
    out = subprocess.run([sys.executable, "-m", "repae.plan", "--config", str(CONFIG), "--gpus", "8"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for text in (*PHASES, "floor ms by family", "per-rank memory GB", "communication per rank", "step floor",
                 "GPU-hours"):
        assert text in out.stdout, text


def test_json_of_both_recipes(capsys):
    assert main(["--config", str(CONFIG), "--gpu", "h200", "--gpus", "64", "--recipe", "both", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert set(plans) == {"ours", "official"}
    assert plans["ours"]["gpu"]["hbm_gbps"] == GPU_SPECS["h200"].hbm_gbps


def test_bad_arguments_are_one_line_errors(capsys):
    assert main(["--config", str(CONFIG), "--gpus", "3"]) == 2  # 256 images do not split over 3 GPUs
    assert main(["--config", str(CONFIG), "--gpu", "custom"]) == 2  # no --peak-tflops
    assert main(["--config", str(CONFIG), "--gpus", "256"]) == 2  # one image per GPU: no batch statistics
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "at least 2 images" in err[2]


def test_ldm_stage_trains_the_sit_alone():
    cfg = load_config(ROOT / "configs" / "sitxl1_ldm_e2e_vavae.json")
    cached = make_plan(cfg, H100, 8)  # its latents come from a latent cache: the frozen VAE does no work
    assert list(cached["phases"]) == list(LDM_PHASES) and list(cached["memory"]["engines"]) == ["sit"]
    assert cached["phases"]["latents"]["gflop"] < 1e-3
    online = make_plan(load_config(ROOT / "configs" / "sitxl1_ldm_e2e_vavae.json", ["data.latent_cache=null"]), H100, 8)
    assert online["phases"]["latents"]["gflop"] > 32 * 100  # the VAE encoder runs on the batch (no gradients)
    assert online["phases"]["sit_forward"]["gflop"] == pytest.approx(cached["phases"]["sit_forward"]["gflop"])


def test_the_configs_zero_settings_reach_the_collectives():
    """communication_data_type and use_multi_rank_bucket_allreduce of the config's DeepSpeed section set the gradient
    collective's dtype and kind (plan/resources.py engine_settings -> engine_comm)."""
    cfg = load_config(CONFIG, ["deepspeed.communication_data_type=bf16",
                               "deepspeed.zero_optimization.use_multi_rank_bucket_allreduce=false"])
    grad = next(c for c in make_plan(cfg, H100, 8)["communication"]["collectives"]
                if c["engine"] == "sit" and "grad" in c["name"])
    assert grad["kind"] == "reduce_scatter" and grad["bytes"] == 2 * 683_242_512
