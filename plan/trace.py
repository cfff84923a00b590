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
from repae.train.step import LdmModels, StepInputs, StepModels, StepSettings

from .counter import CostCounter, Phase

PHASES = ("dinov2", "vae_forward", "lpips_gan_loss", "align_forward", "vae_backward_step", "disc", "sit_forward",
          "sit_backward_step", "ema")
"""The phases of train_step, by the names it passes to `mark` (the train-step benchmark uses the same)."""

LDM_PHASES = ("dinov2", "latents", "sit_forward", "sit_backward_step", "ema")
"""The phases of ldm_step (stage=ldm)."""

STAGE_PHASES = {"repae": PHASES, "ldm": LDM_PHASES}

ENGINES = ("sit", "vae", "disc")
"""The trained modules of the REPA-E step, each in its own engine and optimizer (train/build.py); stage=ldm
trains the SiT only."""


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


def _build_device(mode: FakeTensorMode | None) -> torch.device:
    """Where models are built: meta when the trace is fake (timm's DINOv2 reads a value while it is built, which a
    fake tensor does not have; _fake swaps the tensors after), the CPU for a real trace."""
    return torch.device("meta" if mode is not None else "cpu")


def _fake(module: nn.Module, mode: FakeTensorMode | None) -> nn.Module:
    """The module with its meta parameters and buffers swapped for fake CPU tensors of the same shapes (a real
    trace, mode None: the module as it is)."""
    if mode is None:
        return module
    cpu = torch.device("cpu")
    return module._apply(lambda t: mode.fake_tensor_converter.from_meta_and_device(mode, t, cpu))


def _encoders(cfg: TrainConfig, mode: FakeTensorMode | None) -> list[nn.Module]:
    with _build_device(mode):
        return [_fake(DINOv2Encoder(s.enc_type, cfg.data.resolution, pretrained=False), mode)
                for s in parse_enc_type(cfg.encoder.enc_type)]


def _sit_and_ema(cfg: TrainConfig, backend: str, mode: FakeTensorMode | None) -> tuple[SiT, EMA]:
    with _build_device(mode):
        sit = SiT(replace(cfg.model_configs().sit, kernel_backend=backend))
    sit.pos_embed.requires_grad_(not cfg.sit.freeze_pos_embed)  # as train/build.py
    if cfg.stage == "ldm":  # the latent BN on fixed statistics (the VAE's latents-stats file in training)
        C = sit.config.in_channels
        sit.init_bn(latents_scale=torch.ones(C, device=sit.pos_embed.device),
                    latents_bias=torch.zeros(C, device=sit.pos_embed.device))
    ema = EMA(sit)
    if mode is not None:
        _fake(ema.module, mode)
        ema._collect()  # its tensor lists name the module's new (fake) parameters
    return _fake(sit, mode).train(), ema


def _sizes(trained: dict[str, nn.Module], ema: EMA, frozen: dict[str, list[nn.Module]]) -> tuple[dict, dict]:
    """Trainable parameters per engine, and bytes of everything that lives through the run untrained."""
    params = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in trained.items()}
    sizes = {f"{k} (frozen params, buffers)": _nbytes([p for p in m.parameters() if not p.requires_grad])
             + _nbytes(m.buffers()) for k, m in trained.items()}
    sizes["sit EMA"] = _nbytes([*ema.module.parameters(), *ema.module.buffers()])
    for name, modules in frozen.items():
        sizes[name] = sum(_nbytes([*m.parameters(), *m.buffers()]) for m in modules)
    return params, sizes


def _build(cfg: TrainConfig, backend: str, mode: FakeTensorMode | None) -> tuple[object, dict[str, int],
                                                                                   dict[str, int]]:
    """The step's models at full size as fake CPU tensors (built on the meta device, then swapped), or as real CPU
    modules when mode is None; their trainable parameter counts per engine and the bytes of everything frozen."""
    sit, ema = _sit_and_ema(cfg, backend, mode)
    encoders = _encoders(cfg, mode)
    with _build_device(mode), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LPIPS loads its linear heads into meta parameters: a no-op, said loudly
        vae = build_vae(cfg.model_configs().vae)
        if cfg.stage == "ldm":  # the frozen VAE (eval, fp32) gives the posterior when no latent cache does
            vae = vae.eval().requires_grad_(False)
            params, frozen = _sizes({"sit": sit}, ema, {"frozen VAE": [vae], "DINOv2": encoders})
            # latents_stats: the step does not read them (the SiT's BN holds the statistics)
            return (LdmModels(sit=_Engine(sit), vae=_fake(vae, mode), encoders=encoders, ema=ema, latents_stats=()),
                    params, frozen)
        disc = build_discriminator(None)
        lpips = LPIPS(cfg.loss.vae.lpips_double_rescale, pretrained=False)
        lecam = LeCamEMA(cfg.loss.vae.lecam_ema_decay) if cfg.loss.vae.lecam_regularization_weight > 0 else None
    vae, disc, lpips = (_fake(m, mode) for m in (vae, disc, lpips))
    lecam = _fake(lecam, mode) if lecam is not None else None
    vae.train(), disc.train()
    params, frozen = _sizes({"sit": sit, "vae": vae, "disc": disc}, ema, {"LPIPS": [lpips], "DINOv2": encoders})
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


def _inputs(cfg: TrainConfig, models, batch: int) -> StepInputs:
    """A batch and the step's draws; a feature cache's targets (encoder.feature_cache) and a latent cache's moments
    (data.latent_cache) come in as the step would read them, so their phases do no work."""
    c, R = cfg.model_configs().sit, cfg.data.resolution
    latent = (batch, c.in_channels, c.input_size, c.input_size)
    images = torch.zeros(batch, 3, R, R, dtype=torch.uint8)
    targets = None
    if cfg.encoder.feature_cache:
        with torch.no_grad():
            targets = tuple(enc(images).float() for enc in models.encoders)
    moments = (torch.randn(latent), torch.rand(latent)) if cfg.stage == "ldm" and cfg.data.latent_cache else None
    return StepInputs(images=images, labels=torch.zeros(batch, dtype=torch.long), t=torch.rand(batch),
                      noise=torch.randn(latent), drop_mask=torch.zeros(batch, dtype=torch.bool),
                      posterior_noise=torch.randn(latent), targets=targets, moments=moments)


def trace_step(cfg: TrainConfig, batch: int, *, backend: str = "triton", precision: str | None = None,
               fake: bool = True) -> StepTrace:
    """Run one step of `cfg` (train_step, or ldm_step for stage=ldm) at per-rank batch `batch` on fake tensors
    under a CostCounter. The GAN term is on (the step is taken at loss.vae.discriminator_start, the steady state).
    backend: "triton" (our fused kernels) or "eager"; precision: the autocast precision (default
    schedule.precision). fake=False runs it on real CPU tensors with random weights (small configs: the tests
    compare the counted memory with the allocator's)."""
    if cfg.stage not in STAGE_PHASES:
        raise ValueError(f"config key stage={cfg.stage!r}: the planner traces {sorted(STAGE_PHASES)}")
    if batch < 2:
        raise ValueError(f"per-rank batch {batch}: the latent and discriminator BatchNorms need at least 2 images")
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
        _drop_gradients([getattr(models, e).module for e in params])
        inputs = _inputs(cfg, models, batch)
        input_bytes = _nbytes([x for x in (inputs.images, inputs.labels, inputs.t, inputs.noise, inputs.drop_mask,
                                           inputs.posterior_noise, *(inputs.targets or ()), *(inputs.moments or ()))])
        with counter:
            step_module.STEPS[cfg.stage](models, inputs, settings, step=cfg.loss.vae.discriminator_start,
                                         mark=counter.mark)
    phases = STAGE_PHASES[cfg.stage]
    missing = set(phases) - set(counter.phases)
    assert not missing, f"the {cfg.stage} step no longer marks {sorted(missing)}: update STAGE_PHASES"
    return StepTrace(batch=batch, phases={p: counter.phases[p] for p in phases}, engine_params=params,
                     frozen_bytes=frozen, input_bytes=input_bytes)
