"""One REPA-E step through the trainer (real DeepSpeed engines, ZeRO-2, gloo, CPU) against an eager
single-process reference written from docs/METHOD.md#the-training-step in this file: the transcribed original SiT
(tests/model/original_sit.py) with nn.BatchNorm2d and its per-sample loss loop, requires_grad and
eval()/train() toggles as the original does them, torch AdamW, clip_grad_norm_, and the per-tensor EMA
loop. Two steps are compared (the second Adam step depends on gradient magnitudes, not only signs).

Tolerances (fp32): losses 1e-5 relative; parameters after each step: at most 0.5% of the elements of
any model may differ by more than 1e-6 (Adam's first steps move a weight by about lr * sign(g); a
gradient within rounding of 0 may flip sign: measured 0.11% for the VAE, 0.07% for D), and none by more
than 2.5 lr. Checked to fail for a VAE cut off from the alignment gradient (1.4% at step 1) and for a
discriminator clipped at 0.5 instead of 1.0 (2.5% of the VAE at step 2).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from conftest import tiny_config  # noqa: E402
from original_sit import OriginalSiT  # noqa: E402

from repae.train.draws import synthetic_inputs  # noqa: E402
from repae.train.step import StepInputs  # noqa: E402

LR = 1e-4


def reference_step(m, inputs, step, *, proj_coeff=0.5, align_coeff=1.5, train_pos_embed=True):
    """docs/METHOD.md#the-training-step with the original's structure; returns the losses and the SiT grad norm.

    train_pos_embed=True is the original: requires_grad(model, True) before the SiT update re-enables the
    frozen pos_embed. False is our sit.freeze_pos_embed switch."""
    x_raw, y = inputs.images, inputs.labels
    t4 = inputs.t.view(-1, 1, 1, 1)
    with torch.no_grad():
        zs = [enc(x_raw) for enc in m["encoders"]]
    x = x_raw.float() / 127.5 - 1
    posterior = m["vae"].encode(x)
    z = posterior.mean + posterior.std * inputs.posterior_noise
    recon = m["vae"].decode(z)
    # requires_grad(model, False); model.eval()
    m["sit"].requires_grad_(False)
    m["sit"].eval()
    # vae_loss_fn(..., "generator"): disc frozen, its BN in train mode
    m["disc"].requires_grad_(False)
    rec = F.l1_loss(x, recon) / torch.exp(torch.tensor(0.0))
    lp = m["lpips"](x, recon).mean()
    kl = posterior.kl().sum() / x.shape[0]
    g = -torch.mean(m["disc"](recon))
    vae_loss = rec + 1.0 * lp + 1e-6 * kl + 0.1 * 1.0 * g
    out = m["sit"](z, y, zs, t4, inputs.noise, align_only=True)
    vae_loss = vae_loss + align_coeff * out["proj_loss"].mean()
    m["opt_vae"].zero_grad(set_to_none=True)
    vae_loss.backward()
    torch.nn.utils.clip_grad_norm_(m["vae"].parameters(), 1.0)
    m["opt_vae"].step()
    # discriminator
    m["disc"].requires_grad_(True)
    lr_ = m["disc"](x.detach().requires_grad_(True))
    lf_ = m["disc"](recon.detach())
    d_loss = 1.0 * 0.5 * (torch.mean(F.relu(1.0 - lr_)) + torch.mean(F.relu(1.0 + lf_)))
    m["opt_disc"].zero_grad(set_to_none=True)
    d_loss.backward()
    torch.nn.utils.clip_grad_norm_(m["disc"].parameters(), 1.0)
    m["opt_disc"].step()
    # SiT pass
    m["sit"].requires_grad_(True)
    if not train_pos_embed:
        m["sit"].pos_embed.requires_grad_(False)
    m["sit"].train()
    out = m["sit"](z.detach(), y, zs, t4, inputs.noise, force_drop_ids=inputs.drop_mask.int())
    sit_loss = out["denoising_loss"].mean() + proj_coeff * out["proj_loss"].mean()
    m["opt_sit"].zero_grad(set_to_none=True)
    sit_loss.backward()
    sit_grad_norm = torch.nn.utils.clip_grad_norm_(m["sit"].parameters(), 1.0)
    m["opt_sit"].step()
    reference_ema_update(m["ema"], m["sit"])
    return {"vae/loss": vae_loss.detach(), "disc/discriminator_loss": d_loss.detach(),
            "sit/loss": sit_loss.detach(), "sit/denoising_loss": out["denoising_loss"].mean().detach(),
            "sit/proj_loss": out["proj_loss"].mean().detach(), "sit/grad_norm": sit_grad_norm}


@torch.no_grad()
def reference_ema_update(ema, model, decay=0.9999):
    """The original's update_ema: params then buffers (float buffers EMA'd, ints copied), one tensor at a time."""
    ema_p, src_p = dict(ema.named_parameters()), dict(model.named_parameters())
    for k in ema_p:
        ema_p[k].mul_(decay).add_(src_p[k].data, alpha=1 - decay)
    ema_b, src_b = dict(ema.named_buffers()), dict(model.named_buffers())
    for k in ema_b:
        if ema_b[k].dtype.is_floating_point:
            ema_b[k].mul_(decay).add_(src_b[k], alpha=1 - decay)
        else:
            ema_b[k].copy_(src_b[k])


def original_copies(trainer):
    """The transcribed original SiT (nn.BatchNorm2d) with the trainer's SiT weights and buffers, and its EMA."""
    sit = trainer.models.sit.module
    c = sit.config
    orig = OriginalSiT(path_type=c.path_type, input_size=c.input_size, patch_size=c.patch_size,
                       in_channels=c.in_channels, hidden_size=c.hidden_size, encoder_depth=c.encoder_depth,
                       depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
                       class_dropout_prob=c.class_dropout_prob, num_classes=c.num_classes, z_dims=c.z_dims,
                       projector_dim=c.projector_dim, bn_momentum=c.bn_momentum)
    orig.load_state_dict(sit.state_dict(), strict=True)
    ema = copy.deepcopy(orig)
    ema.load_state_dict(trainer.ema.state_dict())
    return orig, ema


def build_reference(trainer):
    """The reference's models, copied from the trainer's initial state."""
    orig, ema = original_copies(trainer)
    vae = copy.deepcopy(trainer.models.vae.module)
    disc = copy.deepcopy(trainer.models.disc.module)
    # The original hands model.parameters() to each AdamW, frozen ones included (they never get a gradient).
    opt = lambda mod: torch.optim.AdamW(list(mod.parameters()), lr=LR,  # noqa: E731
                                        betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return {"sit": orig.train(), "ema": ema, "vae": vae.train(), "disc": disc.train(),
            "lpips": trainer.models.lpips, "encoders": trainer.models.encoders,
            "opt_sit": opt(orig), "opt_vae": opt(vae), "opt_disc": opt(disc)}


def assert_params_close(name, ours, theirs):
    ours, theirs = dict(ours), dict(theirs)
    assert ours.keys() == theirs.keys(), name
    diffs = torch.cat([(ours[k].detach().float() - theirs[k].detach().float()).abs().flatten() for k in ours])
    frac = (diffs > 1e-6).float().mean().item()
    assert frac < 5e-3 and diffs.max().item() <= 2.5 * LR, f"{name}: {frac:.2%} differ > 1e-6, max {diffs.max():.3g}"


def make_inputs(trainer, seed):
    """Random inputs with the first label always dropped (so the null class is exercised)."""
    B = trainer.cfg.schedule.global_batch_size
    return synthetic_inputs(trainer, seed, drop_mask=torch.tensor([True] + [False] * (B - 1)))


@pytest.mark.parametrize("freeze", [False, True], ids=["pos_embed_trained", "pos_embed_frozen"])
def test_two_steps_match_the_reference(tmp_path, ds_world, freeze):
    """Both settings of sit.freeze_pos_embed against the reference doing the same; the default (trained, the
    original's behaviour) moves pos_embed, the frozen switch keeps it bitwise."""
    from repae.train.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path / "run", f"sit.freeze_pos_embed={str(freeze).lower()}"))
    ref = build_reference(trainer)
    pos0 = trainer.models.sit.module.pos_embed.detach().clone()
    for step in range(2):
        inputs = make_inputs(trainer, seed=step)
        ours = trainer.run_step(inputs)
        want = reference_step(ref, inputs, step, train_pos_embed=not freeze)
        ours["sit/grad_norm"] = torch.as_tensor(trainer.models.sit.grad_norm(), dtype=torch.float32)
        for k, v in want.items():
            torch.testing.assert_close(ours[k], v.float(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=k, step=step: f"step {step} {k}: {m}")
        assert_params_close("sit", trainer.models.sit.module.state_dict().items(), ref["sit"].state_dict().items())
        assert_params_close("vae", trainer.models.vae.module.state_dict().items(), ref["vae"].state_dict().items())
        assert_params_close("disc", trainer.models.disc.module.state_dict().items(), ref["disc"].state_dict().items())
        assert_params_close("ema", trainer.ema.state_dict().items(), ref["ema"].state_dict().items())
    moved = (trainer.models.sit.module.pos_embed.detach() - pos0).abs().max().item()
    if freeze:
        assert moved == 0.0
    else:
        assert moved > 0.5 * LR, moved  # two Adam steps of ~lr each
        torch.testing.assert_close(trainer.models.sit.module.pos_embed.detach(), ref["sit"].pos_embed.detach(),
                                   rtol=0, atol=2.5 * LR)


def test_nan_loss_is_skipped_and_counted(tmp_path, ds_world):
    from repae.train.trainer import RunStopped, Trainer

    trainer = Trainer(tiny_config(tmp_path / "run", "logging.nan_patience=2"))
    inputs = make_inputs(trainer, seed=0)
    before = {k: v.clone() for k, v in trainer.models.sit.module.state_dict().items()}
    bad = StepInputs(**{**inputs.__dict__, "noise": inputs.noise.clone().fill_(float("nan"))})
    logs = trainer.run_step(bad)
    assert logs["sit/skipped"] == 1 and trainer.nan_total["sit"] == 1 and trainer.nan_counts["sit"] == 1
    after = trainer.models.sit.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "bn." not in k), "skipped update changed weights"
    with pytest.raises(RunStopped, match=r"2 consecutive non-finite sit losses up to step 2"):
        trainer.run_step(bad)
