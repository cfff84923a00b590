"""Losses (docs/METHOD.md#loss-weights-and-optimizers, #vae-and-gan-losses) against transcriptions of the original code
written here, not imported.

Oracles: `original_generator_loss` follows REPA-E's ReconstructionLoss_Single_Stage._forward_generator line by
line (the discriminator called inside, its params switched to requires_grad=False, fp32 with autocast off),
`original_lpips` taming's LPIPS.forward of the initial commit (with and without the double rescale), the SiT
loss the original's mean_flat per sample then .mean(), and the REPA loss its per-sample loop. Same ops in the
same order are compared bitwise (rtol=atol=0): values, logs and the posterior's gradient; x_hat's gradient sums
three paths in another order (D runs before the loss here), so rtol 1e-5. The REPA wrapper reorders the sums
(batched kernel), so it is compared to 1e-6. Random VGG trunk, random heads written to a file here (no
lpips package needed), 32x32 images, a 2-layer PatchGAN; ~3 s on 2 CPU cores.
"""

# B batch, T tokens, E encoder dim

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from repae.model.discriminator import NLayerDiscriminator
from repae.model.losses import (
    LeCamEMA,
    VAELossConfig,
    denoising_loss,
    discriminator_hinge_loss,
    projection_loss,
    vae_generator_loss,
)
from repae.model.lpips import CHANNELS, LPIPS
from repae.model.vae import DiagonalGaussianDistribution

EXACT = {"rtol": 0, "atol": 0}
LOG_KEYS = {"total_loss", "reconstruction_loss", "perceptual_loss", "kl_loss", "weighted_gan_loss", "gan_loss",
            "discriminator_factor", "d_weight"}


# ---------------------------------------------------------------- oracles (transcribed, not imported)


def original_lpips(lp: LPIPS, in0, in1, double_rescale):
    """taming LPIPS.forward as in REPA-E's loss/lpips.py (initial commit when double_rescale)."""
    if double_rescale:
        in0 = in0 * 2 - 1
        in1 = in1 * 2 - 1
    in0_input, in1_input = lp.scaling_layer(in0), lp.scaling_layer(in1)
    outs0, outs1 = lp.net(in0_input), lp.net(in1_input)
    lins = [lp.lin0, lp.lin1, lp.lin2, lp.lin3, lp.lin4]
    diffs = {}
    for kk in range(len(CHANNELS)):
        f0 = outs0[kk] / (torch.sqrt(torch.sum(outs0[kk] ** 2, dim=1, keepdim=True)) + 1e-10)
        f1 = outs1[kk] / (torch.sqrt(torch.sum(outs1[kk] ** 2, dim=1, keepdim=True)) + 1e-10)
        diffs[kk] = (f0 - f1) ** 2
    res = [lins[kk].model(diffs[kk]).mean([2, 3], keepdim=True) for kk in range(len(CHANNELS))]
    val = res[0]
    for i in range(1, len(CHANNELS)):
        val += res[i]
    return val


def original_generator_loss(inputs, reconstructions, posteriors, discriminator, lpips_fn, global_step, conf,
                            double_rescale):
    """ReconstructionLoss_Single_Stage(mode="generator"), quantize_mode "vae", l1 + lpips + kl + gan."""
    with torch.autocast(device_type="cpu", enabled=False):  # @torch.cuda.amp.autocast(enabled=False)
        inputs, reconstructions = inputs.float(), reconstructions.float()
        logvar = nn.Parameter(torch.ones(size=()) * conf.logvar_init, requires_grad=False)
        inputs = inputs.contiguous()
        reconstructions = reconstructions.contiguous()
        reconstruction_loss = F.l1_loss(inputs, reconstructions, reduction="mean")
        reconstruction_loss *= conf.reconstruction_weight
        perceptual_loss = original_lpips(lpips_fn, inputs, reconstructions, double_rescale).mean()
        generator_loss = torch.zeros((), device=inputs.device)
        discriminator_factor = conf.discriminator_factor if global_step >= conf.discriminator_start else 0
        d_weight = 1.0
        if discriminator_factor > 0.0 and conf.discriminator_weight > 0.0:
            for param in discriminator.parameters():
                param.requires_grad = False
            logits_fake = discriminator(reconstructions)
            generator_loss = -torch.mean(logits_fake)
        d_weight *= conf.discriminator_weight
        reconstruction_loss = reconstruction_loss / torch.exp(logvar)
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
        total_loss = (reconstruction_loss + conf.perceptual_weight * perceptual_loss + conf.kl_weight * kl_loss
                      + d_weight * discriminator_factor * generator_loss)
        loss_dict = {"total_loss": total_loss.clone().detach(), "reconstruction_loss": reconstruction_loss.detach(),
                     "perceptual_loss": (conf.perceptual_weight * perceptual_loss).detach(),
                     "kl_loss": (conf.kl_weight * kl_loss).detach(),
                     "weighted_gan_loss": (d_weight * discriminator_factor * generator_loss).detach(),
                     "discriminator_factor": torch.tensor(discriminator_factor, dtype=torch.float32),
                     "d_weight": torch.tensor(d_weight, dtype=torch.float32), "gan_loss": generator_loss.detach()}
    return total_loss, loss_dict


def original_hinge_d_loss(logits_real, logits_fake):
    loss_real = torch.mean(F.relu(1.0 - logits_real))
    loss_fake = torch.mean(F.relu(1.0 + logits_fake))
    return 0.5 * (loss_real + loss_fake)


def mean_flat(x):
    return torch.mean(x, dim=list(range(1, len(x.size()))))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory):
    """Random non-negative LPIPS heads in the original's layout (lin{k}.model.1.weight)."""
    g = torch.Generator().manual_seed(0)
    sd = {f"lin{k}.model.1.weight": 0.1 * torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(CHANNELS)}
    path = tmp_path_factory.mktemp("lpips") / "vgg.pth"
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["double_rescale", "fixed"])
def lpips_pair(request, heads_file):
    """(LPIPS with a random trunk, its double_rescale flag)."""
    torch.manual_seed(1)
    return LPIPS(double_rescale=request.param, pretrained=False, lin_weights=heads_file), request.param


def vae_inputs(batch=2, side=32, seed=0):
    """x, x_hat (leaf, requires grad) in [-1, 1] and a posterior over leaf moments [B, 2 * 4, side/8, side/8]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, side, side, generator=g) * 2 - 1
    x_hat = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1).requires_grad_(True)
    moments = torch.randn(batch, 8, side // 8, side // 8, generator=g).requires_grad_(True)
    return x, x_hat, moments


def small_disc(seed=0):
    return NLayerDiscriminator(3, ndf=8, n_layers=2, generator=torch.Generator().manual_seed(seed)).train()


def frozen_logits(disc, x_hat):
    """What the trainer passes: D(x_hat) with detached parameters (input gradient only)."""
    return functional_call(disc, {n: p.detach() for n, p in disc.named_parameters()}, (x_hat,))


# ---------------------------------------------------------------- VAE generator loss


@pytest.mark.parametrize("cfg", [VAELossConfig(), VAELossConfig(reconstruction_weight=0.7, perceptual_weight=0.4,
                                                                 kl_weight=1e-3, discriminator_weight=0.3,
                                                                 discriminator_factor=0.5, logvar_init=0.1)],
                         ids=["defaults", "weights"])
def test_generator_loss_matches_original(lpips_pair, cfg):
    """Values, logs and gradients (x_hat, posterior moments) bitwise equal to the transcription."""
    lp, rescale = lpips_pair
    cfg = VAELossConfig(**{**cfg.__dict__, "lpips_double_rescale": rescale})
    x, x_hat, moments = vae_inputs()
    disc = small_disc()

    x_hat_o, moments_o = x_hat.detach().clone().requires_grad_(True), moments.detach().clone().requires_grad_(True)
    total_o, logs_o = original_generator_loss(x, x_hat_o, DiagonalGaussianDistribution(moments_o),
                                              copy.deepcopy(disc), lp, 3, cfg, rescale)
    total_o.backward()

    total, logs = vae_generator_loss(x, x_hat, DiagonalGaussianDistribution(moments), frozen_logits(disc, x_hat),
                                     lpips=lp, cfg=cfg, step=3)
    total.backward()

    assert total.dtype == torch.float32 and total.ndim == 0
    torch.testing.assert_close(total, total_o, **EXACT)
    assert set(logs) == LOG_KEYS == set(logs_o)
    for key, value in logs.items():
        assert value.ndim == 0 and value.dtype == torch.float32 and not value.requires_grad, key
        torch.testing.assert_close(value, logs_o[key], **EXACT, msg=key)
    # x_hat feeds L1, LPIPS and D; the caller runs D first here, so autograd sums the three contributions in
    # another order (measured: 26% of elements differ, by <= 9e-7 relative). The posterior has one path.
    torch.testing.assert_close(x_hat.grad, x_hat_o.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(moments.grad, moments_o.grad, **EXACT)
    assert all(p.grad is None for p in disc.parameters())  # the caller's frozen call: no weight grads


def test_double_rescale_changes_the_perceptual_term(heads_file):
    """Same trunk, flag on vs off: different LPIPS (the bug is real); a flag/config mismatch is a ValueError."""
    x, x_hat, moments = vae_inputs()
    logits = frozen_logits(small_disc(), x_hat)
    values = {}
    for flag in (True, False):
        torch.manual_seed(1)
        lp = LPIPS(double_rescale=flag, pretrained=False, lin_weights=heads_file)
        _, logs = vae_generator_loss(x, x_hat, DiagonalGaussianDistribution(moments), logits, lpips=lp,
                                     cfg=VAELossConfig(lpips_double_rescale=flag), step=0)
        values[flag] = logs["perceptual_loss"]
        with pytest.raises(ValueError, match="lpips_double_rescale"):
            vae_generator_loss(x, x_hat, DiagonalGaussianDistribution(moments), logits, lpips=lp,
                               cfg=VAELossConfig(lpips_double_rescale=not flag), step=0)
    assert not torch.equal(values[True], values[False])


def test_generator_loss_under_bf16_autocast(lpips_pair):
    """Inside a bf16 autocast region (logits from a bf16 D call too): fp32 results equal to the fp32 run."""
    lp, rescale = lpips_pair
    cfg = VAELossConfig(lpips_double_rescale=rescale)
    x, x_hat, moments = vae_inputs(seed=2)
    disc = small_disc()
    logits = frozen_logits(disc, x_hat)
    ref_total, ref_logs = vae_generator_loss(x, x_hat, DiagonalGaussianDistribution(moments), logits, lpips=lp,
                                             cfg=cfg, step=0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        total, logs = vae_generator_loss(x, x_hat, DiagonalGaussianDistribution(moments), logits, lpips=lp,
                                         cfg=cfg, step=0)
        logits_bf16 = frozen_logits(disc, x_hat)
        total_bf16_logits, _ = vae_generator_loss(x, x_hat, DiagonalGaussianDistribution(moments), logits_bf16,
                                                  lpips=lp, cfg=cfg, step=0)
    assert logits_bf16.dtype == torch.bfloat16  # the conv did run in bf16 there
    assert total.dtype == torch.float32 and total_bf16_logits.dtype == torch.float32
    torch.testing.assert_close(total, ref_total, **EXACT)
    for key in ref_logs:
        assert logs[key].dtype == torch.float32, key
        torch.testing.assert_close(logs[key], ref_logs[key], **EXACT, msg=key)
    # the GAN term of bf16 logits is their fp32 mean: only the logits' own rounding differs
    torch.testing.assert_close(total_bf16_logits, ref_total, rtol=0, atol=0.1 * 0.02)


def test_gradient_reaches_logits_fake_and_x_hat_through_the_discriminator(lpips_pair):
    """d total / d logits_fake = -d_weight * factor / numel; the frozen D call carries it on to x_hat."""
    lp, rescale = lpips_pair
    cfg = VAELossConfig(lpips_double_rescale=rescale, discriminator_weight=0.25, discriminator_factor=0.5)
    x, x_hat, moments = vae_inputs(seed=3)
    logits = frozen_logits(small_disc(), x_hat)
    logits.retain_grad()
    total, _ = vae_generator_loss(x, x_hat, DiagonalGaussianDistribution(moments), logits, lpips=lp, cfg=cfg,
                                  step=0)
    total.backward()
    torch.testing.assert_close(logits.grad, torch.full_like(logits, -0.25 * 0.5 / logits.numel()), **EXACT)
    # x_hat's gradient = the same loss without the GAN term + the path through D
    x_hat2 = x_hat.detach().clone().requires_grad_(True)
    no_gan = VAELossConfig(lpips_double_rescale=rescale, discriminator_weight=0.0)
    total2, _ = vae_generator_loss(x, x_hat2, DiagonalGaussianDistribution(moments.detach()), None, lpips=lp,
                                   cfg=no_gan, step=0)
    total2.backward()
    assert not torch.equal(x_hat.grad, x_hat2.grad) and moments.grad is not None


def test_discriminator_start_gates_the_gan_term(lpips_pair):
    """Before discriminator_start: factor 0, GAN term 0, logits unused (None or NaN is fine); after: on."""
    lp, rescale = lpips_pair
    cfg = VAELossConfig(lpips_double_rescale=rescale, discriminator_start=5)
    x, x_hat, moments = vae_inputs(seed=4)
    post = DiagonalGaussianDistribution(moments)
    logits = frozen_logits(small_disc(), x_hat)
    assert not cfg.gan_active(4) and cfg.gan_active(5) and cfg.discriminator_factor_at(4) == 0.0
    off, logs_off = vae_generator_loss(x, x_hat, post, None, lpips=lp, cfg=cfg, step=4)
    nan_logits = torch.full_like(logits, float("nan"))
    off_nan, _ = vae_generator_loss(x, x_hat, post, nan_logits, lpips=lp, cfg=cfg, step=4)
    torch.testing.assert_close(off_nan, off, **EXACT)
    assert logs_off["gan_loss"] == 0 and logs_off["weighted_gan_loss"] == 0 and logs_off["discriminator_factor"] == 0
    torch.testing.assert_close(off, logs_off["reconstruction_loss"] + logs_off["perceptual_loss"]
                               + logs_off["kl_loss"], **EXACT)
    for step in (5, 100):
        on, logs_on = vae_generator_loss(x, x_hat, post, logits, lpips=lp, cfg=cfg, step=step)
        torch.testing.assert_close(logs_on["gan_loss"], -logits.mean(), **EXACT)
        torch.testing.assert_close(on, off + 0.1 * 1.0 * -logits.mean(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="logits_fake"):
        vae_generator_loss(x, x_hat, post, None, lpips=lp, cfg=cfg, step=5)


def test_generator_loss_rejects_bad_shapes(lpips_pair):
    lp, rescale = lpips_pair
    cfg = VAELossConfig(lpips_double_rescale=rescale)
    x, x_hat, moments = vae_inputs()
    post = DiagonalGaussianDistribution(moments)
    with pytest.raises(ValueError, match=r"\(2, 3, 16, 16\)"):
        vae_generator_loss(x, x_hat[:, :, :16, :16], post, None, lpips=lp, cfg=cfg, step=0)
    with pytest.raises(ValueError, match=r"\(3, 1, 2, 2\)"):
        vae_generator_loss(x, x_hat, post, torch.zeros(3, 1, 2, 2), lpips=lp, cfg=cfg, step=0)
    with pytest.raises(ValueError, match=r"kl\(\) has shape \(1,\)"):
        vae_generator_loss(x, x_hat, DiagonalGaussianDistribution(moments[:1]), torch.zeros(2, 1, 2, 2), lpips=lp,
                           cfg=cfg, step=0)


# ---------------------------------------------------------------- config


def test_vae_loss_config_defaults_and_checks():
    """Spec 4.1 defaults; bad values are ValueErrors naming the field; the config is frozen."""
    cfg = VAELossConfig()
    assert (cfg.reconstruction_weight, cfg.perceptual_weight, cfg.kl_weight, cfg.discriminator_weight,
            cfg.discriminator_factor, cfg.discriminator_start, cfg.logvar_init, cfg.lpips_double_rescale) == (
        1.0, 1.0, 1e-6, 0.1, 1.0, 0, 0.0, True)
    for field, bad in (("kl_weight", -1.0), ("perceptual_weight", float("nan")), ("discriminator_weight", "0.1"),
                       ("discriminator_start", -1), ("discriminator_start", 1.5), ("logvar_init", float("inf")),
                       ("lpips_double_rescale", 1), ("reconstruction_weight", True)):
        with pytest.raises(ValueError, match=field):
            VAELossConfig(**{field: bad})
    with pytest.raises(TypeError):
        VAELossConfig(1.0)  # keyword-only
    with pytest.raises(AttributeError):
        cfg.kl_weight = 0.0


# ---------------------------------------------------------------- discriminator hinge loss


def test_hinge_loss_by_hand():
    """relu(1 - [2, .5, -1]) = [0, .5, 2], relu(1 + [-2, 0, .5]) = [0, 1, 1.5]: 0.5 * (2.5/3 + 2.5/3) = 5/6."""
    real = torch.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
    fake = torch.tensor([[-2.0, 0.0, 0.5]], requires_grad=True)
    loss, logs = discriminator_hinge_loss(real, fake)
    torch.testing.assert_close(loss, torch.tensor(5.0 / 6.0))
    assert set(logs) == {"discriminator_loss", "logits_real", "logits_fake", "lecam_loss"}
    assert logs["lecam_loss"] == 0
    torch.testing.assert_close(logs["logits_real"], torch.tensor(0.5))
    torch.testing.assert_close(logs["logits_fake"], torch.tensor(-0.5))
    assert all(v.ndim == 0 and not v.requires_grad for v in logs.values())
    loss.backward()  # d/d real = -0.5/3 where 1 - real > 0; d/d fake = +0.5/3 where 1 + fake > 0
    torch.testing.assert_close(real.grad, torch.tensor([[0.0, -1 / 6, -1 / 6]]))
    torch.testing.assert_close(fake.grad, torch.tensor([[0.0, 1 / 6, 1 / 6]]))
    half, _ = discriminator_hinge_loss(real, fake, factor=0.5)
    zero, _ = discriminator_hinge_loss(real, fake, factor=0.0)
    torch.testing.assert_close(half, torch.tensor(5.0 / 12.0))
    assert zero == 0


def test_hinge_loss_matches_original_and_is_fp32():
    """factor * hinge_d_loss bitwise; bf16 logits under autocast give the fp32 loss of their fp32 values."""
    g = torch.Generator().manual_seed(5)
    real, fake = torch.randn(4, 1, 6, 6, generator=g), torch.randn(4, 1, 6, 6, generator=g)
    loss, _ = discriminator_hinge_loss(real, fake, factor=0.7)
    torch.testing.assert_close(loss, 0.7 * original_hinge_d_loss(real, fake), **EXACT)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got, logs = discriminator_hinge_loss(real.bfloat16(), fake.bfloat16())
    assert got.dtype == torch.float32 and logs["logits_real"].dtype == torch.float32
    torch.testing.assert_close(got, original_hinge_d_loss(real.bfloat16().float(), fake.bfloat16().float()), **EXACT)


class OriginalLeCam(nn.Module):
    """The original loss module's LeCam part as it is written there: two [1] buffers reassigned out of place."""

    def __init__(self, weight, decay):
        super().__init__()
        self.lecam_regularization_weight, self.lecam_ema_decay = weight, decay
        self.register_buffer("ema_real_logits_mean", torch.zeros(1))
        self.register_buffer("ema_fake_logits_mean", torch.zeros(1))

    def forward(self, logits_real, logits_fake, discriminator_factor):
        discriminator_loss = discriminator_factor * original_hinge_d_loss(logits_real, logits_fake)
        lecam_loss = torch.mean(torch.pow(F.relu(torch.mean(logits_real) - self.ema_fake_logits_mean), 2))
        lecam_loss += torch.mean(torch.pow(F.relu(self.ema_real_logits_mean - torch.mean(logits_fake)), 2))
        lecam_loss = lecam_loss * self.lecam_regularization_weight
        d = self.lecam_ema_decay
        self.ema_real_logits_mean = self.ema_real_logits_mean * d + torch.mean(logits_real).detach() * (1 - d)
        self.ema_fake_logits_mean = self.ema_fake_logits_mean * d + torch.mean(logits_fake).detach() * (1 - d)
        discriminator_loss += lecam_loss
        return discriminator_loss, lecam_loss


def test_lecam_matches_the_original_over_several_steps():
    """Loss, gradients and both EMAs bitwise over 4 calls (the term bites once the EMAs have moved: real logits
    above the fake EMA, fake logits below the real EMA); the weight is not scaled by the GAN factor."""
    g = torch.Generator().manual_seed(7)
    ours, orig = LeCamEMA(decay=0.9), OriginalLeCam(weight=0.3, decay=0.9)
    for step in range(4):
        real = (torch.randn(3, 1, 5, 5, generator=g) + 2.0).requires_grad_()
        fake = (torch.randn(3, 1, 5, 5, generator=g) - 2.0).requires_grad_()
        real2, fake2 = real.detach().clone().requires_grad_(), fake.detach().clone().requires_grad_()
        loss, logs = discriminator_hinge_loss(real, fake, factor=0.5, lecam_weight=0.3, lecam=ours)
        want, want_lecam = orig(real2, fake2, 0.5)
        torch.testing.assert_close(loss, want, **EXACT)
        torch.testing.assert_close(logs["lecam_loss"], want_lecam.detach(), **EXACT)
        loss.backward(), want.backward()
        torch.testing.assert_close(real.grad, real2.grad, **EXACT)
        torch.testing.assert_close(fake.grad, fake2.grad, **EXACT)
        torch.testing.assert_close(ours.ema_real_logits_mean, orig.ema_real_logits_mean, **EXACT)
        torch.testing.assert_close(ours.ema_fake_logits_mean, orig.ema_fake_logits_mean, **EXACT)
        if step > 0:
            assert logs["lecam_loss"] > 0
    with pytest.raises(ValueError, match="LeCamEMA"):
        discriminator_hinge_loss(real, fake, lecam_weight=0.1)
    with pytest.raises(ValueError, match="lecam_ema_decay"):
        VAELossConfig(lecam_ema_decay=1.5)
    with pytest.raises(ValueError, match="lecam_regularization_weight"):
        VAELossConfig(lecam_regularization_weight=float("nan"))


# ---------------------------------------------------------------- SiT losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_denoising_loss_matches_mean_flat(dtype):
    """mean over b of mean_flat((v_pred - v*)^2), fp32; bf16 v_pred is promoted as in the original."""
    g = torch.Generator().manual_seed(6)
    v_pred = torch.randn(3, 4, 8, 8, generator=g).to(dtype).requires_grad_(True)
    v_target = torch.randn(3, 4, 8, 8, generator=g)
    expected = mean_flat((v_pred - v_target) ** 2).mean()  # the original's promotion: bf16 - fp32 -> fp32
    got = denoising_loss(v_pred, v_target)
    assert got.dtype == torch.float32 and got.ndim == 0
    torch.testing.assert_close(got, expected, **EXACT)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(denoising_loss(v_pred, v_target), expected, **EXACT)
    got.backward()
    assert v_pred.grad.dtype == dtype
    with pytest.raises(ValueError, match=r"\(3, 4, 8, 7\)"):
        denoising_loss(v_pred, v_target[..., :7])


def test_projection_loss_matches_the_per_sample_loop():
    """-mean cos over (B, T) per encoder, averaged over encoders, as the original's per-sample loop."""
    g = torch.Generator().manual_seed(7)
    zs_tilde = [torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 8, generator=g)]
    zs = [torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 8, generator=g)]
    ref = torch.tensor(0.0, dtype=torch.float64)
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z.double(), z_tilde.double()):
            z_tilde_j = F.normalize(z_tilde_j, dim=-1)
            z_j = F.normalize(z_j, dim=-1)
            ref = ref + mean_flat(-(z_j * z_tilde_j).sum(dim=-1))
    ref = ref / (len(zs) * 3)
    got = projection_loss(zs_tilde, zs, backend="eager")
    assert got.dtype == torch.float32 and got.ndim == 0
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-6)
    one = projection_loss(zs_tilde[0], zs[0], backend="eager")
    torch.testing.assert_close(one.double(), -F.cosine_similarity(zs_tilde[0].double(), zs[0].double(), dim=-1).mean(),
                               rtol=0, atol=1e-6)
