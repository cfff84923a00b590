"""Static memory, communication and cost of one trained engine per rank, from counts alone (no model, no GPU).

    zero_stage, mode, buckets = engine_settings(cfg.deepspeed)          # (2, "fp32", ZeroBuckets(...)) for sitxl
    mem = engine_memory(675_000_000, mode=mode, zero_stage=zero_stage, world=8, buckets=buckets)   # bytes by part
    comm = engine_comm(675_000_000, mode=mode, zero_stage=zero_stage, world=8, buckets=buckets)    # [Collective]
    seconds = sum(ring_seconds(c, 8, GPU_SPECS["h100"]) for c in comm)
    cost = schedule_cost(step_seconds=0.5, steps=400_000, world=8)     # {"wall_hours", "wall_days", "gpu_hours"}

An engine is one module trained with AdamW: the trainer runs three (sit, vae, disc: train/engine.py build_engine),
each its own DeepSpeed engine, or, in the original recipe ("ddp"), accelerate's torch DDP. Modes:
  fp32  DeepSpeed without bf16/fp16: fp32 params, grads and Adam states; autocast does the mixed precision
        (what configs/sitxl_repae.json runs).
  bf16, fp16  DeepSpeed's 16-bit engines: 16-bit params and grads, fp32 master params in the optimizer.
  ddp   torch DDP (HuggingFace accelerate): fp32 params and grads, AdamW, no ZeRO.

What the DeepSpeed numbers rest on (DeepSpeed 0.19.8, the version installed here; the config defaults are the same
in microsoft/DeepSpeed's deepspeed/runtime/zero/config.py):
  - ZeRO-1/2 keep a partition of fp32 master params even when the params are already fp32: stage_1_and_2.py clones
    the rank's slice (`weights_partition = ...detach().clone().to(dtype=master_weights_and_grads_dtype)`).
    ZeRO-3 shares the fp32 partition when the params are fp32 (stage3.py, "we don't need another copy").
  - ZeRO-1/2 gradient buckets ("ipg" buffers, stage_1_and_2.py setup_buckets): with contiguous_gradients, one
    buffer of `reduce_bucket_size` elements in the param dtype, two when overlap_comm is on ("double buffers"),
    whatever the model size. They are allocated at the engine's first gradient hook and released at the end of
    its backward (_release_ipg_buffers), so the three engines' buffers are alive one engine at a time: the peak
    over engines is the largest engine's, not the sum. ZeRO-3 keeps one such buffer for the whole run.
  - ZeRO-1/2 reduce gradients with an all-reduce by default: zero_optimization.use_multi_rank_bucket_allreduce
    defaults to true, and average_tensor then all-reduces each bucket (allreduce_and_scatter) and each rank keeps
    its slice. Only with it false (and reduce_scatter, contiguous_gradients true) does it send each slice to its
    owner with dist.reduce, a reduce-scatter's volume. (deepspeedai/DeepSpeed issue #7059 sees all_reduce in the
    comm log of a stage-2 run with reduce_scatter true.) Then the updated params are all-gathered in their dtype
    (utils.py all_gather_into_tensor_dp_groups: into the flat param buffer, no extra buffer).
  - ZeRO-0 (engine.py allreduce_gradients -> buffered_allreduce_fallback) all-reduces flattened copies of the
    grads, MEMORY_OPT_ALLREDUCE_SIZE = 5e8 elements at a time.
Not counted: activations; the step's transient fp32 copy of the grad partition (16-bit modes, freed after step());
a cast copy when communication_data_type differs from the grad dtype; ZeRO-3's gathered params (bounded by
stage3_max_live_parameters). Holds no model or training code.
"""

# P trained parameters of one engine, N data-parallel ranks, S payload bytes of a collective

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from repae.model.flops import GPUSpec

MODES = ("fp32", "bf16", "fp16", "ddp")
"""Engine precisions engine_memory/engine_comm know (module docstring)."""

PARTS = ("params", "grads", "master_params", "optimizer", "comm_buffers")
"""Keys of engine_memory's answer, in bytes per rank."""

ADAM_STATE_BYTES = 8
"""AdamW's exp_avg and exp_avg_sq, fp32, per trained parameter (every mode: DeepSpeed steps fp32 partitions)."""

MASTER_BYTES = 4
"""An fp32 master copy per parameter."""

DS_DEFAULT_BUCKET = 500_000_000
"""DeepSpeed's default reduce_bucket_size and allgather_bucket_size, elements (zero/config.py, pp_int(5e8))."""

DS_STAGE0_ALLREDUCE_ELEMENTS = 500_000_000
"""ZeRO-0 all-reduces the grads in flattened chunks of this many elements (engine.py MEMORY_OPT_ALLREDUCE_SIZE)."""

SMALL_COLLECTIVE_LATENCY_S = {"nvlink": 10e-6, "network": 30e-6}
"""Fixed cost of one small NCCL all-reduce (a few bytes): an assumption of the order nccl-tests reports for 8 GPUs
on NVLink and across InfiniBand nodes, not measured here. Dominates the collectives of a few KiB."""


@dataclass(frozen=True, kw_only=True)
class ZeroBuckets:
    """The zero_optimization settings that size DeepSpeed's communication buffers and pick its collectives."""

    reduce_bucket_size: int = DS_DEFAULT_BUCKET
    """Elements per gradient bucket (the size of each ipg buffer, whatever the model size)."""
    allgather_bucket_size: int = DS_DEFAULT_BUCKET
    """Elements per param all-gather; only used when NCCL lacks all_gather_into_tensor, so it sizes nothing here."""
    overlap_comm: bool = False
    """Reduce during backward on a side stream; ZeRO-1/2 then double the ipg buffers (DeepSpeed: default on at
    stage 3 only; engine_settings resolves that)."""
    contiguous_gradients: bool = True
    """Copy grads into the ipg buffer as they arrive (no buffer without it; the buckets are flattened instead)."""
    reduce_scatter: bool = True
    """Reduce each gradient slice to its owner instead of all-reducing (used only without multi-rank all-reduce)."""
    use_multi_rank_bucket_allreduce: bool = True
    """DeepSpeed's default: all-reduce whole buckets even at ZeRO-1/2 (module docstring)."""
    comm_dtype_bytes: int | None = None
    """Bytes per element of the gradient collectives (deepspeed.communication_data_type); None: the grad dtype."""


@dataclass(frozen=True)
class Collective:
    """One collective an engine runs per step: S = bytes is the full payload (the whole gradient or parameter set),
    not what a rank sends; ring_seconds turns it into time."""

    name: str
    kind: str
    """"all_reduce", "reduce_scatter" or "all_gather"."""
    bytes: int


def _check(params: int, mode: str, zero_stage: int, world: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {MODES}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage: {zero_stage!r} is not 0, 1, 2 or 3")
    if mode == "ddp" and zero_stage != 0:
        raise ValueError(f"zero_stage: {zero_stage} with mode 'ddp' (DDP has no ZeRO; use zero_stage=0)")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world: {world!r} is not a rank count >= 1")
    if isinstance(params, bool) or not isinstance(params, int) or params < 0:
        raise ValueError(f"params: {params!r} is not a parameter count >= 0")


def param_bytes(mode: str) -> int:
    """Bytes per parameter (and per gradient) of the module in this mode."""
    return 2 if mode in ("bf16", "fp16") else 4


def _shard(n: int, world: int) -> int:
    """Elements of one rank's partition: DeepSpeed pads the flat buffer to split evenly, so round up."""
    return -(-n // world)


def engine_memory(params: int, *, mode: str, zero_stage: int, world: int, buckets: ZeroBuckets | None = None,
                  frozen: int = 0) -> dict[str, int]:
    """Static bytes per rank of one engine by PARTS: ZeRO-1 partitions the optimizer states and master params over
    the `world` ranks, ZeRO-2 also the grads, ZeRO-3 also the params. `frozen` parameters (no grads) are held in
    the module's dtype (DeepSpeed casts the whole module in 16-bit modes) and partitioned only by ZeRO-3.
    comm_buffers: DDP's buckets, DeepSpeed's ipg buffers and flattening copies (module docstring)."""
    _check(params, mode, zero_stage, world)
    if isinstance(frozen, bool) or not isinstance(frozen, int) or frozen < 0:
        raise ValueError(f"frozen: {frozen!r} is not a parameter count >= 0")
    buckets = buckets or ZeroBuckets()
    pb = param_bytes(mode)
    shard = _shard(params, world)
    module_params = params + frozen
    if mode == "ddp" or zero_stage == 0:
        # ZeRO-0 wraps the optimizer as it is; a 16-bit engine's (FP16_Optimizer) keeps full fp32 masters.
        master = MASTER_BYTES * params if mode in ("bf16", "fp16") else 0
        optimizer = ADAM_STATE_BYTES * params
    else:
        # The fp32 partition is a clone even when the params are fp32, except at ZeRO-3 (module docstring).
        master = 0 if (zero_stage == 3 and mode == "fp32") else MASTER_BYTES * shard
        optimizer = ADAM_STATE_BYTES * shard
    return {
        "params": pb * (_shard(module_params, world) if zero_stage == 3 else module_params),
        "grads": pb * (shard if zero_stage >= 2 else params),
        "master_params": master,
        "optimizer": optimizer,
        "comm_buffers": _comm_buffer_bytes(params, mode, zero_stage, world, buckets),
    }


def _comm_buffer_bytes(params: int, mode: str, zero_stage: int, world: int, buckets: ZeroBuckets) -> int:
    gb = param_bytes(mode)
    if mode == "ddp":
        # torch/nn/parallel/distributed.py, gradient_as_bucket_view: with the default False the 25 MiB buckets
        # (bucket_cap_mb) hold a second copy of every gradient ("the saved memory size will be equal to the total
        # gradients size" when True). accelerate wraps in DDP only with more than one process (accelerator.py
        # `multi_device` needs use_distributed), so one rank has no buckets.
        return gb * params if world > 1 else 0
    if zero_stage == 0:
        return gb * min(params, DS_STAGE0_ALLREDUCE_ELEMENTS)  # the flattened chunk being all-reduced
    if zero_stage == 3:
        comm_bytes = buckets.comm_dtype_bytes or gb
        return comm_bytes * buckets.reduce_bucket_size if buckets.contiguous_gradients else 0
    ipg = 0
    if buckets.contiguous_gradients:
        ipg = gb * buckets.reduce_bucket_size * (2 if buckets.overlap_comm else 1)
    # allreduce_bucket flattens a bucket's slices into a new tensor: the multi-rank all-reduce path takes slices
    # for every owner, the non-contiguous path separate grads. One rank's slices are one view (no copy).
    flattens = world > 1 and _grad_reduce_kind(buckets) == "all_reduce"
    return ipg + (gb * min(params, buckets.reduce_bucket_size) if flattens else 0)


def _grad_reduce_kind(buckets: ZeroBuckets) -> str:
    """ZeRO-1/2's gradient collective (stage_1_and_2.py average_tensor / reduce_ipg_grads)."""
    if buckets.use_multi_rank_bucket_allreduce or not buckets.reduce_scatter or not buckets.contiguous_gradients:
        return "all_reduce"
    return "reduce_scatter"  # one dist.reduce per owner: a reduce-scatter's bytes, more calls


def engine_comm(params: int, *, mode: str, zero_stage: int, world: int, comm_dtype_bytes: int | None = None,
                buckets: ZeroBuckets | None = None) -> list[Collective]:
    """The collectives one engine runs per optimizer step, with their full payloads. Gradients travel in
    comm_dtype_bytes (else buckets.comm_dtype_bytes, else the grad dtype), params in their dtype. One rank: []."""
    _check(params, mode, zero_stage, world)
    if world == 1:
        return []
    buckets = buckets or ZeroBuckets()
    pb = param_bytes(mode)
    grads = params * (comm_dtype_bytes or buckets.comm_dtype_bytes or pb)
    if mode == "ddp" or zero_stage == 0:
        return [Collective("grad_all_reduce", "all_reduce", grads)]
    if zero_stage == 3:
        # Params are gathered for the forward and again for the backward; the step updates each rank's own slice.
        return [Collective("param_all_gather_forward", "all_gather", params * pb),
                Collective("param_all_gather_backward", "all_gather", params * pb),
                Collective("grad_reduce_scatter", "reduce_scatter" if buckets.reduce_scatter else "all_reduce",
                           grads)]
    kind = _grad_reduce_kind(buckets)
    return [Collective("grad_" + kind, kind, grads), Collective("param_all_gather", "all_gather", params * pb)]


def link_gbps(world: int, gpu: GPUSpec) -> float:
    """The per-direction bandwidth a ring of `world` ranks runs at. Inside one node: NVLink. Across nodes: NCCL
    runs one ring (channel) per NIC, each carrying 1/gpus_per_node of the data, and each ring crosses a node
    boundary through its own GPU's NIC; every GPU is the boundary of one ring and an NVLink hop of the others, so
    the NIC carries 1/gpus_per_node of the traffic: the ring runs at min(NVLink, gpus_per_node x the per-GPU
    network link), the node's aggregate NIC bandwidth (DGX H100: 8 x 50 = 400 GB/s)."""
    if world <= gpu.gpus_per_node:
        field, gbps = "nvlink_gbps", gpu.nvlink_gbps
    else:
        field, gbps = "network_gbps", min(gpu.nvlink_gbps, gpu.gpus_per_node * gpu.network_gbps)
    if getattr(gpu, field) <= 0:
        raise ValueError(f"GPU {gpu.name!r}: {field} is {getattr(gpu, field)}, so collectives over {world} ranks "
                         f"cannot be timed")
    return gbps


def ring_seconds(c: Collective, world: int, gpu: GPUSpec) -> float:
    """Time of one collective in the ring model: an all-reduce sends 2(N-1)/N * S per rank, a reduce-scatter or
    an all-gather (N-1)/N * S, at link_gbps. Approximations: every link at its spec-sheet peak (NCCL reaches less),
    no latency term (small_collectives_seconds has one), NCCL's channels spread evenly over the NICs (link_gbps).
    One rank: 0."""
    if world <= 1:
        return 0.0
    factor = {"all_reduce": 2.0, "reduce_scatter": 1.0, "all_gather": 1.0}.get(c.kind)
    if factor is None:
        raise ValueError(f"Collective.kind: {c.kind!r} is not all_reduce, reduce_scatter or all_gather")
    return factor * (world - 1) / world * c.bytes / (link_gbps(world, gpu) * 1e9)


def small_collectives_seconds(sizes: Iterable[int], world: int, gpu: GPUSpec) -> float:
    """Time of the step's small all-reduces of the given byte sizes (e.g. the latent BatchNorm statistics, the
    1-element "is the loss finite" flag): each costs SMALL_COLLECTIVE_LATENCY_S of its link plus its ring time."""
    if world <= 1:
        return 0.0
    latency = SMALL_COLLECTIVE_LATENCY_S["nvlink" if world <= gpu.gpus_per_node else "network"]
    return sum(latency + ring_seconds(Collective("small", "all_reduce", int(s)), world, gpu) for s in sizes)


def schedule_cost(step_seconds: float, steps: int, world: int) -> dict[str, float]:
    """Wall-clock and GPU time of `steps` optimizer steps of `step_seconds` each on `world` GPUs."""
    if step_seconds < 0:
        raise ValueError(f"step_seconds: {step_seconds!r} is negative")
    if steps < 0:
        raise ValueError(f"steps: {steps!r} is negative")
    if world < 1:
        raise ValueError(f"world: {world!r} is not a GPU count >= 1")
    wall_hours = step_seconds * steps / 3600.0
    return {"wall_hours": wall_hours, "wall_days": wall_hours / 24.0, "gpu_hours": wall_hours * world}


# ---------------------------------------------------------------------------------------------------------------
# Reading a run config's "deepspeed" section
# ---------------------------------------------------------------------------------------------------------------

COMM_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
"""deepspeed.communication_data_type values (config.py get_communication_data_type accepts these three)."""


def _section(d: Mapping, key: str, where: str) -> Mapping:
    value = d.get(key, {})
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}.{key}: expected an object, got {value!r}")
    return value


def _flag(d: Mapping, key: str, where: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}.{key}: {value!r} is not true or false")
    return value


def _count(d: Mapping, key: str, where: str, default: int, minimum: int) -> int:
    value = d.get(key, default)
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and float(value).is_integer()
    if not ok or value < minimum:
        raise ValueError(f"{where}.{key}: {value!r} is not a whole number >= {minimum}")
    return int(value)


def _precision(ds: Mapping) -> str:
    """"bf16", "fp16" or "fp32" from deepspeed.bf16 (or its old name bfloat16) and deepspeed.fp16."""
    bf16_key = "bfloat16" if "bfloat16" in ds and "bf16" not in ds else "bf16"
    bf16 = _flag(_section(ds, bf16_key, "deepspeed"), "enabled", f"deepspeed.{bf16_key}", False)
    fp16 = _flag(_section(ds, "fp16", "deepspeed"), "enabled", "deepspeed.fp16", False)
    if bf16 and fp16:
        raise ValueError(f"deepspeed.{bf16_key}.enabled and deepspeed.fp16.enabled: both true, pick one")
    mode = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    accum = _section(ds, "data_types", "deepspeed").get("grad_accum_dtype")
    if accum is not None and accum != mode:
        raise ValueError(f"deepspeed.data_types.grad_accum_dtype: {accum!r} differs from the {mode} params, "
                         "which this planner does not model")
    return mode


def engine_settings(ds_section: Mapping) -> tuple[int, str, ZeroBuckets]:
    """(zero_stage, mode, buckets) of a run config's "deepspeed" section, with DeepSpeed's defaults for what it
    leaves out (stage 0, buckets of 5e8 elements, overlap_comm on only at stage 3). ValueError naming the key for
    a bad value, and for offloading, which this planner does not model."""
    if not isinstance(ds_section, Mapping):
        raise ValueError(f"deepspeed: expected an object, got {ds_section!r}")
    zo = _section(ds_section, "zero_optimization", "deepspeed")
    where = "deepspeed.zero_optimization"
    stage = zo.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"{where}.stage: {stage!r} is not 0, 1, 2 or 3")
    for key in ("offload_optimizer", "offload_param"):
        device = _section(zo, key, where).get("device", "none")
        if device not in ("none", None):
            raise ValueError(f"{where}.{key}.device: {device!r}; offloading is not modelled by the planner")
    if zo.get("cpu_offload", False):
        raise ValueError(f"{where}.cpu_offload: offloading is not modelled by the planner")
    overlap = zo.get("overlap_comm")  # None: DeepSpeed's dynamic default (zero/config.py overlap_comm_valid)
    comm = ds_section.get("communication_data_type")
    if comm is not None and str(comm).lower() not in COMM_DTYPE_BYTES:
        raise ValueError(f"deepspeed.communication_data_type: {comm!r} is not one of {tuple(COMM_DTYPE_BYTES)}")
    buckets = ZeroBuckets(
        reduce_bucket_size=_count(zo, "reduce_bucket_size", where, DS_DEFAULT_BUCKET, 1),
        allgather_bucket_size=_count(zo, "allgather_bucket_size", where, DS_DEFAULT_BUCKET, 0),
        overlap_comm=stage == 3 if overlap is None else _flag(zo, "overlap_comm", where, False),
        contiguous_gradients=_flag(zo, "contiguous_gradients", where, True),
        reduce_scatter=_flag(zo, "reduce_scatter", where, True),
        use_multi_rank_bucket_allreduce=_flag(zo, "use_multi_rank_bucket_allreduce", where, True),
        comm_dtype_bytes=None if comm is None else COMM_DTYPE_BYTES[str(comm).lower()],
    )
    return int(stage), _precision(ds_section), buckets
