"""Kernel self-check and quick benchmark on whatever device is present: `python -m repae.kernels.selfcheck`.

For each fused op: forward + backward through the Triton backend and the eager reference at a SiT-like
shape, each compared with the float64 oracle by the test suite's three-way rule, then a short timing
of both (and of torch.compile on a GPU). On a CPU the kernels run under the Triton interpreter: the
parity check is real, the timings only show the interpreter's cost. Exit status 1 on any mismatch.
Full benchmarks: `pytest bench/` on a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():  # read when the Triton kernels are defined (on the first call)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import repae.kernels as K  # noqa: E402


def _grads(outs, leaves, seed=0):
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    douts = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, leaves, douts)
    return [o.detach().double() for o in outs] + [x.double() for x in grads]


def _run(fn, inputs, upcast=False, **kw):
    leaves = {k: (v.detach().double() if upcast else v.detach().clone()).requires_grad_(v.requires_grad)
              for k, v in inputs.items()}
    outs = fn(**leaves, **kw)
    return _grads(outs, [v for v in leaves.values() if v.requires_grad])


def _time(fn, reps: int) -> float:
    """Mean seconds per call after one warm-up call."""
    fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=None, help="timed calls per provider (default 20 GPU, 2 CPU)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    reps = args.reps or (20 if cuda else 2)
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter: parity is real, timings are not)"
    print(f"repae kernel self-check on {name}, torch {torch.__version__}")
    B = 32 if cuda else 2
    cases = {
        "adaln [B,256,1152] fp32 residual, bf16 h": (
            K.adaln, K.adaln_ref, K.make_adaln_inputs(B, 256 if cuda else 16, 1152, torch.bfloat16,
                                                      residual_dtype=torch.float32, device=device),
            dict(out_dtype=torch.bfloat16), 5e-2),
        "repa_loss [B,256,768] bf16 vs fp32": (
            K.repa_loss, K.repa_loss_ref, K.make_repa_inputs(B, 256 if cuda else 16, 768, torch.bfloat16,
                                                             target_dtype=torch.float32, device=device),
            {}, 5e-3),
        "latent_bn_interp [B,4,32,32] fp32, batch stats": (
            K.latent_bn_interp, K.latent_bn_interp_ref,
            {k: v for k, v in K.make_latent_bn_inputs(B, 4, 32, 32, device=device).items()
             if k in ("z", "t", "noise")}, None, 1e-4),
    }
    failures = 0
    for label, (op, ref, inputs, kw, atol) in cases.items():
        if kw is None:  # latent BN: fresh running statistics per call
            def stats():
                s = K.make_latent_bn_inputs(B, 4, 32, 32, device=device)
                return dict(running_mean=s["running_mean"], running_var=s["running_var"])
            kw_op = lambda: dict(use_batch_stats=True, **stats())  # noqa: E731
            kw_ref = lambda: dict(training=True, **stats())  # noqa: E731
        else:
            kw_op = kw_ref = (lambda kw=kw: kw)
        got = _run(op, inputs, backend="triton", **kw_op())
        eager = _run(op, inputs, backend="eager", **kw_op())
        oracle = _run(ref, inputs, upcast=True, **{k: v for k, v in kw_ref().items() if k != "out_dtype"})
        worst = 0.0
        ok = True
        for g, e, o in zip(got, eager, oracle):
            err, bound = (g - o).abs().max().item(), 2 * (e - o).abs().max().item() + atol
            ok &= bool(torch.isfinite(g).all()) and err <= bound
            worst = max(worst, err)
        failures += not ok
        timings = []
        for provider in ("triton", "eager") + (("compile",) if cuda else ()):
            leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
            if provider == "compile":
                f = torch.compile(lambda **a: ref(**a, **kw_ref()))
            else:
                f = (lambda p: lambda **a: op(**a, backend=p, **kw_op()))(provider)

            def step(f=f, leaves=leaves):
                outs = f(**leaves)
                outs = outs if isinstance(outs, tuple) else (outs,)
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

            timings.append(f"{provider} {_time(step, reps) * 1e3:8.2f} ms")
        print(f"  {'OK  ' if ok else 'FAIL'} {label:48} max err {worst:.2e} | fwd+bwd: " + ", ".join(timings))
    print("all kernels match their references" if not failures else f"{failures} kernel(s) FAILED parity")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
