"""World-size study: does a run at world size 2 follow the run at world size 1, and if not, why. The last results
and what they show: docs/METHOD.md#world-size-independence (tables: docs/world_size_study.md).

    .venv/bin/python scripts/world_size_study.py                       # all runs below, 40 steps, tiny CPU config
    .venv/bin/python scripts/world_size_study.py --runs fp32_w1 fp32_w2_sync --steps 10

Each run trains configs/tiny_cpu.json (global batch 8, demo data, eager kernels) under torchrun + gloo on the CPU
for --steps steps, calling Trainer.run_step itself (no checkpoints, samples or logs). Rank 0 records, per step,
the losses averaged over the ranks (what log.jsonl would show), the grad norm of each engine (DeepSpeed's global
norm, the one clipping uses), the skipped flags, a SHA-256 of the global batch (images, labels and all random
draws, gathered from every rank), and at the steps in SAVE_STEPS the weights of the SiT, VAE and discriminator,
the discriminator BN and latent BN running statistics and the EMA. The parent then compares pairs of runs.

Runs (name = precision, world size, discriminator BN synced or not, perturbation):
    fp32_w1, fp32_w2, fp32_w2_sync   schedule.precision=fp32; w2 with and without loss.sync_discriminator_bn
    fp32_w1_ulp                      fp32_w1 with every initial weight moved by 1 ulp (random sign, seeded): the
                                     growth of a difference that is pure rounding noise, for comparison
    fp32_w1_plain, fp32_w2_sync_plain  AllReduceEngine instead of DeepSpeed: the control of the fp64 runs
    fp64_w1, fp64_w2, fp64_w2_sync   the same runs in float64 (see enable_fp64: default dtype float64, the code's
                                     explicit fp32 casts turned into fp64) with AllReduceEngine (DeepSpeed keeps an
                                     fp32 master copy under ZeRO 1/2 and refuses fp64 gradients at stage 0):
                                     rounding noise drops by ~1e9, so a gap that stays is a per-rank quantity,
                                     one that drops with it is fp noise
    bf16_w1, bf16_w2_sync            the config's own precision (bf16 autocast, fp32 weights)

Reported per pair and step: difference of each loss relative to its mean |value| over run a, |a - b| / mean|a|;
of the weights of each model ||a - b|| / ||a - a_0|| (relative to how far run a has moved since step 0, since the
initial weights dominate ||a||); of the BN running statistics ||a - b|| / ||a||; of the EMA like the weights. The
raw numbers go to <out>/results.json, the table to stdout and <out>/table.md. Run states are written under
<out>/states (about 0.6 GB per fp32 run at 40 steps) and deleted at the end unless --keep-states.

This file is an experiment: it monkeypatches torch for the fp64 runs and deepspeed.initialize for the ulp run,
in its worker processes only, and must not be imported by the package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from repae.train.engine import PlainEngine

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.json"
SAVE_STEPS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 35, 40)
RUNS = {  # name: (precision, world size, sync_discriminator_bn, ulp perturbation, engine)
    "fp32_w1": ("fp32", 1, False, False, "deepspeed"),
    "fp32_w2": ("fp32", 2, False, False, "deepspeed"),
    "fp32_w2_sync": ("fp32", 2, True, False, "deepspeed"),
    "fp32_w1_ulp": ("fp32", 1, False, True, "deepspeed"),
    "fp32_w1_plain": ("fp32", 1, False, False, "plain"),
    "fp32_w2_sync_plain": ("fp32", 2, True, False, "plain"),
    "fp64_w1": ("fp64", 1, False, False, "plain"),
    "fp64_w2": ("fp64", 2, False, False, "plain"),
    "fp64_w2_sync": ("fp64", 2, True, False, "plain"),
    "bf16_w1": ("bf16", 1, False, False, "deepspeed"),
    "bf16_w2_sync": ("bf16", 2, True, False, "deepspeed"),
}
PAIRS = [("fp32_w1", "fp32_w2"), ("fp32_w1", "fp32_w2_sync"), ("fp32_w1", "fp32_w1_ulp"),
         ("fp32_w1_plain", "fp32_w2_sync_plain"), ("fp64_w1", "fp64_w2"), ("fp64_w1", "fp64_w2_sync"),
         ("bf16_w1", "bf16_w2_sync")]
GROUPS = ("sit", "vae", "disc", "ema", "latent_bn", "disc_bn")
MOVED = ("sit", "vae", "disc", "ema")  # compared relative to the distance moved since step 0
TABLE_STEPS = (1, 2, 3, 5, 10, 20, 30, 40)


# ---------------------------------------------------------------------------------------------------
# Worker (one process per rank, under torchrun)
# ---------------------------------------------------------------------------------------------------


class _Float64Torch:
    """`torch` as seen by the package's modules in an fp64 run: torch.float32 means float64, the rest is torch."""

    float32 = torch.float64
    float = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def enable_fp64() -> None:
    """Make the whole step float64: default dtype (parameters, buffers, random draws), Tensor.float() and the
    modules' explicit torch.float32 (LPIPS, DINOv2 preprocessing, timestep table, loss constants, the kernels'
    dtype checks) become fp64.
    The eager latent-BN and REPA-loss references take their fp64 path on fp64 inputs."""
    torch.set_default_dtype(torch.float64)
    torch.Tensor.float = lambda self, memory_format=torch.preserve_format: self.double(memory_format=memory_format)
    import importlib

    proxy = _Float64Torch()
    for name in ("repae.model.lpips", "repae.model.encoders", "repae.model.sit", "repae.model.vae",
                 "repae.model.losses", "repae.train.step", "repae.train.sync_bn", "repae.train.trainer",
                 "repae.kernels.functional", "repae.kernels._checks"):
        mod = importlib.import_module(name)
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy


def perturb_initial_weights_by_one_ulp(seed: int = 1234) -> None:
    """Wrap deepspeed.initialize so that every parameter moves by one ulp (random sign) before its engine (and
    ZeRO's master copy) is built. The EMA, copied earlier, keeps the unperturbed weights."""
    import deepspeed

    real = deepspeed.initialize
    gen = torch.Generator().manual_seed(seed)

    def initialize(*args, model, **kwargs):
        with torch.no_grad():
            for p in model.parameters():
                up = torch.rand(p.shape, generator=gen) < 0.5
                p.copy_(torch.where(up, torch.nextafter(p, torch.full_like(p, math.inf)),
                                    torch.nextafter(p, torch.full_like(p, -math.inf))))
        return real(*args, model=model, **kwargs)

    deepspeed.initialize = initialize


class AllReduceEngine(PlainEngine):
    """The trainer's PlainEngine plus DDP's gradient averaging: one flat all-reduce (sum / world size) in the
    gradients' own dtype before PlainEngine.step's global-norm clipping and AdamW step. The fp64 runs use it."""

    def step(self) -> None:
        import torch.distributed as dist

        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if dist.get_world_size() > 1 and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)])
        super().step()


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.get_default_dtype()) for t in tensors])


def model_state(trainer) -> dict[str, torch.Tensor]:
    """Flat vectors of GROUPS (rank 0; under ZeRO 1/2 every rank holds the full parameters)."""
    sit, vae, disc = (trainer.engines[k].module for k in ("sit", "vae", "disc"))
    ema = trainer.ema.module
    stats = lambda m: [b for n, b in m.named_buffers() if "running" in n]  # noqa: E731
    return {"sit": _flat(sit.parameters()), "vae": _flat(vae.parameters()), "disc": _flat(disc.parameters()),
            "ema": _flat(list(ema.parameters())), "latent_bn": _flat(stats(sit.bn)), "disc_bn": _flat(stats(disc))}


def global_batch_digest(inputs) -> dict[str, str]:
    """SHA-256 of each part of the global batch (images, labels, draws), gathered from every rank in rank order."""
    import torch.distributed as dist

    local = {k: getattr(inputs, k).cpu().contiguous().numpy() for k in
             ("images", "labels", "t", "noise", "drop_mask", "posterior_noise")}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    digests = {}
    for key in local:
        h = hashlib.sha256()
        for part in parts:
            h.update(part[key].tobytes())
        digests[key] = h.hexdigest()
    return digests


def worker(args) -> None:
    precision = args.precision
    if precision == "fp64":
        enable_fp64()
    if args.ulp:
        perturb_initial_weights_by_one_ulp()
    from repae.train.main import init_distributed

    init_distributed()
    import torch.distributed as dist

    from repae.train.config import load_config
    from repae.train.trainer import Trainer

    overrides = [f"logging.run_dir={args.out}/run", "logging.sample_every=0", "logging.tensorboard=false",
                 "data.num_workers=0", f"schedule.precision={'bf16' if precision == 'bf16' else 'fp32'}",
                 f"loss.sync_discriminator_bn={'true' if args.sync else 'false'}", "kernel_backend=eager",
                 f"schedule.max_steps={args.steps}"]
    trainer = Trainer(load_config(CONFIG, overrides), use_deepspeed=args.engine == "deepspeed")
    if args.engine == "plain":
        for engine in trainer.engines.values():
            engine.__class__ = AllReduceEngine  # built as PlainEngine (same fields)
    rank, world = trainer.rank, trainer.world
    states = Path(args.out) / "states"
    if rank == 0:
        states.mkdir(parents=True, exist_ok=True)
        torch.save(model_state(trainer), states / "step000.pt")
    records, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        inputs = trainer.next_inputs()
        digest = global_batch_digest(inputs)
        logs = trainer.run_step(inputs)
        keys = sorted(logs)
        vec = torch.stack([logs[k].detach().to(torch.float64) for k in keys])
        dist.all_reduce(vec)
        values = dict(zip(keys, (vec / world).tolist()))
        norms = {}
        for name, engine in trainer.engines.items():
            norm = engine.grad_norm()
            norms[name] = None if norm is None else float(norm)
        if rank == 0:
            records.append({"step": step, "logs": values, "grad_norm": norms, "batch_sha256": digest})
            if step in SAVE_STEPS or step == args.steps:
                torch.save(model_state(trainer), states / f"step{step:03d}.pt")
            print(f"[{args.name}] step {step} sit/loss {values['sit/loss']:.6f} ({time.time() - t0:.0f} s)", flush=True)
    if rank == 0:
        with open(Path(args.out) / "records.json", "w") as f:
            json.dump({"name": args.name, "precision": precision, "world_size": world, "sync": args.sync,
                       "ulp": args.ulp, "records": records}, f)


# ---------------------------------------------------------------------------------------------------
# Parent: launch the runs, compare the pairs
# ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(name: str, out: Path, steps: int) -> None:
    precision, nproc, sync, ulp, engine = RUNS[name]
    run_out = out / name
    if run_out.exists():
        shutil.rmtree(run_out)
    run_out.mkdir(parents=True)
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), __file__, "--worker", "--name", name, "--precision", precision, "--out", str(run_out),
           "--steps", str(steps), "--engine", engine] + (["--sync"] if sync else []) + (["--ulp"] if ulp else [])
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (run_out / "stdout.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"run {name} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"run {name}: {steps} steps in {time.time() - t0:.0f} s", flush=True)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-30)


def compare(out: Path, a: str, b: str) -> dict:
    """Per-step relative differences between runs a and b (see the module docstring)."""
    ra, rb = (json.loads((out / n / "records.json").read_text())["records"] for n in (a, b))
    # A loss is compared relative to its mean |value| over run a (vae/loss, with the -align term, crosses 0).
    scale = {k: sum(abs(x["logs"][k]) for x in ra) / len(ra) for k in ra[0]["logs"] if k.endswith("loss")}
    rows = []
    for xa, xb in zip(ra, rb):
        loss_keys = [k for k in scale if scale[k] > 0]  # the LeCam term is 0 at weight 0
        differ = [k for k in xa["batch_sha256"] if xa["batch_sha256"][k] != xb["batch_sha256"][k]]
        row = {"step": xa["step"], "batch_differs": differ,
               "skipped": sum(xa["logs"][k] + xb["logs"][k] for k in xa["logs"] if k.endswith("skipped")),
               "loss": {k: abs(xa["logs"][k] - xb["logs"][k]) / scale[k] for k in loss_keys},
               "other_logs": {k: _rel(xa["logs"][k], xb["logs"][k]) for k in xa["logs"] if k not in loss_keys},
               "grad_norm": {k: _rel(xa["grad_norm"][k], xb["grad_norm"][k]) for k in xa["grad_norm"]
                             if xa["grad_norm"][k] is not None and xb["grad_norm"][k] is not None}}
        rows.append(row)
    s0 = torch.load(out / a / "states" / "step000.pt", weights_only=True)
    s0b = torch.load(out / b / "states" / "step000.pt", weights_only=True)
    init = {g: float((s0[g] - s0b[g]).norm() / s0[g].norm().clamp_min(1e-300)) for g in GROUPS}
    for row in rows:
        fa, fb = out / a / "states" / f"step{row['step']:03d}.pt", out / b / "states" / f"step{row['step']:03d}.pt"
        if not (fa.exists() and fb.exists()):
            continue
        sa, sb = torch.load(fa, weights_only=True), torch.load(fb, weights_only=True)
        row["state"] = {}
        for g in GROUPS:
            diff = (sa[g] - sb[g]).to(torch.float64)
            ref = (sa[g] - s0[g]) if g in MOVED else sa[g]
            row["state"][g] = float(diff.norm() / ref.to(torch.float64).norm().clamp_min(1e-300))
        for g in ("sit", "vae", "disc"):  # Adam's early steps are ~ lr * sign(g): elements that flipped
            row["state"][f"{g}_frac_gt_lr"] = float(((sa[g] - sb[g]).abs() > 1e-4).double().mean())
    return {"a": a, "b": b, "initial_state_rel": init, "rows": rows}


def doubling_steps(rows: list[dict], key: str, first: int = 5) -> float | None:
    """Steps per doubling of the SiT weight difference, least squares on log2 over the saved steps >= first."""
    pts = [(r["step"], math.log2(r["state"][key])) for r in rows if "state" in r and r["step"] >= first
           and r["state"][key] > 0]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return 1.0 / slope if slope > 0 else math.inf


def table(result: dict) -> str:
    lines = [f"### {result['a']} vs {result['b']}", "",
             "| step | same batch | max loss | vae/loss | disc/loss | sit/loss | grad norm max | SiT w | VAE w | D w "
             "| latent BN | D BN | EMA |", "|" + "---|" * 13]
    for row in result["rows"]:
        if row["step"] not in TABLE_STEPS:
            continue
        st = row.get("state", {})
        same = "yes" if not row["batch_differs"] else "NO: " + ",".join(row["batch_differs"])
        cells = [str(row["step"]), same, f"{max(row['loss'].values()):.1e}",
                 f"{row['loss']['vae/loss']:.1e}", f"{row['loss']['disc/discriminator_loss']:.1e}",
                 f"{row['loss']['sit/loss']:.1e}", f"{max(row['grad_norm'].values(), default=0.0):.1e}"]
        cells += [f"{st[g]:.1e}" if g in st else "-" for g in ("sit", "vae", "disc", "latent_bn", "disc_bn", "ema")]
        lines.append("| " + " | ".join(cells) + " |")
    d = doubling_steps(result["rows"], "sit")
    lines += ["", f"SiT weight difference: doubling every {d:.1f} steps (fit over steps >= 5)" if d else "", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--sync", action="store_true")
    parser.add_argument("--ulp", action="store_true")
    parser.add_argument("--engine", default="deepspeed", choices=["deepspeed", "plain"])
    parser.add_argument("--out", default=str(ROOT / "exps" / "world_size_study"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--reuse", action="store_true", help="compare runs already in --out, launch the missing")
    parser.add_argument("--keep-states", action="store_true")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    out = Path(args.out)
    for name in args.runs:
        if not (args.reuse and (out / name / "records.json").exists() and (out / name / "states").exists()):
            launch(name, out, args.steps)
    done = [n for n in RUNS if (out / n / "records.json").exists() and (out / n / "states").exists()]
    results = [compare(out, a, b) for a, b in PAIRS if a in done and b in done]
    text = f"World-size study, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {CONFIG.name}\n\n"
    text += "\n".join(table(r) for r in results)
    print(text)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if not args.keep_states:
        for name in done:
            shutil.rmtree(out / name / "states", ignore_errors=True)


if __name__ == "__main__":
    main()
