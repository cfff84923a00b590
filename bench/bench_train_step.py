"""The real REPA-E step on one GPU: SiT-XL/2 + f8d4 VAE + DINOv2-B + LPIPS + PatchGAN at per-GPU batch 32,
bf16 autocast (configs/sitxl_repae.json with random weights: the timing does not depend on them).
10 burn-in steps, then 20 timed steps (synchronised); ms/step, img/s, peak memory and the split of the
step into its phases (CUDA events at train_step's marks), once per kernel backend. DeepSpeed engines
when deepspeed is installed, else the same step on plain AdamW (recorded in the row).

Beside each measured phase the row holds the run planner's floor for it (repae.plan.report.predicted_phase_ms on
the spec row of this GPU in model/flops.py: GPU_SPECS), and the benchmark prints measured / floor per phase, so
every GPU report shows how far each phase sits from its roofline. Never asserts speed."""

import importlib.util
from pathlib import Path

import pytest
import torch

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sitxl_repae.json"
BATCH = 32


def floor_fields(cfg, device_name: str, backend: str) -> dict:
    """The row fields of the predicted floor: `floor_gpu` (the GPU_SPECS row's name), `predicted_ms` ({phase: ms}),
    `floor_ms` (their sum) and `floor_note` (why the floor is null, else None). A GPU the table lacks, or a planner
    that fails, gives nulls and the reason instead of an error: the measured row is what the GPU minutes bought."""
    from repae.model.flops import gpu_spec_for

    spec = gpu_spec_for(device_name)
    if spec is None:
        return {"floor_gpu": None, "predicted_ms": None, "floor_ms": None,
                "floor_note": f"{device_name!r} matches no row of model/flops.py: GPU_SPECS"}
    try:
        from repae.plan.report import predicted_phase_ms

        predicted = predicted_phase_ms(cfg, spec, batch=BATCH, backend=backend)
    except Exception as err:  # noqa: BLE001 - see the docstring: keep the measurement, say why the floor is missing
        return {"floor_gpu": spec.name, "predicted_ms": None, "floor_ms": None,
                "floor_note": f"predicted_phase_ms failed: {type(err).__name__}: {err}"}
    return {"floor_gpu": spec.name, "predicted_ms": predicted, "floor_ms": sum(predicted.values()), "floor_note": None}


def phase_lines(split_ms: dict, predicted_ms: dict | None) -> list[str]:
    """One line per phase (and the step): measured ms, floor ms and measured / floor; '-' where no floor is known."""
    predicted = predicted_ms or {}
    lines = [f"{'phase':20} {'measured ms':>12} {'floor ms':>10} {'x floor':>8}"]
    phases = list(split_ms) + [p for p in predicted if p not in split_ms]
    rows = [(p, split_ms.get(p), predicted.get(p)) for p in phases]
    rows.append(("step (sum)", sum(split_ms.values()), sum(predicted.values()) if predicted else None))
    for name, measured, floor in rows:
        m = "-" if measured is None else f"{measured:.2f}"
        f = "-" if floor is None else f"{floor:.2f}"
        ratio = f"{measured / floor:.2f}" if measured is not None and floor else "-"
        lines.append(f"{name:20} {m:>12} {f:>10} {ratio:>8}")
    return lines


def _config(kernel_backend: str, run_dir: Path):
    from repae.train.config import load_config

    return load_config(CONFIG, [f"logging.run_dir={run_dir}", f"schedule.global_batch_size={BATCH}",
                                f"kernel_backend={kernel_backend}", "vae.weights=null", "vae.latents_stats=null",
                                "vae.discriminator_weights=null", "vae.allow_random=true", "encoder.weights=null",
                                "encoder.allow_random=true", "loss.lpips_weights=null",
                                "loss.lpips_allow_random=true", "data.source=demo", "logging.tensorboard=false"])


def _timed_steps(trainer, inputs, num_steps: int) -> tuple[float, dict[str, float]]:
    """Mean ms per step and per phase over num_steps synchronised steps (CUDA events at train_step's marks)."""
    splits: dict[str, float] = {}
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(num_steps):
        events = [("start", torch.cuda.Event(enable_timing=True))]
        events[0][1].record()

        def mark(name, events=events):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            events.append((name, ev))

        trainer.run_step(inputs, mark=mark)
        torch.cuda.synchronize()
        for (_, a), (name, b) in zip(events, events[1:]):
            splits[name] = splits.get(name, 0.0) + a.elapsed_time(b) / num_steps
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / num_steps, splits


@pytest.mark.bench
@pytest.mark.parametrize("kernel_backend", ["triton", "eager"])
def test_bench_train_step(kernel_backend, record, tmp_path):
    if importlib.util.find_spec("lpips") is None:
        pytest.skip("the trainer's LPIPS heads ship with the lpips package: carry its wheel (scripts/gpu_wheels.sh)")
    from repae.train.draws import synthetic_inputs
    from repae.train.trainer import Trainer

    use_ds = importlib.util.find_spec("deepspeed") is not None
    if use_ds:
        from repae.train.main import init_distributed

        if not torch.distributed.is_initialized():
            init_distributed()
    cfg = _config(kernel_backend, tmp_path)
    # The floor is traced on fake tensors on the CPU (~3 s); done before the trainer exists, so it touches neither
    # the GPU's memory nor the timed loop.
    floor = floor_fields(cfg, torch.cuda.get_device_name(), kernel_backend)
    trainer = Trainer(cfg, use_deepspeed=use_ds)
    inputs = synthetic_inputs(trainer, seed=0)
    for _ in range(10):
        trainer.run_step(inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms, splits = _timed_steps(trainer, inputs, 20)
    print(f"\ntrain_step {kernel_backend}: {ms:.1f} ms/step; floor on {floor['floor_gpu']}"
          + (f" ({floor['floor_note']})" if floor["floor_note"] else ""))
    print("\n".join(phase_lines(splits, floor["predicted_ms"])))
    record(op="train_step", case=f"sitxl2_f8d4_b{BATCH}", provider=kernel_backend, mode="step", ms=(ms, ms, ms),
           img_per_s=BATCH / ms * 1e3, peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
           split_ms=splits, engines="deepspeed" if use_ds else "plain", **floor)
