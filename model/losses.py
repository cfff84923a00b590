"""The losses of REPA-E (docs/METHOD.md#loss-weights-and-optimizers, #vae-and-gan-losses): denoising, REPA projection,
VAE generator terms, discriminator hinge.

    dn = denoising_loss(out.v_pred, out.v_target)                         # SiT pass
    proj = projection_loss(out.zs_tilde, zs)                              # both SiT passes
    vae, logs = vae_generator_loss(x, x_hat, posterior, disc(x_hat), lpips=lpips, cfg=VAELossConfig(), step=step)
    d, logs = discriminator_hinge_loss(disc(x), disc(x_hat.detach()), factor=cfg.discriminator_factor_at(step))

Holds pure functions of tensors (plus the frozen LPIPS module they are handed) and the VAE loss config. Every
loss is a 0-d fp32 tensor, every log a detached 0-d tensor (no .item(), no host sync). Must not hold model
forwards, the discriminator or its requires_grad switching (the caller runs the discriminator, frozen for the
generator terms), optimizer code, or the REPA cosine math itself (repae.kernels.repa_loss).
"""

# B batch, N encoder tokens, E encoder width, C latent channels, H, W height and width

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from repae.kernels import repa_loss


def _fp32_region(t: torch.Tensor):
    """Autocast off on t's device: the original's losses run under autocast(enabled=False) on .float() inputs.
    Meta tensors (FLOP counting) have no autocast: nothing to switch off."""
    if t.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=t.device.type, enabled=False)


# ---------------------------------------------------------------------------------------------------
# SiT losses
# ---------------------------------------------------------------------------------------------------


def denoising_loss(v_pred: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_b mean_{C,H,W} (v_pred - v_target)^2 as a 0-d fp32 tensor; v_pred may be bf16/fp16.

    Same order as the original: per-sample mean_flat inside SiT.forward, then `.mean()` over the batch.
    """
    if v_pred.shape != v_target.shape or v_pred.ndim < 2:
        raise ValueError(f"denoising_loss: v_pred {tuple(v_pred.shape)} and v_target {tuple(v_target.shape)} "
                         "must have one shape [B, ...]")
    with _fp32_region(v_pred):
        # PARITY: the original subtracts an fp16 v_pred from the fp32 target, which promotes v_pred to fp32 first;
        # casting explicitly is the same math and keeps an fp32 result whatever autocast says.
        sq = (v_pred.float() - v_target.float()) ** 2  # (B, C, H, W)
        per_sample_B = sq.mean(dim=tuple(range(1, sq.ndim)))  # mean_flat
        return per_sample_B.mean()


def projection_loss(zs_tilde: torch.Tensor | Sequence[torch.Tensor], zs: torch.Tensor | Sequence[torch.Tensor],
                    backend: str | None = None) -> torch.Tensor:
    """REPA loss -mean_{b,t} cos(zs_tilde, zs) over [B, T, E] tensors (or lists, one per encoder), 0-d fp32."""
    # PARITY: the original loops over samples in Python (sum of per-sample means / (n_enc * B)); the kernel
    # computes the same mean in one batched pass, in fp32 (REPA #46: fp16 normalize gives NaNs).
    return repa_loss(zs_tilde, zs, backend=backend).float()


# ---------------------------------------------------------------------------------------------------
# VAE losses (loss/losses.py: ReconstructionLoss_Single_Stage, configs/l1_lpips_kl_gan.yaml)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class VAELossConfig:
    """Weights of the VAE generator and discriminator losses; defaults are REPA-E's l1_lpips_kl_gan.yaml."""

    reconstruction_weight: float = 1.0
    """Factor on the L1 reconstruction term mean|x - x_hat| (the code uses L1 though the paper says MSE)."""
    perceptual_weight: float = 1.0
    """Factor on the batch-mean LPIPS distance."""
    kl_weight: float = 1e-6
    """Factor on the per-sample-averaged KL(q(z|x) || N(0, I)), summed over latent elements."""
    discriminator_weight: float = 0.1
    """Fixed d_weight on the generator's GAN term (no adaptive weight in REPA-E)."""
    discriminator_factor: float = 1.0
    """Factor on the GAN term and on the hinge loss once step >= discriminator_start (0 before)."""
    discriminator_start: int = 0
    """First step (global, 0-based) at which the GAN term and the hinge loss are on."""
    logvar_init: float = 0.0
    """Value of the original's frozen `logvar`: the reconstruction term is divided by exp(logvar_init)."""
    lpips_double_rescale: bool = True
    """LPIPS input bug of the April-2025 code and checkpoints (True); False is upstream's fix (PR #17)."""
    lecam_regularization_weight: float = 0.0
    """Factor on the LeCam regulariser of the discriminator loss (0 in REPA-E's shipped config: not computed)."""
    lecam_ema_decay: float = 0.999
    """Decay of the EMAs of the mean real / fake logits that the LeCam term compares against."""

    def __post_init__(self):
        for name in ("reconstruction_weight", "perceptual_weight", "kl_weight", "discriminator_weight",
                     "discriminator_factor", "lecam_regularization_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"VAELossConfig.{name} must be a finite number >= 0, got {value!r}")
        start = self.discriminator_start
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"VAELossConfig.discriminator_start must be an int >= 0, got {start!r}")
        v = self.logvar_init
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"VAELossConfig.logvar_init must be a finite number, got {v!r}")
        d = self.lecam_ema_decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1:
            raise ValueError(f"VAELossConfig.lecam_ema_decay must be a number in [0, 1], got {d!r}")
        if self.lpips_double_rescale is not True and self.lpips_double_rescale is not False:
            raise ValueError(f"VAELossConfig.lpips_double_rescale must be True or False, got "
                             f"{self.lpips_double_rescale!r}")

    def discriminator_factor_at(self, step: int) -> float:
        """discriminator_factor once step >= discriminator_start, else 0 (should_discriminator_be_trained)."""
        return float(self.discriminator_factor) if step >= self.discriminator_start else 0.0

    def gan_active(self, step: int) -> bool:
        """Whether the generator loss uses logits_fake at `step`; when False the caller may skip the D call."""
        return self.discriminator_factor_at(step) > 0.0 and self.discriminator_weight > 0.0


def vae_generator_loss(x: torch.Tensor, x_hat: torch.Tensor, posterior, logits_fake: torch.Tensor | None, *,
                       lpips: nn.Module, cfg: VAELossConfig, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REPA-E's generator-mode VAE loss (docs/METHOD.md#vae-and-gan-losses), without the alignment term the caller adds.

    total = rec_w * mean|x - x_hat| / exp(logvar_init) + perc_w * mean_b LPIPS(x, x_hat)
            + kl_w * sum_b KL_b / B + d_weight * factor(step) * (-mean D(x_hat))

    x, x_hat: [B, 3, H, W] in [-1, 1]; posterior: has .kl() -> [B] (model.vae.DiagonalGaussianDistribution);
    logits_fake: D(x_hat) from the caller's frozen discriminator (may be None while cfg.gan_active(step) is
    False: the original then skips the D call and the GAN term is 0). lpips: a frozen LPIPS module.
    lpips.double_rescale must equal cfg.lpips_double_rescale (ValueError otherwise).
    Returns (total, logs): fp32 0-d tensors; the logs are detached (the original's eight keys). Gradients reach
    x_hat, the posterior's tensors and logits_fake (hence x_hat again through the discriminator).
    """
    if x.ndim != 4 or x.shape != x_hat.shape:
        raise ValueError(f"vae_generator_loss: x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must both be "
                         "[B, 3, H, W] of one shape")
    rescale = getattr(lpips, "double_rescale", cfg.lpips_double_rescale)
    if rescale != cfg.lpips_double_rescale:
        raise ValueError(f"vae_generator_loss: cfg.lpips_double_rescale={cfg.lpips_double_rescale} but the LPIPS "
                         f"module was built with double_rescale={rescale}")
    batch = x.shape[0]
    factor = cfg.discriminator_factor_at(step)
    use_gan = cfg.gan_active(step)
    if use_gan and (logits_fake is None or logits_fake.ndim < 1 or logits_fake.shape[0] != batch):
        shape = None if logits_fake is None else tuple(logits_fake.shape)
        raise ValueError(f"vae_generator_loss: logits_fake of shape {shape} at step {step}: expected D(x_hat), "
                         f"[{batch}, ...] (the GAN term is on from discriminator_start={cfg.discriminator_start})")

    with _fp32_region(x):
        # PARITY: the original's forward is decorated autocast(enabled=False) and casts inputs with .float().
        x, x_hat = x.float().contiguous(), x_hat.float().contiguous()

        # Reconstruction: L1 * weight, divided by exp of the frozen logvar parameter (fp32 0-d, as the original's).
        rec = F.l1_loss(x, x_hat, reduction="mean") * cfg.reconstruction_weight
        rec = rec / torch.exp(torch.tensor(cfg.logvar_init, dtype=torch.float32))  # CPU 0-d: a scalar, no sync

        # Perceptual: LPIPS [B, 1, 1, 1] -> batch mean.
        perceptual = lpips(x, x_hat).float().mean()

        # KL: summed over latent elements and batch, divided by B.
        kl_B = posterior.kl().float()
        if kl_B.shape != (batch,):
            raise ValueError(f"vae_generator_loss: posterior.kl() has shape {tuple(kl_B.shape)}, expected [{batch}]")
        kl = torch.sum(kl_B) / kl_B.shape[0]

        # GAN: -mean D(x_hat); 0 (and D unused) while the discriminator is off, as the original.
        if use_gan:
            gan = -torch.mean(logits_fake.float())
        else:
            gan = torch.zeros((), dtype=torch.float32, device=x.device)
        d_weight = 1.0 * cfg.discriminator_weight  # fixed: no adaptive weight in REPA-E

        weighted_perceptual = cfg.perceptual_weight * perceptual
        weighted_kl = cfg.kl_weight * kl
        weighted_gan = d_weight * factor * gan  # python floats multiply first, as `d_weight * factor * g` does
        total = rec + weighted_perceptual + weighted_kl + weighted_gan

    # The original's keys; its two constants are filled on the device (torch.full: no host-to-device copy).
    logs = {"total_loss": total.detach(), "reconstruction_loss": rec.detach(),
            "perceptual_loss": weighted_perceptual.detach(), "kl_loss": weighted_kl.detach(),
            "weighted_gan_loss": weighted_gan.detach(), "gan_loss": gan.detach(),
            "discriminator_factor": torch.full((), factor, dtype=torch.float32, device=x.device),
            "d_weight": torch.full((), d_weight, dtype=torch.float32, device=x.device)}
    return total, logs


class LeCamEMA(nn.Module):
    """The EMAs of the mean real and fake logits that the LeCam term uses (the original's two [1] buffers on
    its loss module, initialised to 0). Updated after each discriminator loss while the term is on."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real_logits_mean", torch.zeros(1))
        self.register_buffer("ema_fake_logits_mean", torch.zeros(1))

    @torch.no_grad()
    def update(self, real_mean: torch.Tensor, fake_mean: torch.Tensor) -> None:
        """ema = ema * decay + mean * (1 - decay), the original's expression (written back in place)."""
        d = self.decay
        self.ema_real_logits_mean.copy_(self.ema_real_logits_mean * d + real_mean.detach() * (1 - d))
        self.ema_fake_logits_mean.copy_(self.ema_fake_logits_mean * d + fake_mean.detach() * (1 - d))


def lecam_loss(real_mean: torch.Tensor, fake_mean: torch.Tensor, ema: LeCamEMA) -> torch.Tensor:
    """mean(relu(E[D(x)] - ema_fake)^2) + mean(relu(ema_real - E[D(x_hat)])^2), the original's compute_lecam_loss
    on the batch-mean logits (unweighted)."""
    loss = torch.mean(torch.pow(F.relu(real_mean - ema.ema_fake_logits_mean), 2))
    return loss + torch.mean(torch.pow(F.relu(ema.ema_real_logits_mean - fake_mean), 2))


def discriminator_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, *, factor: float = 1.0,
                             lecam_weight: float = 0.0, lecam: LeCamEMA | None = None
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """factor * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(sg x_hat))) + lecam_weight * LeCam, in fp32 (spec
    4.4, taming's hinge_d_loss; the LeCam term of the original's loss, not scaled by factor).

    factor: cfg.discriminator_factor_at(step). With lecam_weight > 0 the term is computed against `lecam`'s EMAs,
    which are then updated with this batch's mean logits (as the original, after the loss is formed). Logs
    discriminator_loss, the mean real/fake logits and lecam_loss (detached).
    """
    if logits_real.ndim < 1 or logits_fake.ndim < 1:
        raise ValueError(f"discriminator_hinge_loss: logits of shapes {tuple(logits_real.shape)} and "
                         f"{tuple(logits_fake.shape)}: expected [B, ...] maps")
    if lecam_weight > 0 and lecam is None:
        raise ValueError("discriminator_hinge_loss: lecam_weight > 0 needs the LeCamEMA state (lecam=)")
    with _fp32_region(logits_real):
        real, fake = logits_real.float(), logits_fake.float()
        loss_real = torch.mean(F.relu(1.0 - real))
        loss_fake = torch.mean(F.relu(1.0 + fake))
        loss = factor * (0.5 * (loss_real + loss_fake))
        if lecam_weight > 0:
            real_mean, fake_mean = torch.mean(real), torch.mean(fake)
            reg = lecam_loss(real_mean, fake_mean, lecam) * lecam_weight
            lecam.update(real_mean, fake_mean)
            loss = loss + reg
        else:  # the original adds a zero tensor here (x + 0 == x): nothing to compute
            reg = torch.zeros((), device=real.device)
    logs = {"discriminator_loss": loss.detach(), "logits_real": real.detach().mean(),
            "logits_fake": fake.detach().mean(), "lecam_loss": reg.detach()}
    return loss, logs
