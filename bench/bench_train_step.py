"""The real REPA-E step on one GPU: SiT-XL/2 + f8d4 VAE + DINOv2-B + LPIPS + PatchGAN at per-GPU batch 32,
bf16 autocast (configs/sitxl_repae.json with random weights: the timing does not depend on them).
10 burn-in steps, then 20 timed steps (synchronised); ms/step, img/s, peak memory and the split of the
step into its phases (CUDA events at train_step's marks), once per kernel backend. DeepSpeed engines
when deepspeed is installed, else the same step on plain AdamW (recorded in the row). Never asserts speed."""

import importlib.util
from pathlib import Path

import pytest
import torch

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sitxl_repae.json"
BATCH = 32


@pytest.mark.bench
@pytest.mark.parametrize("kernel_backend", ["triton", "eager"])
def test_bench_train_step(kernel_backend, record, tmp_path):
    if importlib.util.find_spec("lpips") is None:
        pytest.skip("the trainer's LPIPS heads ship with the lpips package: carry its wheel (scripts/gpu_wheels.sh)")
    from repae.train.config import load_config
    from repae.train.draws import synthetic_inputs
    from repae.train.trainer import Trainer

    use_ds = importlib.util.find_spec("deepspeed") is not None
    if use_ds:
        from repae.train.main import init_distributed

        if not torch.distributed.is_initialized():
            init_distributed()
    cfg = load_config(CONFIG, [f"logging.run_dir={tmp_path}", f"schedule.global_batch_size={BATCH}",
                               f"kernel_backend={kernel_backend}", "vae.weights=null", "vae.latents_stats=null",
                               "vae.discriminator_weights=null", "vae.allow_random=true", "encoder.weights=null",
                               "encoder.allow_random=true", "loss.lpips_weights=null", "loss.lpips_allow_random=true",
                               "data.source=demo", "logging.tensorboard=false"])
    trainer = Trainer(cfg, use_deepspeed=use_ds)
    inputs = synthetic_inputs(trainer, seed=0)
    for _ in range(10):
        trainer.run_step(inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    splits: dict[str, float] = {}
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        events = [("start", torch.cuda.Event(enable_timing=True))]
        events[0][1].record()

        def mark(name, events=events):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            events.append((name, ev))

        trainer.run_step(inputs, mark=mark)
        torch.cuda.synchronize()
        for (_, a), (name, b) in zip(events, events[1:]):
            splits[name] = splits.get(name, 0.0) + a.elapsed_time(b) / 20
    stop.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(stop) / 20
    record(op="train_step", case=f"sitxl2_f8d4_b{BATCH}", provider=kernel_backend, mode="step", ms=(ms, ms, ms),
           img_per_s=BATCH / ms * 1e3, peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
           split_ms=splits, engines="deepspeed" if use_ds else "plain")
