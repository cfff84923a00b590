"""Compile every Triton kernel specialization of this package for a CUDA arch, without a GPU.

    python -m repae.kernels.compile_check                 # sm_90 (H100), table on stdout
    python -m repae.kernels.compile_check --arch 80 --json out.json

The Triton interpreter (how the CPU tests run the kernels) never runs Triton's compiler, so a kernel
can pass every CPU test and still fail to compile, or spill registers, on the GPU. This tool drives
the real launchers (`repae.kernels.adaln`, `repa_loss`, `latent_bn*`, forward and backward) on CPU
tensors at the recipe's shapes and at odd ones, with Triton's JIT switched to compile-only for the
target `sm_<arch>` (a stand-in driver answers the device queries; nothing is launched, the outputs are
left unwritten). Each distinct compiled kernel is reported with what decides its speed on the GPU:
registers per thread, local memory (register spills), shared memory, and the widest and narrowest
global load/store (128-bit accesses are what a bandwidth-bound kernel needs).

It needs Triton's compiler (`ptxas` ships with the triton wheel) and a process where the kernel
modules were not yet imported under TRITON_INTERPRET=1: run it as its own process. Works with triton
3.6 and 3.9.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .recipe import ADALN_BTD, LATENT_BCHW, REPA_BNE

# The recipe's per-GPU shapes plus odd sizes that take the masked paths.
ADALN_SHAPES = [ADALN_BTD, (3, 7, 72 * 3 + 8)]
REPA_SHAPES = [REPA_BNE, (3, 5, 100)]
LATENT_SHAPES = [*LATENT_BCHW.values(), (3, 5, 7, 9)]
H100_SMS = 132


@dataclass
class KernelReport:
    """One compiled specialization and its resource use on the target."""

    kernel: str
    case: str  # the first call that produced it
    num_warps: int
    registers: int  # per thread
    local_bytes: int  # per thread: > 0 means register spills
    shared_bytes: int
    widest_access_bits: int  # of the global loads/stores in the PTX
    narrowest_access_bits: int
    compile_s: float


class _CompileOnlyDriver:
    """Answers Triton's device queries for a GPU that is not there; refuses anything that would run."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def __getattr__(self, name):
        raise RuntimeError(f"compile_check: the stand-in driver cannot {name!r} (nothing runs in a compile check)")


@contextlib.contextmanager
def compile_only(arch: int, sink: list):
    """Within: every Triton launch compiles for sm_<arch> instead of running; (name, kernel, seconds)
    of each launch is appended to `sink`; the launchers accept CPU tensors and see an H100's SM count."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter never compiles)")
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from . import _launch

    for mod in ("adaln_triton", "repa_loss_triton", "latent_bn_triton"):
        name = f"{__package__}.{mod}"
        if name in sys.modules and not any(isinstance(v, JITFunction) for v in vars(sys.modules[name]).values()):
            raise RuntimeError(f"{name} was imported under the Triton interpreter: run compile_check in its own "
                               "process")

    real_run, real_interp, real_sm = JITFunction.run, _launch.interpreter_on, _launch.sm_count

    def run(self, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        sink.append((self.fn.__name__, kernel, time.perf_counter() - start))
        return kernel

    previous_driver = driver._active  # None until something asked for one (no public getter that won't create it)
    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = run
    _launch.interpreter_on = lambda: True  # check_runnable then lets CPU tensors through
    _launch.sm_count = lambda index: H100_SMS
    try:
        yield
    finally:
        JITFunction.run, _launch.interpreter_on, _launch.sm_count = real_run, real_interp, real_sm
        driver._active = previous_driver


def _cases():
    """(name, thunk) pairs: each thunk runs forward and backward of one configuration of one op."""
    from . import adaln, latent_bn, latent_bn_denorm, latent_bn_interp, repa_loss

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16

    def adaln_case(shape, res_dtype, h_dtype, residual, cond_grad, use_xnew, norm="layer", weight=False):
        B, _, D = shape

        def thunk():
            x = torch.zeros(shape, dtype=res_dtype, requires_grad=True)
            cond = torch.zeros(B, 6 * D, dtype=bf16, requires_grad=cond_grad).chunk(6, dim=1)
            y = torch.zeros(shape, dtype=bf16, requires_grad=True) if residual else None
            w = torch.ones(D, dtype=bf16, requires_grad=cond_grad) if weight else None  # trained with the SiT
            x_new, h = adaln(x, cond[0], cond[1], y=y, gate=cond[2] if residual else None, out_dtype=h_dtype,
                             norm=norm, weight=w, backend="triton")
            outs = [h, x_new] if use_xnew and residual else [h]
            torch.autograd.backward(outs, [torch.zeros_like(o) for o in outs])

        return thunk

    def repa_case(shape, a_dtype, b_dtype, grad_b):
        def thunk():
            a = torch.zeros(shape, dtype=a_dtype, requires_grad=True)
            b = torch.ones(shape, dtype=b_dtype, requires_grad=grad_b)
            repa_loss(a, b, backend="triton").backward()

        return thunk

    def bn_case(shape, dtype, mode, path, hook):
        B, C = shape[:2]

        def thunk():
            z = torch.zeros(shape, dtype=dtype, requires_grad=True)
            stats = {"running_mean": torch.zeros(C), "running_var": torch.ones(C),
                     "num_batches_tracked": torch.zeros((), dtype=torch.long)}
            hook_fn = (lambda s: None) if hook else None
            kw = {"use_batch_stats": mode == "train", "stats_hook": hook_fn, "backend": "triton"}
            if path is None:
                out = latent_bn(z, **stats, **kw)
                out.backward(torch.zeros_like(out))
                x = torch.zeros(shape, dtype=dtype, requires_grad=True)
                latent_bn_denorm(x, stats["running_mean"], stats["running_var"], backend="triton").sum().backward()
            else:
                noise = torch.zeros(shape, dtype=dtype, requires_grad=True)
                xt, vt = latent_bn_interp(z, torch.full((B,), 0.5), noise, **stats, path=path, **kw)
                torch.autograd.backward([xt, vt], [torch.zeros_like(xt), torch.zeros_like(vt)])

        return thunk

    cases = []
    for shape in ADALN_SHAPES:
        for res_dtype, h_dtype in ((f32, bf16), (bf16, bf16), (f16, f16), (f32, f32)):
            for residual in (False, True):
                for cond_grad in (False, True):
                    for use_xnew in ((False, True) if residual else (False,)):
                        name = (f"adaln {list(shape)} res={res_dtype} h={h_dtype} residual={residual} "
                                f"cond_grad={cond_grad} dxnew={use_xnew}")
                        cases.append((name, adaln_case(shape, res_dtype, h_dtype, residual, cond_grad, use_xnew)))
        # the RMSNorm and affine-weight specialisations, in the mixed-precision recipe's dtypes: all of them at
        # the recipe's shape, the fullest one (most live registers) at the odd shape
        variants = [(n, w, r, c) for n, w in (("rms", False), ("rms", True), ("layer", True)) for r in (False, True)
                    for c in (False, True)] if shape == ADALN_BTD else [("rms", True, True, True)]
        for norm, weight, residual, cond_grad in variants:
            name = (f"adaln {list(shape)} norm={norm} weight={weight} res={f32} h={bf16} residual={residual} "
                    f"cond_grad={cond_grad} dxnew={residual}")
            cases.append((name, adaln_case(shape, f32, bf16, residual, cond_grad, residual, norm, weight)))
    for shape in REPA_SHAPES:
        for a_dtype, b_dtype in ((bf16, f32), (f32, f32), (bf16, bf16)):
            for grad_b in (False, True):
                cases.append((f"repa_loss {list(shape)} {a_dtype}/{b_dtype} grad_zs={grad_b}",
                              repa_case(shape, a_dtype, b_dtype, grad_b)))
    for shape in LATENT_SHAPES:
        for dtype in (f32, bf16):
            for mode in ("train", "eval"):
                for path in (None, "linear", "cosine"):
                    for hook in ((False, True) if mode == "train" else (False,)):
                        cases.append((f"latent_bn {list(shape)} {dtype} {mode} path={path} hook={hook}",
                                      bn_case(shape, dtype, mode, path, hook)))
    return cases


def _access_bits(ptx: str) -> tuple[int, int]:
    """(widest, narrowest) bits per thread of the global loads and stores in PTX."""
    bits = []
    for m in re.finditer(r"\b(?:ld|st)\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.([bfsu])(\d+)\b", ptx):
        bits.append(int(m.group(1) or 1) * int(m.group(3)))
    return (max(bits), min(bits)) if bits else (0, 0)


def _resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers, local bytes, shared bytes) per `cuobjdump -res-usage` of the bundled CUDA tools."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|LOCAL|SHARED):(\d+)", text))
    return int(usage["REG"]), int(usage["LOCAL"]), int(usage["SHARED"])


def check(arch: int = 90, progress: bool = True) -> list[KernelReport]:
    """Compile every case for sm_<arch>; one KernelReport per distinct compiled kernel."""
    reports, seen = [], set()
    cases = _cases()
    for i, (name, thunk) in enumerate(cases):
        sink = []
        with compile_only(arch, sink):
            thunk()
        for kname, kernel, seconds in sink:
            key = (kname, kernel.metadata.hash)
            if key in seen:
                continue
            seen.add(key)
            regs, local, shared = _resources(kernel.asm["cubin"])
            wide, narrow = _access_bits(kernel.asm["ptx"])
            reports.append(KernelReport(kname, name, kernel.metadata.num_warps, regs, local,
                                        max(shared, kernel.metadata.shared), wide, narrow, round(seconds, 2)))
        if progress:
            print(f"\r[{i + 1}/{len(cases)}] {len(reports)} kernels compiled", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return reports


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100, 80 = A100)")
    parser.add_argument("--json", type=Path, help="write the reports here as a JSON list")
    args = parser.parse_args(argv)
    import triton

    reports = check(args.arch)
    print(f"# triton {triton.__version__}, sm_{args.arch}: {len(reports)} kernels")
    print(f"{'kernel':<28} {'warps':>5} {'regs':>5} {'local':>5} {'shared':>7} {'access bits':>11}  first case")
    for r in reports:
        print(f"{r.kernel:<28} {r.num_warps:>5} {r.registers:>5} {r.local_bytes:>5} {r.shared_bytes:>7} "
              f"{r.narrowest_access_bits:>4}-{r.widest_access_bits:<6}  {r.case}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=1))
    spills = [r for r in reports if r.local_bytes]
    if spills:
        print(f"register spills in {len(spills)} kernels: " + ", ".join(f"{r.kernel} ({r.case})" for r in spills))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
