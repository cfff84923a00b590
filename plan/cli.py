"""`python -m repae.plan`: the plan of a run as text tables or JSON (docs/PLANNING.md).

    python -m repae.plan --config configs/sitxl_repae.json --gpu h100 --gpus 8 [--recipe ours|official|both]
                         [--set key=value ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from repae.model.flops import GPU_SPECS, GPUSpec
from repae.train.config import load_config

from .counter import FAMILIES
from .report import make_plan

GB = 1e9


def _head(plan: dict) -> list[str]:
    g, r = plan["gpu"], plan["recipe"]
    engine = "DDP" if r["mode"] == "ddp" else f"DeepSpeed ZeRO-{r['zero_stage']} ({r['mode']} weights)"
    return [f"recipe {r['name']}: {r['precision']} autocast, {'fused' if r['backend'] == 'triton' else 'eager'} "
            f"kernels, {engine}",
            f"GPU {g['name']}: {g['bf16_tflops']:.0f} TFLOP/s bf16, {g['tf32_tflops']:.0f} TF32, "
            f"{g['fp32_tflops']:.0f} fp32, {g['hbm_gbps']:.0f} GB/s HBM, {g['memory_gb']:.0f} GB; "
            f"{plan['num_gpus']} GPU(s), {plan['images_per_gpu']} images per GPU per step"]


def _phase_table(plan: dict) -> list[str]:
    head = (f"{'phase':<18} {'GFLOP':>9} {'GB moved':>9} {'floor ms':>9} {'bound':>7} {'mem-bound':>9} "
            f"{'act. GB':>8}")
    lines = [head, "-" * len(head)]
    for name, p in plan["phases"].items():
        lines.append(f"{name:<18} {p['gflop']:>9.0f} {p['gbyte']:>9.1f} {p['floor_ms']:>9.2f} {p['bound']:>7} "
                     f"{p['memory_bound_share']:>8.0%} {p['peak_activation_gb']:>8.1f}")
    s = plan["step"]
    lines += ["-" * len(head),
              f"{'step':<18} {s['tflop'] * 1e3:>9.0f} {sum(p['gbyte'] for p in plan['phases'].values()):>9.1f} "
              f"{s['floor_ms']:>9.1f}"]
    return lines


def _family_table(plan: dict) -> list[str]:
    short = {"elementwise": "elemwise", "attention": "attn", "reduction": "reduce", "optimizer": "optim"}
    head = f"{'floor ms by family':<18} " + " ".join(f"{short.get(f, f):>8}" for f in FAMILIES)
    lines = [head, "-" * len(head)]
    for name, p in plan["phases"].items():
        lines.append(f"{name:<18} " + " ".join(f"{p['floor_ms_by_family'][f]:>8.2f}" for f in FAMILIES))
    return lines


def _memory_bound_table(plan: dict) -> list[str]:
    head = f"{'memory-bound ops (where fusion pays)':<44} {'calls':>6} {'GB moved':>9} {'floor ms':>9}  main phase"
    lines = [head, "-" * len(head)]
    for r in plan["memory_bound_ops"]:
        lines.append(f"{r['op']:<44} {r['calls']:>6} {r['gbyte']:>9.1f} {r['floor_ms']:>9.2f}  {r['main_phase']}")
    return lines


def _memory_table(plan: dict) -> list[str]:
    m = plan["memory"]
    parts = list(next(iter(m["engines"].values())))
    head = f"{'per-rank memory GB':<18} " + " ".join(f"{p:>12}" for p in parts) + f" {'total':>8}"
    lines = [head, "-" * len(head)]
    for e, v in m["engines"].items():
        lines.append(f"{e:<18} " + " ".join(f"{v[p] / GB:>12.2f}" for p in parts) + f" {sum(v.values()) / GB:>8.2f}")
    lines.append("frozen: " + ", ".join(f"{k} {v / GB:.2f}" for k, v in m["frozen"].items() if v >= 0.005 * GB))
    if m["comm_buffers_transient"]:
        lines.append("comm_buffers: DeepSpeed allocates them for the engine's own backward only (counted there)")
    lines.append(f"batch {m['batch'] / GB:.3f}; activations and temporaries in the worst phase "
                 f"({m['worst_phase']}) {m['activations'] / GB:.2f}")
    cap = plan["gpu"]["memory_gb"]
    verdict = "" if not cap else (" - fits" if m["total"] / GB <= cap else " - DOES NOT FIT")
    lines.append(f"peak {m['total'] / GB:.1f} GB of {cap:.0f} GB{verdict} in {m['worst_phase']} (allocator caching "
                 f"and fragmentation not included)")
    return lines


def _comm_lines(plan: dict) -> list[str]:
    c = plan["communication"]
    lines = [f"communication per rank per step (ring model, {plan['num_gpus']} GPUs):"]
    for r in c["collectives"]:
        lines.append(f"  {r['engine']:<5} {r['name']:<28} {r['bytes'] / GB:>7.2f} GB  {r['seconds'] * 1e3:>8.2f} ms")
    lines.append(f"  {c['small']['count']} small all-reduces (latent BN, finite-loss flags, stop): "
                 f"{c['small']['seconds'] * 1e3:.2f} ms; total {c['seconds'] * 1e3:.1f} ms")
    return lines


def _summary(plan: dict) -> list[str]:
    s, sch = plan["step"], plan["schedule"]
    a, b = sch["at_floor"], sch["at_floor_with_comm"]
    return [f"step floor {s['floor_ms']:.0f} ms ({s['floor_with_comm_ms']:.0f} ms with communication not overlapped):"
            f" at most {s['img_per_s_per_gpu']:.0f} img/s per GPU; MFU at the floor {s['mfu_at_floor']:.0%}",
            f"{sch['steps']} steps: at least {a['wall_hours']:.0f} h wall ({a['wall_days']:.1f} days), "
            f"{a['gpu_hours']:.0f} GPU-hours; {b['wall_hours']:.0f} h, {b['gpu_hours']:.0f} GPU-hours with "
            f"communication not overlapped"]


def format_plan(plan: dict) -> str:
    """The plan as text: head, phases, floor by family, the top memory-bound ops, memory, communication, summary."""
    blocks = [_head(plan), _phase_table(plan), _family_table(plan), _memory_bound_table(plan), _memory_table(plan),
              _comm_lines(plan),
              _summary(plan)]
    return "\n\n".join("\n".join(b) for b in blocks)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m repae.plan",
                                description="The floor, memory and communication of a REPA-E run on a GPU")
    p.add_argument("--config", required=True, help="run JSON, e.g. configs/sitxl_repae.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override (repeatable)")
    p.add_argument("--gpu", choices=(*GPU_SPECS, "custom"), default="h100", help="spec-sheet row (default h100)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs sharing schedule.global_batch_size (default 1)")
    p.add_argument("--recipe", choices=("ours", "official", "both"), default="ours",
                   help="ours (the config) or the original code's fp16 + DDP + eager ops, or both")
    for flag, what in (("--peak-tflops", "dense bf16 TFLOP/s"),
                       ("--tf32-tflops", "dense TF32 TFLOP/s (default: half the bf16 peak, the H100's ratio)"),
                       ("--fp32-tflops", "fp32 (CUDA-core) TFLOP/s (default: the bf16 peak / 15, about the H100's)"),
                       ("--hbm-gbps", "HBM GB/s"),
                       ("--memory-gb", "HBM GB"), ("--nvlink-gbps", "NVLink GB/s per direction"),
                       ("--network-gbps", "inter-node GB/s per GPU per direction")):
        p.add_argument(flag, type=float, default=None, help=f"--gpu custom: {what}")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p.parse_args(argv)


def gpu_spec(a: argparse.Namespace) -> GPUSpec:
    """The --gpu row, or the --gpu custom row from the flags (bf16 peak and HBM bandwidth required)."""
    if a.gpu != "custom":
        return GPU_SPECS[a.gpu]
    if not (a.peak_tflops and a.peak_tflops > 0 and a.hbm_gbps and a.hbm_gbps > 0):
        raise ValueError("--gpu custom needs --peak-tflops > 0 and --hbm-gbps > 0 (and optionally --tf32-tflops, "
                         "--fp32-tflops, --memory-gb, --nvlink-gbps, --network-gbps)")
    return GPUSpec("custom", "", a.peak_tflops, a.hbm_gbps, a.memory_gb or 0.0, a.tf32_tflops or a.peak_tflops / 2,
                   a.fp32_tflops or a.peak_tflops / 15, a.nvlink_gbps or 0.0, a.network_gbps or 0.0, 8)


def main(argv=None) -> int:
    a = parse_args(argv)
    recipes = ("ours", "official") if a.recipe == "both" else (a.recipe,)
    try:
        cfg, gpu = load_config(a.config, a.set), gpu_spec(a)
        plans = [make_plan(cfg, gpu, a.gpus, recipe=r) for r in recipes]
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(plans[0] if len(plans) == 1 else {p["recipe"]["name"]: p for p in plans}, indent=2))
    else:
        print(f"\n\n{'=' * 100}\n\n".join(format_plan(p) for p in plans))
    return 0
