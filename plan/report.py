"""The plan of a run: the step's floor per phase on a GPU, per-rank memory, communication, the schedule's cost;
as a dict (--json) and as text tables (docs/PLANNING.md).

    plan = make_plan(cfg, GPU_SPECS["h100"], num_gpus=8)           # our recipe as the config sets it
    plan = make_plan(cfg, GPU_SPECS["h100"], 8, recipe="official")  # the original's: fp16, DDP, no fused kernels
    print(format_plan(plan))
"""

# N world size, P parameters

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from repae.model.flops import GPUSpec
from repae.train.config import TrainConfig

from . import resources
from .counter import FAMILIES
from .roofline import memory_bound_ops, optimizer_records, phase_rows
from .trace import StepTrace, trace_step

UPDATE_PHASE = {"sit": "sit_backward_step", "vae": "vae_backward_step", "disc": "disc"}
"""The phase whose time holds an engine's optimizer update."""


@dataclass(frozen=True)
class Recipe:
    """How a run trains: precision, kernels and the data-parallel engine (mode and ZeRO stage of plan/resources)."""

    name: str
    precision: str
    backend: str
    mode: str
    zero_stage: int
    buckets: resources.ZeroBuckets | None


def recipe_of(cfg: TrainConfig, name: str) -> Recipe:
    """"ours": what the config runs (its precision, fused kernels, its DeepSpeed section); "official": the original
    code's defaults (fp16 autocast, eager PyTorch ops, accelerate's DDP with fp32 weights and gradients)."""
    if name == "ours":
        stage, mode, buckets = resources.engine_settings(cfg.deepspeed)
        return Recipe("ours", cfg.schedule.precision, "triton", mode, stage, buckets)
    if name == "official":
        return Recipe("official", "fp16", "eager", "ddp", 0, None)
    raise ValueError(f"--recipe {name!r}: expected ours or official")


def _memory(trace: StepTrace, recipe: Recipe, world: int) -> dict:
    """Per-rank bytes at the worst phase: what lives through the step (each engine's weights, gradients, optimizer
    states; the frozen models; the batch), plus the phase's activation peak, plus the gradient buffers of the engine
    whose backward runs in that phase (DeepSpeed allocates them for that engine's backward only; DDP's buckets
    live through the run)."""
    engines = {e: resources.engine_memory(trace.engine_params[e], mode=recipe.mode, zero_stage=recipe.zero_stage,
                                          world=world, buckets=recipe.buckets) for e in trace.engine_params}
    transient = recipe.mode != "ddp"
    static = (sum(sum(v for k, v in parts.items() if not (transient and k == "comm_buffers"))
                  for parts in engines.values())
              + sum(trace.frozen_bytes.values()) + trace.input_bytes)
    by_phase = {}
    for name, phase in trace.phases.items():
        buffers = sum(engines[e]["comm_buffers"] for e in engines if transient and UPDATE_PHASE[e] == name)
        by_phase[name] = static + phase.peak_bytes + buffers
    worst = max(by_phase, key=by_phase.get)
    return {"engines": engines, "comm_buffers_transient": transient, "frozen": trace.frozen_bytes,
            "batch": trace.input_bytes, "activations": trace.phases[worst].peak_bytes, "worst_phase": worst,
            "by_phase": by_phase, "total": by_phase[worst]}


def _communication(trace: StepTrace, recipe: Recipe, gpu: GPUSpec, world: int) -> dict:
    """Collectives per rank per step: each engine's gradient (and parameter) traffic, the latent-BN statistics, the
    finite-loss flags and the stop agreement; seconds by the ring model of plan/resources.py."""
    rows = []
    for e in trace.engine_params:
        for c in resources.engine_comm(trace.engine_params[e], mode=recipe.mode, zero_stage=recipe.zero_stage,
                                       world=world, buckets=recipe.buckets):
            rows.append({"engine": e, **asdict(c), "seconds": resources.ring_seconds(c, world, gpu)})
    small = {"count": len(SMALL_COLLECTIVES) if world > 1 else 0,
             "seconds": resources.small_collectives_seconds(SMALL_COLLECTIVES, world, gpu)}
    return {"collectives": rows, "small": small,
            "seconds": sum(r["seconds"] for r in rows) + small["seconds"]}


SMALL_COLLECTIVES = (3 * 4 * 8, 3 * 4 * 8, 4, 4, 4, 4)
"""Bytes of the step's small all-reduces: the latent BN's statistics forward and backward ([3, C] at most fp64,
C = 4), one finite-loss flag per engine update (train/step.py) and the trainer's stop agreement (train/trainer.py
_should_stop). The log window's mean (every logging.log_every steps) is left out."""


def _phase_rows(trace: StepTrace, rec: Recipe, gpu: GPUSpec, world: int) -> dict:
    """Each phase's roofline rows with the optimizers' updates added to their phases (ZeRO-1 and up update 1/N of
    the parameters on each rank)."""
    owned = 1 if rec.zero_stage == 0 else world
    pb = resources.param_bytes(rec.mode)
    low = None if pb == resources.MASTER_BYTES else pb  # a 16-bit engine also writes its 16-bit weight copy
    extra = {UPDATE_PHASE[e]: optimizer_records(-(-trace.engine_params[e] // owned),
                                                master_bytes=resources.MASTER_BYTES, low_bytes=low)
             for e in trace.engine_params}
    return phase_rows(trace, gpu, extra)


def predicted_phase_ms(cfg: TrainConfig, gpu: GPUSpec, *, batch: int, backend: str, world: int = 1) -> dict[str, float]:
    """The floor in ms of each phase of one rank's step at `batch` images with the config's engines and precision
    and the given kernel backend (the train-step benchmark prints it next to what it measures)."""
    rec = replace(recipe_of(cfg, "ours"), backend=backend)
    trace = trace_step(cfg, batch, backend=backend, precision=rec.precision)
    return {name: row.total_floor_s * 1e3 for name, row in _phase_rows(trace, rec, gpu, world).items()}


def make_plan(cfg: TrainConfig, gpu: GPUSpec, num_gpus: int, *, recipe: str = "ours") -> dict:
    """The plan as a dict (the --json output) for schedule.global_batch_size / num_gpus images per GPU."""
    G = cfg.schedule.global_batch_size
    if num_gpus < 1 or G % num_gpus:
        raise ValueError(f"--gpus {num_gpus} must be >= 1 and divide schedule.global_batch_size={G}")
    rec = recipe_of(cfg, recipe)
    trace = trace_step(cfg, G // num_gpus, backend=rec.backend, precision=rec.precision)
    rows = _phase_rows(trace, rec, gpu, num_gpus)
    phases = {name: {"gflop": sum(r.flops.values()) / 1e9, "gbyte": sum(r.bytes.values()) / 1e9,
                     "floor_ms": r.total_floor_s * 1e3, "bound": r.bound,
                     "memory_bound_share": r.memory_bound_s / r.total_floor_s if r.total_floor_s else 0.0,
                     "peak_activation_gb": r.peak_bytes / 1e9,
                     "floor_ms_by_family": {f: r.floor_s[f] * 1e3 for f in FAMILIES},
                     "gbyte_by_family": {f: r.bytes[f] / 1e9 for f in FAMILIES},
                     "gflop_by_family": {f: r.flops[f] / 1e9 for f in FAMILIES}} for name, r in rows.items()}
    floor_s = sum(r.total_floor_s for r in rows.values())
    flops = sum(sum(r.flops.values()) for r in rows.values())
    comm = _communication(trace, rec, gpu, num_gpus)
    step_s = floor_s + comm["seconds"]  # communication not overlapped: the upper of the two floors
    return {"gpu": asdict(gpu), "recipe": asdict(rec), "num_gpus": num_gpus, "global_batch_size": G,
            "images_per_gpu": trace.batch, "phases": phases,
            "step": {"floor_ms": floor_s * 1e3, "floor_with_comm_ms": step_s * 1e3,
                     "img_per_s_per_gpu": trace.batch / floor_s, "tflop": flops / 1e12,
                     "mfu_at_floor": flops / floor_s / (gpu.bf16_tflops * 1e12)},
            "memory_bound_ops": memory_bound_ops(trace, gpu),
            "memory": _memory(trace, rec, num_gpus), "communication": comm,
            "schedule": {"steps": cfg.schedule.max_steps,
                         "at_floor": resources.schedule_cost(floor_s, cfg.schedule.max_steps, num_gpus),
                         "at_floor_with_comm": resources.schedule_cost(step_s, cfg.schedule.max_steps, num_gpus)}}
