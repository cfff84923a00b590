"""What each op of a traced step costs: FLOPs, bytes read and written, its family, the ceiling its FLOPs meet, and
the bytes of live tensors along the way (docs/PLANNING.md#how-the-planner-counts).

    counter = CostCounter(tf32=True)
    with FakeTensorMode(), counter:          # fake tensors: shapes and dtypes, no memory, no arithmetic
        loss = model(x).sum(); counter.mark("forward")
        loss.backward();       counter.mark("backward")
    counter.phases["forward"].records        # one OpRecord per op
    counter.phases["forward"].peak_bytes     # the most bytes of tensors alive at once during the phase

One TorchDispatchMode sees every aten op the step runs (forward, autograd's backward, our custom kernels):
- FLOPs: torch's own formulas (torch.utils.flop_counter) for matmuls, convolutions and attention; a stated
  per-element count for the rest (ELEMENT_FLOPS), which only matters for which ceiling is hit.
- Bytes: every tensor argument read once and every output written once (views and allocations move nothing). For
  eager code this is an upper bound of HBM traffic (nothing stays in cache between ops); for one of our fused
  kernels (a `repae::` op) it is what the kernel moves: its inputs and outputs, once.
- Memory: an output whose storage is new is allocated; it is freed when Python drops the storage (a weakref
  finalizer), so tensors saved for backward stay counted until autograd frees them. Tensors made before the
  counter was entered (parameters, the batch) are not counted: the planner adds them (plan/resources.py).
Holds no model or step code.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from repae.model.flops import op_family

FAMILIES = ("gemm", "conv", "attention", "norm", "reduction", "elementwise", "fused", "optimizer")
"""Op families of the planner's tables: the three FLOP families of model/flops.py, then the memory-bound ones."""

CEILINGS = ("tensor16", "tf32", "fp32")
"""Which FLOP/s ceiling an op meets: 16-bit tensor cores, TF32 tensor cores, or the fp32 CUDA cores."""

ELEMENT_FLOPS = {"norm": 8, "reduction": 1, "elementwise": 1, "fused": 10}
"""FLOPs per element of the largest tensor of an op without a torch formula: LayerNorm/GroupNorm/softmax read
each element a few times (mean, variance, scale, shift), a fused adaLN or REPA-loss kernel about ten; these ops
are memory-bound by orders of magnitude, so the constants never decide a floor."""

_NORM_NAMES = ("layer_norm", "group_norm", "batch_norm", "rms_norm", "softmax")
_REDUCTION_NAMES = ("sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "prod", "all", "any",
                    "argmax", "argmin", "logsumexp")
_WRITE_ONLY = ("copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_")
_FREE_OPS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense",
             "device", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size")

# CPU and GPU fused attention kernels without a torch formula: FLOPs as the matching GPU flash kernel's.
_ATTENTION_ALIASES = {
    "_scaled_dot_product_flash_attention_for_cpu": "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu_backward": "_scaled_dot_product_flash_attention_backward",
}


@dataclass(frozen=True)
class OpRecord:
    """One op of a phase: its aten name, family, FLOPs, bytes read + written and its FLOP/s ceiling."""

    op: str
    family: str
    flops: float
    bytes: float
    ceiling: str


@dataclass
class Phase:
    """The ops of one phase of the step and its memory: live bytes when it began and ended, and the peak."""

    records: list[OpRecord] = field(default_factory=list)
    start_bytes: int = 0
    end_bytes: int = 0
    peak_bytes: int = 0


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes an op touches to read or write t: broadcast (stride-0) dimensions are one element wide."""
    if t.numel() == 0:
        return 0
    n = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0)
    return n * t.element_size()


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _written_arguments(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an in-place or out= op writes: the arguments its schema marks as written (Tensor(a!))."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        value = kwargs.get(a.name) if (a.kwarg_only or i >= len(args)) else args[i]
        out += _tensors(value)
    return out


def classify(name: str, has_formula: bool) -> str:
    """The family of an aten or custom op by its name (`aten.add.Tensor` -> elementwise)."""
    if name.startswith("repae."):
        return "fused"
    if has_formula:
        return op_family(name)
    base = name.split(".")[1] if name.startswith("aten.") else name
    if any(k in base for k in _NORM_NAMES):
        return "norm"
    if base.rstrip("_") in _REDUCTION_NAMES or base.startswith(("linalg_vector_norm", "_foreach_norm")):
        return "reduction"
    return "elementwise"


class CostCounter(TorchDispatchMode):
    """Counts every op between marks (see the module docstring); phases[name] holds the ops before mark(name)."""

    def __init__(self, *, tf32: bool):
        super().__init__()
        self.tf32 = tf32
        self.phases: dict[str, Phase] = {}
        self._open = Phase()
        self.live_bytes = 0
        self._live: dict[int, int] = {}
        self._formulas = FlopCounterMode().flop_registry

    # ---- memory ------------------------------------------------------------------------------------------------
    def _allocated(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, n = st._cdata, st.nbytes()
        self._live[key] = n
        self.live_bytes += n
        self._open.peak_bytes = max(self._open.peak_bytes, self.live_bytes)
        weakref.finalize(st, self._freed, key)

    def _freed(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def mark(self, name: str) -> None:
        """Close the open phase under `name` (ops since the previous mark) and open the next one."""
        if name in self.phases:
            raise ValueError(f"phase {name!r} marked twice")
        self._open.end_bytes = self.live_bytes
        self.phases[name] = self._open
        self._open = Phase(start_bytes=self.live_bytes, peak_bytes=self.live_bytes)

    # ---- cost --------------------------------------------------------------------------------------------------
    def _formula(self, func):
        """torch's FLOP formula for this op (the GPU flash kernel's for the CPU one), None when it has none."""
        packet = func.overloadpacket
        formula = self._formulas.get(packet)
        if formula is None and packet.__name__ in _ATTENTION_ALIASES:
            formula = self._formulas.get(getattr(torch.ops.aten, _ATTENTION_ALIASES[packet.__name__]))
        return formula

    def _ceiling(self, family: str, inputs: list[torch.Tensor]) -> str:
        if family not in ("gemm", "conv", "attention"):
            return "fp32"
        dtype = inputs[0].dtype if inputs else torch.float32
        if dtype in (torch.bfloat16, torch.float16):
            return "tensor16"
        return "tf32" if self.tf32 else "fp32"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        in_keys = {_storage_key(t) for t in inputs}
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        name, base = str(func), func.overloadpacket.__name__
        new = [t for t in outputs if _storage_key(t) not in in_keys and _storage_key(t) not in self._live]
        for t in new:
            self._allocated(t)
        if base in _FREE_OPS or (not new and not func._schema.is_mutable):  # views, metadata, allocations
            return out
        mutated = _written_arguments(func, args, kwargs)
        written = new + [t for t in mutated if not any(t is n for n in new)]
        read = [t for t in inputs if not (base.endswith(_WRITE_ONLY) and any(t is m for m in mutated))]
        nbytes = sum(map(tensor_bytes, read)) + sum(map(tensor_bytes, written))
        formula = self._formula(func)
        family = classify(name, formula is not None)
        if formula is not None:
            flops = float(formula(*args, **kwargs, out_val=out))
        else:
            flops = float(ELEMENT_FLOPS.get(family, 1) * max((t.numel() for t in inputs + outputs), default=0))
        self._open.records.append(OpRecord(name, family, flops, float(nbytes), self._ceiling(family, inputs)))
        return out
