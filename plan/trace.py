"""One REPA-E step of a config, run on fake tensors at full size under the planner's CostCounter
(docs/PLANNING.md#how-the-planner-counts).

    trace = trace_step(cfg, batch=32)          # the real train_step of train/step.py, per-rank batch 32
    trace.phases["sit_forward"].records        # every op the phase ran, with FLOPs and bytes
    trace.engine_params["vae"]                 # trainable parameters of the VAE engine

The configured SiT, VAE, discriminator, LPIPS and DINOv2 are built under torch's FakeTensorMode (shapes and
dtypes only: no memory, no arithmetic, no weight file read) on the CPU device, so the step's CPU autocast gives
every op the dtype it has on a GPU under the same precision. The step's `mark` callback cuts the ops into its
phases, so the planner cannot drift from the step. With kernel_backend "triton" our fused kernels run as their
`repae::` custom ops' shape functions (the real launch needs a GPU), "eager" runs their PyTorch references.

What the trace leaves out, and the planner adds (plan/resources.py): parameters, gradients and optimizer states
(a gradient is dropped as soon as autograd has accumulated it, as ZeRO-2 does after bucketing it, so the live
bytes here are activations and temporaries), the optimizer's update, and communication.
"""

# B batch (per rank), R image side, S DINOv2 input side

from __future__ import annotations

import warnings
from contextlib import ExitStack
from dataclasses import dataclass, replace
from unittest import mock

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from repae.kernels import as_custom_ops
from repae.model.discriminator import build_discriminator
from repae.model.encoders import DINOv2Encoder, parse_enc_type
from repae.model.losses import LeCamEMA
from repae.model.lpips import LPIPS
from repae.model.sit import SiT
from repae.model.vae import build_vae
from repae.train import step as step_module
from repae.train.config import TrainConfig
from repae.train.ema import EMA
from repae.train.step import StepInputs, StepModels, StepSettings

from .counter import CostCounter, Phase

PHASES = ("dinov2", "vae_forward", "lpips_gan_loss", "align_forward", "vae_backward_step", "disc", "sit_forward",
          "sit_backward_step", "ema")
"""The phases of train_step, by the names it passes to `mark` (the train-step benchmark uses the same)."""

ENGINES = ("sit", "vae", "disc")
"""The trained modules, each in its own engine and optimizer (train/build.py)."""


@dataclass
class StepTrace:
    """What trace_step saw: the ops and memory of each phase, and the sizes the planner adds to them."""

    batch: int
    phases: dict[str, Phase]
    engine_params: dict[str, int]
    """Trainable parameters per engine (the optimizer's and the gradients' size)."""
    frozen_bytes: dict[str, int]
    """Bytes of parameters and buffers that live through the run without being trained (EMA, LPIPS, DINOv2, the
    engines' buffers)."""
    input_bytes: int
    """The batch as the step receives it (uint8 images, labels, t, noises)."""


@dataclass
class _Engine:
    """The engine protocol of train/step.py on a fake module: backward runs autograd, step() is the optimizer's
    update, which the planner counts from the parameter count (plan/resources.py)."""

    module: nn.Module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        pass


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _fake(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """The module with its meta parameters and buffers swapped for fake CPU tensors of the same shapes."""
    cpu = torch.device("cpu")
    return module._apply(lambda t: mode.fake_tensor_converter.from_meta_and_device(mode, t, cpu))


def _build(cfg: TrainConfig, backend: str, mode: FakeTensorMode | None) -> tuple[StepModels, dict[str, int],
                                                                                   dict[str, int]]:
    """The step's models at full size as fake CPU tensors (built on the meta device: timm's DINOv2 reads a value
    while it is built, which a fake tensor does not have), or as real CPU modules when mode is None; their trainable
    parameter counts per engine and the bytes of everything frozen."""
    configs = cfg.model_configs()
    with torch.device("meta" if mode is not None else "cpu"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LPIPS loads its linear heads into meta parameters: a no-op, said loudly
        sit = SiT(replace(configs.sit, kernel_backend=backend))
        vae, disc = build_vae(configs.vae), build_discriminator(None)
        lpips = LPIPS(cfg.loss.vae.lpips_double_rescale, pretrained=False)
        encoders = [DINOv2Encoder(s.enc_type, cfg.data.resolution, pretrained=False)
                    for s in parse_enc_type(cfg.encoder.enc_type)]
        lecam = LeCamEMA(cfg.loss.vae.lecam_ema_decay) if cfg.loss.vae.lecam_regularization_weight > 0 else None
    sit.pos_embed.requires_grad_(not cfg.sit.freeze_pos_embed)  # as train/build.py
    ema = EMA(sit)
    if mode is not None:
        _fake(ema.module, mode)
        ema._collect()  # its tensor lists name the module's new (fake) parameters
        sit, vae, disc, lpips = (_fake(m, mode) for m in (sit, vae, disc, lpips))
        encoders = [_fake(e, mode) for e in encoders]
        lecam = _fake(lecam, mode) if lecam is not None else None
    for m in (sit, vae, disc):
        m.train()
    trained = {"sit": sit, "vae": vae, "disc": disc}
    params = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in trained.items()}
    frozen = {f"{k} (frozen params, buffers)": _nbytes([p for p in m.parameters() if not p.requires_grad])
              + _nbytes(m.buffers()) for k, m in trained.items()}
    frozen["sit EMA"] = _nbytes([*ema.module.parameters(), *ema.module.buffers()])
    frozen["LPIPS"] = _nbytes([*lpips.parameters(), *lpips.buffers()])
    frozen["DINOv2"] = sum(_nbytes([*e.parameters(), *e.buffers()]) for e in encoders)
    models = StepModels(sit=_Engine(sit), vae=_Engine(vae), disc=_Engine(disc), lpips=lpips, encoders=encoders,
                        ema=ema, lecam=lecam)
    return models, params, frozen


def _drop_gradients(modules: list[nn.Module]) -> None:
    """Free each gradient once autograd has accumulated it (ZeRO-2 moves it into a bucket then); the planner counts
    gradient memory by ZeRO stage itself."""
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))


def trace_step(cfg: TrainConfig, batch: int, *, backend: str = "triton", precision: str | None = None,
               fake: bool = True) -> StepTrace:
    """Run one REPA-E train_step of `cfg` at per-rank batch `batch` on fake tensors under a CostCounter. The GAN
    term is on (the step is taken at loss.vae.discriminator_start, the steady state). backend: "triton" (our fused
    kernels) or "eager"; precision: the autocast precision (default schedule.precision). fake=False runs it on real
    CPU tensors with random weights (small configs: the tests compare the counted memory with the allocator's)."""
    if cfg.stage != "repae":
        raise ValueError(f"config key stage={cfg.stage!r}: the planner traces the REPA-E step (stage=repae) only")
    if batch < 2:
        raise ValueError(f"per-rank batch {batch}: the latent and discriminator BatchNorms need at least 2 images")
    configs, R = cfg.model_configs(), cfg.data.resolution
    latent = (batch, configs.sit.in_channels, configs.sit.input_size, configs.sit.input_size)
    settings = StepSettings(vae_loss=cfg.loss.vae, proj_coeff=cfg.loss.proj_coeff,
                            vae_align_proj_coeff=cfg.loss.vae_align_proj_coeff, ema_decay=cfg.schedule.ema_decay,
                            precision=precision or cfg.schedule.precision, kernel_backend=backend)
    counter, mode = CostCounter(tf32=cfg.schedule.tf32), (FakeTensorMode() if fake else None)
    models, params, frozen = _build(cfg, backend, mode)
    with ExitStack() as stack:
        if fake:
            stack.enter_context(mode)
        if backend == "triton" and fake:
            # Our kernels are called as their repae:: custom ops, so fake tensors reach the ops' shape functions
            # and nothing launches.
            stack.enter_context(as_custom_ops())
        # The step's one host sync (is the loss finite?) has no value to read on fake tensors: every update runs.
        stack.enter_context(mock.patch.object(step_module, "finite_on_all_ranks", lambda loss: True))
        _drop_gradients([models.sit.module, models.vae.module, models.disc.module])
        inputs = StepInputs(images=torch.zeros(batch, 3, R, R, dtype=torch.uint8),
                            labels=torch.zeros(batch, dtype=torch.long), t=torch.rand(batch),
                            noise=torch.randn(latent), drop_mask=torch.zeros(batch, dtype=torch.bool),
                            posterior_noise=torch.randn(latent))
        input_bytes = _nbytes([inputs.images, inputs.labels, inputs.t, inputs.noise, inputs.drop_mask,
                               inputs.posterior_noise])
        with counter:
            step_module.train_step(models, inputs, settings, step=cfg.loss.vae.discriminator_start, mark=counter.mark)
    missing = set(PHASES) - set(counter.phases)
    assert not missing, f"train_step no longer marks {sorted(missing)}: update PHASES"
    return StepTrace(batch=batch, phases={p: counter.phases[p] for p in PHASES}, engine_params=params,
                     frozen_bytes=frozen, input_bytes=input_bytes)
