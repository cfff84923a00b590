"""FLOPs counted on the meta device, and the tensor-core peaks that MFU is measured against.

    flops = count_flops(lambda: sit(z, y, t, noise))        # build the model and inputs under torch.device("meta")
    peak = peak_bf16_tflops(torch.cuda.get_device_name())    # 989.0 on an H100 / H200, None when unknown
    by_family = flops_by_family(counter.get_flop_counts()["Global"])   # {"gemm": ..., "conv": ..., "attention": ...}

Used by the trainer's MFU estimate, the run planner (plan/: GPU_SPECS) and bench/. Holds no model or
timing code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class GPUSpec:
    """A GPU's spec-sheet ceilings (dense, no sparsity), the planner's roofline."""

    name: str
    match: str
    """Substring of torch.cuda.get_device_name() that identifies the part."""
    bf16_tflops: float
    """Dense bf16 tensor-core peak, TFLOP/s."""
    hbm_gbps: float
    """Nominal HBM bandwidth, GB/s (a device-to-device copy reaches less: bench/ceilings.py measures it)."""
    memory_gb: float
    """HBM capacity as the data sheet states it, GB."""
    tf32_tflops: float
    """Dense TF32 tensor-core peak, TFLOP/s (the data sheets print it with sparsity: half of that)."""
    fp32_tflops: float
    """FP32 peak of the CUDA cores (no tensor cores), TFLOP/s: the ceiling of elementwise fp32 work."""
    nvlink_gbps: float
    """NVLink bandwidth per GPU and per direction, GB/s (half the data sheet's bidirectional total)."""
    network_gbps: float
    """Bandwidth per GPU and per direction to other nodes, GB/s: the reference system's compute NIC per GPU."""
    gpus_per_node: int
    """GPUs that share one NVLink domain in the reference system (DGX/HGX: 8)."""


GPU_SPECS = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM column: bf16 1,979 TFLOPS with sparsity (989 dense), 3.35 TB/s, 80 GB;
    # TF32 989 with sparsity (494.5 dense), FP32 67 TFLOPS, NVLink 900 GB/s (450 each way). DGX H100 datasheet: 8
    # single-port ConnectX-7 at 400 Gb/s for the compute fabric, one per GPU = 50 GB/s each way.
    "h100": GPUSpec("H100 SXM 80GB", "H100", 989.0, 3350.0, 80.0, 494.5, 67.0, 450.0, 50.0, 8),
    # NVIDIA H100 Tensor Core GPU datasheet, H100 NVL column: bf16 1,671 TFLOPS with sparsity, TF32 835, FP32 60,
    # 94 GB at 3.9 TB/s, NVLink bridge 600 GB/s (300 each way) between a pair of cards. The NIC per GPU is not on the
    # sheet: one 400 Gb/s port per GPU assumed, as in a DGX.
    "h100-nvl": GPUSpec("H100 NVL 94GB", "H100 NVL", 835.5, 3900.0, 94.0, 417.5, 60.0, 300.0, 50.0, 2),
    # NVIDIA H100 PCIe datasheet (80 GB): bf16 1,513 TFLOPS with sparsity, TF32 756, FP32 51, HBM2e 2 TB/s, NVLink
    # bridge 600 GB/s between a pair of cards; one 400 Gb/s NIC per GPU assumed.
    "h100-pcie": GPUSpec("H100 PCIe 80GB", "H100 PCIe", 756.5, 2000.0, 80.0, 378.0, 51.0, 300.0, 50.0, 2),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM column: bf16 1,979 TFLOPS with sparsity, 4.8 TB/s, 141 GB; TF32 989
    # with sparsity, FP32 67 TFLOPS, NVLink 900 GB/s (the H100's compute and links). DGX H200: 8 ConnectX-7 at 400 Gb/s.
    "h200": GPUSpec("H200 SXM 141GB", "H200", 989.0, 4800.0, 141.0, 494.5, 67.0, 450.0, 50.0, 8),
    # NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column: bf16 312 TFLOPS (624 with sparsity), 2,039 GB/s; TF32 156
    # (312 with sparsity), FP32 19.5 TFLOPS, NVLink 600 GB/s (300 each way). DGX A100 datasheet: 8 single-port
    # ConnectX-6 HDR InfiniBand at 200 Gb/s for the compute fabric, one per GPU = 25 GB/s each way.
    "a100": GPUSpec("A100 SXM 80GB", "A100", 312.0, 2039.0, 80.0, 156.0, 19.5, 300.0, 25.0, 8),
    # NVIDIA DGX B200 datasheet, per GPU (1/8 of the system): 1,440 GB and 64 TB/s in all; 8 single-port ConnectX-7
    # at 400 Gb/s, one per GPU = 50 GB/s each way. HGX B200 per-GPU figures: bf16 4.5 PFLOPS with sparsity (2.25 dense),
    # TF32 2.2 PFLOPS with sparsity (1.1 dense), FP32 80 TFLOPS, fifth-generation NVLink 1.8 TB/s (900 GB/s each way).
    "b200": GPUSpec("B200 (HGX/DGX B200)", "B200", 2250.0, 8000.0, 180.0, 1100.0, 80.0, 900.0, 50.0, 8),
}
"""Spec-sheet ceilings by the planner's --gpu name (python -m repae.plan)."""

FLOP_FAMILIES = ("gemm", "conv", "attention")


def gpu_spec_for(device_name: str) -> GPUSpec | None:
    """The GPU_SPECS row of a torch.cuda.get_device_name(): the most specific `match` found in the name ("NVIDIA
    H100 PCIe" is the PCIe row, not the SXM one), None when no row matches."""
    rows = [s for s in GPU_SPECS.values() if s.match in device_name]
    return max(rows, key=lambda s: len(s.match), default=None)


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the named GPU, None when the table does not know it (no MFU is reported then)."""
    spec = gpu_spec_for(device_name)
    return spec.bf16_tflops if spec is not None else None


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of fn (matmuls, convolutions, attention) as torch's FlopCounterMode counts them; run it
    on meta tensors so that nothing is computed."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def op_family(op: object) -> str:
    """The family of an op FlopCounterMode counts: conv (aten.convolution and its backward), attention (the SDPA
    kernels, and bmm: in this repository's models only attention multiplies batched matrices), else gemm."""
    name = str(op)
    if "convolution" in name:
        return "conv"
    if "attention" in name or "bmm" in name:
        return "attention"
    return "gemm"


def flops_by_family(counts: Mapping[object, int]) -> dict[str, int]:
    """{op: flops} (FlopCounterMode.get_flop_counts()["Global"]) summed per FLOP_FAMILIES entry."""
    out = dict.fromkeys(FLOP_FAMILIES, 0)
    for op, n in counts.items():
        out[op_family(op)] += n
    return out
