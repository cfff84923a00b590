"""The physical floor of each phase of a traced step on one GPU (docs/PLANNING.md#reading-the-tables).

    rows = phase_rows(trace, gpu, optimizer=optimizer_records(...))   # {phase: PhaseRow}

An op can finish no sooner than its FLOPs at the ceiling it meets (CEILINGS: 16-bit or TF32 tensor cores, or the
fp32 CUDA cores for everything that is not a matmul) and no sooner than its bytes at the HBM bandwidth; a phase's
floor is the sum of its ops' floors (ops run one after another on one stream). An op is memory-bound when its bytes
take longer than its FLOPs. Spec-sheet ceilings, never reached in practice: a floor is a bound, not a prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from repae.model.flops import FLOP_FAMILIES, GPUSpec

from .counter import FAMILIES, OpRecord
from .trace import StepTrace


def ceiling_flops(gpu: GPUSpec, ceiling: str) -> float:
    """FLOP/s of a CEILINGS entry on this GPU (spec-sheet dense peaks)."""
    tflops = {"tensor16": gpu.bf16_tflops, "tf32": gpu.tf32_tflops, "fp32": gpu.fp32_tflops}[ceiling]
    if tflops <= 0:
        raise ValueError(f"GPU {gpu.name!r} has no {ceiling} peak in its spec row (give it with --gpu custom)")
    return tflops * 1e12


def op_seconds(r: OpRecord, gpu: GPUSpec) -> tuple[float, float]:
    """(compute seconds, memory seconds) of one op: its FLOPs at its ceiling, its bytes at the HBM bandwidth."""
    return r.flops / ceiling_flops(gpu, r.ceiling), r.bytes / (gpu.hbm_gbps * 1e9)


@dataclass
class PhaseRow:
    """One phase of the step on one GPU: totals by family and its floor."""

    flops: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FAMILIES, 0.0))
    bytes: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FAMILIES, 0.0))
    floor_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FAMILIES, 0.0))
    memory_bound_s: float = 0.0
    """The part of the floor spent in memory-bound ops."""
    peak_bytes: int = 0
    """The most bytes of activations and temporaries alive at once during the phase."""

    @property
    def total_floor_s(self) -> float:
        return sum(self.floor_s.values())

    @property
    def bound(self) -> str:
        """"memory" when memory-bound ops make most of the floor, else "compute"."""
        return "memory" if self.memory_bound_s > 0.5 * self.total_floor_s else "compute"


def optimizer_records(params: int, *, master_bytes: int, low_bytes: int | None) -> list[OpRecord]:
    """The optimizer's update of `params` parameters on this rank (its ZeRO partition) as op records: AdamW reads the
    fp32 weight, gradient and both moments and writes the weight and moments (28 bytes per parameter, the fused
    kernel train/engine.py uses on GPU); gradient clipping reads the gradients once for the norm and scales them
    (12 bytes); a 16-bit engine (low_bytes=2) also writes the 16-bit copy of each updated weight. About 15 FLOPs
    per parameter on the fp32 cores, never the bound."""
    adam = OpRecord("adamw (planned)", "optimizer", 15.0 * params, float(7 * master_bytes * params), "fp32")
    clip = OpRecord("clip_grad_norm (planned)", "optimizer", 3.0 * params, float(3 * master_bytes * params), "fp32")
    records = [adam, clip]
    if low_bytes is not None:
        records.append(OpRecord("copy to 16-bit params (planned)", "optimizer", 0.0,
                                float((master_bytes + low_bytes) * params), "fp32"))
    return records


def phase_rows(trace: StepTrace, gpu: GPUSpec, extra: dict[str, list[OpRecord]] | None = None) -> dict[str, PhaseRow]:
    """Each phase's totals and floor on `gpu`; `extra` adds planned records (the optimizers) to named phases."""
    rows = {}
    for name, phase in trace.phases.items():
        row = PhaseRow(peak_bytes=phase.peak_bytes)
        for r in [*phase.records, *(extra or {}).get(name, [])]:
            compute, memory = op_seconds(r, gpu)
            row.flops[r.family] += r.flops
            row.bytes[r.family] += r.bytes
            row.floor_s[r.family] += max(compute, memory)
            if memory > compute:
                row.memory_bound_s += memory
        rows[name] = row
    return rows


def flops_per_image(trace: StepTrace) -> dict[str, dict[str, float]]:
    """FLOPs per image of each phase in the three FLOP families of model/flops.py (matmul-class work only, as
    torch's FlopCounterMode counts it): {phase: {family: flops}}."""
    out = {}
    for name, phase in trace.phases.items():
        fam = dict.fromkeys(FLOP_FAMILIES, 0.0)
        for r in phase.records:
            if r.family in fam:
                fam[r.family] += r.flops / trace.batch
        out[name] = fam
    return out


def memory_bound_ops(trace: StepTrace, gpu: GPUSpec, k: int = 12) -> list[dict]:
    """The k ops (by aten name, summed over the step) that spend the most floor time bound by HBM bandwidth: where
    fusion would pay. Each: op, calls, GB moved, floor ms, and the phase holding most of its time."""
    by_op: dict[str, dict] = {}
    for name, phase in trace.phases.items():
        for r in phase.records:
            compute, memory = op_seconds(r, gpu)
            if memory <= compute:
                continue
            row = by_op.setdefault(r.op, {"op": r.op, "family": r.family, "calls": 0, "gbyte": 0.0, "floor_ms": 0.0,
                                          "by_phase": {}})
            row["calls"] += 1
            row["gbyte"] += r.bytes / 1e9
            row["floor_ms"] += memory * 1e3
            row["by_phase"][name] = row["by_phase"].get(name, 0.0) + memory * 1e3
    top = sorted(by_op.values(), key=lambda row: -row["floor_ms"])[:k]
    for row in top:
        row["main_phase"] = max(row.pop("by_phase").items(), key=lambda kv: kv[1])[0]
    return top
