"""The run planner (first slice): FLOPs per phase of one REPA-E step, counted on the meta device at full size,
and the compute floor of each phase on a GPU of the spec table (model/flops.py: GPU_SPECS).

    python -m repae.train.plan --config configs/sitxl_repae.json [--gpu h100|h200|a100|b200|custom]
                               [--gpus N] [--set key=value ...] [--json]

The configured SiT, VAE, discriminator, LPIPS and DINOv2 are built on the meta device (no memory, no weights
read) and the real `train_step` of train/step.py runs once on meta tensors under torch's FlopCounterMode; its
`mark` callback splits the count into the step's phases, so the planner cannot drift from the step. The DINOv2
targets are counted apart on the preprocessed 224-px input (its uint8 preprocessing switches autocast off, which
the meta device does not support) and handed to the step as a feature cache would.

Counted: matmuls, convolutions and attention, forward and backward, split by family (gemm, conv, attention).
Not counted yet: elementwise work (norms, activations, the optimizers' updates, the EMA: 0 FLOPs here), bytes
moved, peak memory per rank and communication; those are the next slices of the planner. Holds no training code.
"""

# B batch (per rank), R image side

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict, dataclass, replace
from unittest import mock

import torch
from torch import nn

from repae.model.discriminator import build_discriminator
from repae.model.encoders import DINOv2Encoder, dinov2_input_size, parse_enc_type
from repae.model.flops import FLOP_FAMILIES, GPU_SPECS, GPUSpec, flops_by_family
from repae.model.losses import LeCamEMA
from repae.model.lpips import LPIPS
from repae.model.sit import SiT
from repae.model.vae import build_vae

from repae.train import step as step_module
from repae.train.config import TrainConfig, load_config
from repae.train.ema import EMA
from repae.train.step import StepInputs, StepModels, StepSettings

PHASES = ("dinov2", "vae_forward", "lpips_gan_loss", "align_forward", "vae_backward_step", "disc", "sit_forward",
          "sit_backward_step", "ema")
"""The phases of train_step, by the names it passes to `mark` (the train-step benchmark uses the same)."""

PLAN_BATCH = 2
"""Images per counted step (the latent and discriminator BatchNorms need more than one); counts are per image."""


@dataclass
class _MetaEngine:
    """The engine protocol of train/step.py for a meta module: backward runs autograd; step() is the optimizer's
    elementwise update, which FlopCounterMode does not count."""

    module: nn.Module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        pass


class _PhaseCounter:
    """A FlopCounterMode whose running totals are cut at each mark(name): phases[name] = {family: flops}."""

    def __init__(self):
        from torch.utils.flop_counter import FlopCounterMode

        self.mode = FlopCounterMode(display=False)
        self.phases: dict[str, dict[str, int]] = {}
        self._seen = dict.fromkeys(FLOP_FAMILIES, 0)

    def mark(self, name: str) -> None:
        now = flops_by_family(self.mode.get_flop_counts().get("Global", {}))
        self.phases[name] = {f: now[f] - self._seen[f] for f in FLOP_FAMILIES}
        self._seen = now


def _meta_models(cfg: TrainConfig) -> tuple[StepModels, list[DINOv2Encoder]]:
    """The step's models at full size on the meta device (random init, no weight file read)."""
    configs = cfg.model_configs()
    sit_cfg = replace(configs.sit, kernel_backend="eager")  # the Triton kernels do not run on meta tensors
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LPIPS loads its linear heads into meta parameters: a no-op, said loudly
        sit, vae, disc = SiT(sit_cfg), build_vae(configs.vae), build_discriminator(None)
        lpips = LPIPS(cfg.loss.vae.lpips_double_rescale, pretrained=False)
        encoders = [DINOv2Encoder(s.enc_type, cfg.data.resolution, pretrained=False)
                    for s in parse_enc_type(cfg.encoder.enc_type)]
        lecam = LeCamEMA(cfg.loss.vae.lecam_ema_decay) if cfg.loss.vae.lecam_regularization_weight > 0 else None
        ema = EMA(sit)
    for m in (sit, vae, disc):
        m.train()
    models = StepModels(sit=_MetaEngine(sit), vae=_MetaEngine(vae), disc=_MetaEngine(disc), lpips=lpips,
                        encoders=encoders, ema=ema, lecam=lecam)
    return models, encoders


def count_step_flops(cfg: TrainConfig, batch: int = PLAN_BATCH) -> dict[str, dict[str, float]]:
    """FLOPs per image of each phase of one REPA-E step (PHASES order), split by family: {phase: {family: flops}}.
    The GAN term is counted on (the step is taken at loss.vae.discriminator_start, the steady state)."""
    if cfg.stage != "repae":
        raise ValueError(f"config key stage={cfg.stage!r}: the planner counts the REPA-E step (stage=repae) only, "
                         f"for now")
    models, encoders = _meta_models(cfg)
    configs, R = cfg.model_configs(), cfg.data.resolution
    S = dinov2_input_size(R)
    latent = (batch, configs.sit.in_channels, configs.sit.input_size, configs.sit.input_size)
    settings = StepSettings(vae_loss=cfg.loss.vae, proj_coeff=cfg.loss.proj_coeff,
                            vae_align_proj_coeff=cfg.loss.vae_align_proj_coeff, ema_decay=cfg.schedule.ema_decay,
                            precision=cfg.schedule.precision, kernel_backend="eager")
    counter = _PhaseCounter()
    # One FlopCounterMode context for the whole step: entering it again would reset its totals.
    with torch.device("meta"), counter.mode:
        with torch.no_grad():
            targets = tuple(enc.encode_preprocessed(torch.zeros(batch, 3, S, S)).float() for enc in encoders)
        counter.mark("dinov2")
        inputs = StepInputs(images=torch.zeros(batch, 3, R, R, dtype=torch.uint8),
                            labels=torch.zeros(batch, dtype=torch.long), t=torch.zeros(batch),
                            noise=torch.zeros(latent), drop_mask=torch.zeros(batch, dtype=torch.bool),
                            posterior_noise=torch.zeros(latent), targets=targets)
        # The step's one host sync (is the loss finite?) has no value to read on meta: every update runs. The
        # step's own dinov2 mark closes an empty phase (the targets came in): the count above is kept.
        with mock.patch.object(step_module, "finite_on_all_ranks", lambda loss: True):
            step_module.train_step(models, inputs, settings, step=cfg.loss.vae.discriminator_start,
                                   mark=lambda name: None if name == "dinov2" else counter.mark(name))
    missing = set(PHASES) - set(counter.phases)
    assert not missing, f"train_step no longer marks {sorted(missing)}: update PHASES"
    return {p: {f: counter.phases[p][f] / batch for f in FLOP_FAMILIES} for p in PHASES}


def make_plan(cfg: TrainConfig, gpu: GPUSpec, num_gpus: int) -> dict:
    """The plan as a dict (the --json output): per phase GFLOP per image by family and the compute floor, and
    the step's totals for this rank's micro batch (global_batch_size / num_gpus images)."""
    if num_gpus < 1 or cfg.schedule.global_batch_size % num_gpus:
        raise ValueError(f"--gpus {num_gpus} must be >= 1 and divide schedule.global_batch_size="
                         f"{cfg.schedule.global_batch_size}")
    per_rank = cfg.schedule.global_batch_size // num_gpus
    flops = count_step_flops(cfg)
    phases = {}
    for name, fam in flops.items():
        total = sum(fam.values())
        phases[name] = {"gflop_per_image": total / 1e9, **{f"gflop_{f}": v / 1e9 for f, v in fam.items()},
                        "floor_ms_per_image": total / (gpu.bf16_tflops * 1e12) * 1e3}
    total = sum(sum(f.values()) for f in flops.values())
    floor_ms = total * per_rank / (gpu.bf16_tflops * 1e12) * 1e3
    return {"gpu": asdict(gpu), "num_gpus": num_gpus, "global_batch_size": cfg.schedule.global_batch_size,
            "images_per_gpu": per_rank, "phases": phases,
            "total": {"gflop_per_image": total / 1e9, "floor_ms_per_step": floor_ms,
                      "max_img_per_s_per_gpu": per_rank / floor_ms * 1e3},
            "not_counted": ["elementwise ops (norms, activations, optimizer updates, EMA)", "bytes moved",
                            "peak memory per rank", "communication"]}


def format_plan(plan: dict) -> str:
    """The plan as a text table: one row per phase, then the step's compute floor per GPU."""
    gpu = plan["gpu"]
    head = f"{'phase':<18} {'GFLOP/img':>10} {'gemm':>9} {'conv':>9} {'attn':>9} {'floor ms/img':>13}"
    lines = [f"REPA-E step on {gpu['name']} ({gpu['bf16_tflops']:.0f} TFLOP/s dense bf16), {plan['num_gpus']} GPU(s), "
             f"{plan['images_per_gpu']} images per GPU per step", head, "-" * len(head)]
    for name, p in plan["phases"].items():
        lines.append(f"{name:<18} {p['gflop_per_image']:>10.2f} {p['gflop_gemm']:>9.2f} {p['gflop_conv']:>9.2f} "
                     f"{p['gflop_attention']:>9.2f} {p['floor_ms_per_image']:>13.4f}")
    t = plan["total"]
    lines += ["-" * len(head), f"{'total':<18} {t['gflop_per_image']:>10.2f}",
              f"compute floor: {t['floor_ms_per_step']:.1f} ms per step per GPU, at most "
              f"{t['max_img_per_s_per_gpu']:.0f} img/s per GPU at 100% MFU",
              "not counted yet: " + "; ".join(plan["not_counted"])]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="FLOPs per phase of a REPA-E step and its compute floor on a GPU")
    p.add_argument("--config", required=True, help="run JSON, e.g. configs/sitxl_repae.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override (repeatable)")
    p.add_argument("--gpu", choices=(*GPU_SPECS, "custom"), default="h100", help="spec-sheet row (default h100)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs sharing schedule.global_batch_size (default 1)")
    p.add_argument("--peak-tflops", type=float, default=None, help="--gpu custom: dense bf16 TFLOP/s")
    p.add_argument("--hbm-gbps", type=float, default=None, help="--gpu custom: HBM GB/s")
    p.add_argument("--memory-gb", type=float, default=None, help="--gpu custom: HBM GB")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p.parse_args(argv)


def gpu_spec(a: argparse.Namespace) -> GPUSpec:
    """The --gpu row, or the --gpu custom row from --peak-tflops / --hbm-gbps / --memory-gb."""
    if a.gpu != "custom":
        return GPU_SPECS[a.gpu]
    if a.peak_tflops is None or a.peak_tflops <= 0:
        raise ValueError("--gpu custom needs --peak-tflops > 0 (and optionally --hbm-gbps, --memory-gb)")
    return GPUSpec("custom", "", a.peak_tflops, a.hbm_gbps or 0.0, a.memory_gb or 0.0, 0.0, 0.0, 0.0, 0.0, 8)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        plan = make_plan(load_config(a.config, a.set), gpu_spec(a), a.gpus)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if a.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
