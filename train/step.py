"""One REPA-E training step (docs/METHOD.md#the-training-step), written to read like the algorithm, and the
LDM-only step (docs/METHOD.md#the-ldm-only-stage), which shares its phases 0, 4 and 5.

    0  targets   DINOv2 patch tokens of the images (no grad)
    1  VAE       posterior, z, x_hat = VAE(x)
    2  VAE loss  L1 + LPIPS + KL + GAN(frozen D) + 1.5 * align(SiT frozen, BN running stats, no dropout,
                 blocks up to the projector), backward, VAE update
    3  D         hinge loss on x and sg(x_hat), D update
    4  SiT       velocity MSE + 0.5 * REPA on sg(z) (same t and eps, BN batch stats, label dropout), SiT update
    5  EMA       of the SiT parameters and BN buffers
    LDM-only:    0, then z = mean + std * eps from the frozen VAE's posterior (or a latent cache), then 4 and 5
                 with the latent BN on its fixed running statistics (the VAE's)

The models arrive as engines (train/engine.py): anything with `.module`, `__call__`, `backward(loss)` and
`step()`. Frozen passes call the module through `torch.func.functional_call` with detached parameters, so no
engine parameter ever has its `requires_grad` toggled (ZeRO's gradient hooks stay intact) and no frozen weight
gradient is built.
t, eps, the label-drop mask and the posterior noise come in as arguments (the trainer draws them).
The step returns 0-d tensors and makes one host sync per model: the finiteness check of its loss, taken
over all ranks (one 1-element all-reduce), so a non-finite loss on any rank skips that model's update on
every rank (no rank waits in a gradient reduction the others never enter). A skipped update leaves the
model's buffers as they were before the step (the SiT's latent-BN statistics, the discriminator's BN and
LeCam EMAs), and a skipped SiT update skips the EMA too. This file holds no I/O, logging or checkpointing.
"""

# B batch, C latent channels, R image side, N tokens, E encoder dim

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from repae.model.losses import (
    LeCamEMA,
    VAELossConfig,
    denoising_loss,
    discriminator_hinge_loss,
    projection_loss,
    vae_generator_loss,
)

from .latent_cache import posterior_moments  # the online moments are the cache writer's function: bitwise the same

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class StepModels:
    """What one step touches. `ema` has update(module, decay); `encoders` map uint8 images to [B, N, E];
    `lecam` holds the LeCam EMAs (needed when vae_loss.lecam_regularization_weight > 0)."""

    sit: object
    vae: object
    disc: object
    lpips: nn.Module
    encoders: Sequence[nn.Module]
    ema: object
    lecam: LeCamEMA | None = None

    @property
    def vae_module(self) -> nn.Module:
        """The VAE itself (previews and the online FID decode with it)."""
        return self.vae.module


@dataclass
class LdmModels:
    """What an LDM-only step touches: the SiT engine, the frozen VAE (eval, fp32: the posterior when no latent
    cache gives it, and the previews), the encoders, the EMA. `latents_stats` (bias [C], scale [C]) are the
    statistics the latent BN is fixed to (a latent cache is checked against them)."""

    sit: object
    vae: nn.Module
    encoders: Sequence[nn.Module]
    ema: object
    latents_stats: tuple[torch.Tensor, torch.Tensor]

    @property
    def vae_module(self) -> nn.Module:
        return self.vae


@dataclass(frozen=True)
class StepInputs:
    """A rank's batch and the random draws of this step (drawn by the trainer, or by a test)."""

    images: torch.Tensor  # uint8 [B, 3, R, R]
    labels: torch.Tensor  # int64 [B]
    t: torch.Tensor  # [B] in [0, 1)
    noise: torch.Tensor  # [B, C, h, w] flow noise eps
    drop_mask: torch.Tensor  # bool [B]: labels replaced by the null class in the SiT pass
    posterior_noise: torch.Tensor  # [B, C, h, w] eps of z = mean + std * eps
    targets: tuple[torch.Tensor, ...] | None = None  # fp32 [B, N, E] per encoder (a feature cache); None: run them
    moments: tuple[torch.Tensor, torch.Tensor] | None = None  # LDM-only: fp32 (mean, std) [B, C, h, w] of the
    # posterior (a latent cache); None: the frozen VAE encodes the images


@dataclass(frozen=True)
class StepSettings:
    """Loss weights and precision of the step (from the run config)."""

    vae_loss: VAELossConfig
    proj_coeff: float = 0.5
    vae_align_proj_coeff: float = 1.5
    ema_decay: float = 0.9999
    precision: str = "bf16"
    kernel_backend: str | None = None


def autocast(device: torch.device, precision: str):
    """Autocast to the precision's dtype (AUTOCAST_DTYPES) on device; none for fp32 or a device without autocast
    (meta, where FLOPs are counted: the same FLOPs)."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def frozen_call(module: nn.Module, *args, **kwargs):
    """module(*args, **kwargs) with every parameter detached: input gradients only, no weight gradients."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, params, args, kwargs, strict=False)


def finite_on_all_ranks(loss: torch.Tensor) -> bool:
    """Whether `loss` is finite on every rank: the same answer everywhere (a MIN all-reduce when distributed)."""
    flag = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


class _Buffers:
    """Copies of modules' buffers, put back when the update they belong to is skipped."""

    def __init__(self, *modules: nn.Module | None):
        # PERF: a few [C] clones per step (latent BN, discriminator BN, LeCam), against every buffer staying
        # finite after a non-finite batch.
        self.saved = [(b, b.clone()) for m in modules if m is not None for b in m.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for b, copy in self.saved:
                b.copy_(copy)


def _update(engine, loss: torch.Tensor, logs: dict[str, torch.Tensor], name: str,
            buffers: _Buffers | None = None) -> bool:
    """engine.backward(loss) + engine.step() unless the loss is non-finite on some rank (then `buffers` go back
    to their saved values); logs[name/skipped] = 0. or 1. Returns whether the update ran."""
    # PERF: one host sync per model and step, the price of skipping a non-finite update before it lands.
    finite = finite_on_all_ranks(loss)
    logs[f"{name}/skipped"] = torch.tensor(0.0 if finite else 1.0)
    if finite:
        engine.backward(loss)
        engine.step()
    elif buffers is not None:
        buffers.restore()
    return finite


def _encode(encoders: Sequence[nn.Module], images: torch.Tensor, amp) -> list[torch.Tensor]:
    with torch.no_grad(), amp:
        return [enc(images).float() for enc in encoders]


def train_step(models: StepModels, inputs: StepInputs, settings: StepSettings, *, step: int,
               mark: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """One REPA-E iteration; returns detached 0-d tensors (losses, logits) and *_skipped flags (0/1).

    mark(name), when given, is called at the end of each phase (the train-step benchmark records a CUDA
    event there to split the step's time); it must not synchronise.
    """
    mark = mark or (lambda name: None)
    device = inputs.images.device
    amp = autocast(device, settings.precision)
    logs: dict[str, torch.Tensor] = {}

    # 0. Representation targets: frozen encoders, no grad, autocast (their final norm returns fp32); or the
    # same tokens read from a feature cache (docs/METHOD.md#feature-cache).
    zs = list(inputs.targets) if inputs.targets is not None else _encode(models.encoders, inputs.images, amp)
    mark("dinov2")

    # 1. VAE forward (train mode; it has no dropout or BN). x in [-1, 1], fp32.
    x = inputs.images.float() / 127.5 - 1
    with amp:
        posterior, z, x_hat = models.vae(x, noise=inputs.posterior_noise)
    x_hat = x_hat.float()
    mark("vae_forward")

    # 2. VAE loss: generator terms (disc frozen, its BN on the fake batch) + alignment through the frozen SiT.
    # fp32: the original runs the loss without autocast. Skipped while the GAN term is off (the original
    # does not call D then either).
    disc_buffers = _Buffers(models.disc.module, models.lecam)  # D's BN moves in the frozen call below already
    disc_dtype = next(models.disc.module.parameters()).dtype  # fp32, or half under DeepSpeed's bf16/fp16 modes
    logits_fake = (frozen_call(models.disc.module, x_hat.to(disc_dtype)).float() if settings.vae_loss.gan_active(step)
                   else None)
    vae_loss, vae_logs = vae_generator_loss(x, x_hat, posterior, logits_fake, lpips=models.lpips, cfg=settings.vae_loss,
                                            step=step)
    mark("lpips_gan_loss")
    no_drop = torch.zeros_like(inputs.drop_mask)
    with amp:
        align = frozen_call(models.sit.module, z, inputs.labels, inputs.t, inputs.noise, drop_mask_B=no_drop,
                            align_only=True, use_batch_stats=False)
    align_loss = projection_loss(align.zs_tilde, zs, backend=settings.kernel_backend)
    mark("align_forward")
    vae_loss = vae_loss + settings.vae_align_proj_coeff * align_loss
    logs.update({f"vae/{k}": v for k, v in vae_logs.items()})
    logs["vae/align_loss"] = align_loss.detach()
    logs["vae/loss"] = vae_loss.detach()
    _update(models.vae, vae_loss, logs, "vae")
    del align, vae_loss
    mark("vae_backward_step")

    # 3. Discriminator: hinge on real x and the pre-update reconstruction, separate calls (BN per call).
    logits_real = models.disc(x.detach().to(disc_dtype)).float()
    logits_fake = models.disc(x_hat.detach().to(disc_dtype)).float()
    d_loss, d_logs = discriminator_hinge_loss(logits_real, logits_fake,
                                              factor=settings.vae_loss.discriminator_factor_at(step),
                                              lecam_weight=settings.vae_loss.lecam_regularization_weight,
                                              lecam=models.lecam)
    logs.update({f"disc/{k}": v for k, v in d_logs.items()})
    _update(models.disc, d_loss, logs, "disc", disc_buffers)
    mark("disc")

    # 4 and 5. SiT on sg(z): same t and eps, BN on (global) batch statistics, label dropout by the given mask; EMA.
    _sit_update(models, z, zs, inputs, settings, amp, logs, mark, use_batch_stats=True)
    return logs


def _sit_update(models, z: torch.Tensor, zs: list[torch.Tensor], inputs: StepInputs, settings: StepSettings, amp,
                logs: dict[str, torch.Tensor], mark: Callable[[str], None], *, use_batch_stats: bool) -> None:
    """Phases 4 and 5: the SiT update on sg(z) with the step's t, eps and label-drop mask, then the EMA.
    use_batch_stats: the latent BN normalises with the batch statistics and updates its running ones (REPA-E),
    or with its running ones, unchanged (the LDM-only stage)."""
    sit_buffers = _Buffers(models.sit.module)  # a batch-statistics forward updates the latent-BN running statistics
    with amp:
        out = models.sit(z.detach(), inputs.labels, inputs.t, inputs.noise, drop_mask_B=inputs.drop_mask,
                         use_batch_stats=use_batch_stats)
    dn_loss = denoising_loss(out.v_pred, out.v_target)
    proj_loss = projection_loss(out.zs_tilde, zs, backend=settings.kernel_backend)
    sit_loss = dn_loss + settings.proj_coeff * proj_loss
    mark("sit_forward")
    logs.update({"sit/denoising_loss": dn_loss.detach(), "sit/proj_loss": proj_loss.detach(),
                 "sit/loss": sit_loss.detach()})
    sit_updated = _update(models.sit, sit_loss, logs, "sit", sit_buffers)
    mark("sit_backward_step")

    # 5. EMA of the SiT (parameters and BN buffers); nothing moved when the SiT update was skipped.
    if sit_updated:
        models.ema.update(models.sit.module, decay=settings.ema_decay)
    mark("ema")


def ldm_step(models: LdmModels, inputs: StepInputs, settings: StepSettings, *, step: int,
             mark: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """One LDM-only iteration (the original's train_ldm_only.py): the SiT update of train_step (phases 4 and 5) on
    z = mean + std * eps of the frozen VAE's posterior, the latent BN on its fixed running statistics. Returns
    what train_step returns for the SiT; `step` is unused (train_step's signature)."""
    mark = mark or (lambda name: None)
    amp = autocast(inputs.images.device, settings.precision)
    logs: dict[str, torch.Tensor] = {}
    zs = list(inputs.targets) if inputs.targets is not None else _encode(models.encoders, inputs.images, amp)
    mark("dinov2")
    mean, std = inputs.moments if inputs.moments is not None else posterior_moments(models.vae, inputs.images)
    z = mean + std * inputs.posterior_noise  # fp32, as the original's sample_posterior
    mark("latents")
    _sit_update(models, z, zs, inputs, settings, amp, logs, mark, use_batch_stats=False)
    return logs


STEPS = {"repae": train_step, "ldm": ldm_step}
"""config stage -> its step function (the same signature and logs for the SiT)."""
