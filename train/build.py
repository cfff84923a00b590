"""Everything a run trains or consults, built from its TrainConfig in one place.

    models = build(cfg, world, device, use_deepspeed=True)   # StepModels: the three engines, LPIPS, the
                                                             # DINOv2 encoders, the EMA, the LeCam EMAs;
                                                             # stage=ldm: LdmModels (the SiT engine, the
                                                             # frozen VAE, the encoders, the EMA)
The SiT and VAE configs come from TrainConfig.model_configs(), the one place that derives them.

Initial weights are identical on every rank (torch.manual_seed(schedule.seed) before anything is built). A demo
may replace missing DINOv2 / VGG weight files by random ones (encoder.allow_random, loss.lpips_allow_random),
said loudly; otherwise a missing file is the loader's one-line error naming it.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from repae.kernels import allreduce_stats_hook
from repae.model.discriminator import build_discriminator
from repae.model.encoders import DINOv2Encoder, parse_enc_type
from repae.model.flops import count_flops
from repae.model.losses import LeCamEMA
from repae.model.lpips import LPIPS
from repae.model.sit import SiT
from repae.model.vae import AutoencoderKL, build_vae, latents_stats_path, load_latents_stats, load_vae_weights

from .config import ModelConfigs, TrainConfig
from .config_sections import STAGE_ENGINES
from .distributed import log0
from .ema import EMA
from .engine import build_engine
from .latent_cache import build_frozen_vae
from .step import LdmModels, StepModels
from .sync_bn import sync_batchnorm_

ENGINES = STAGE_ENGINES["repae"]
"""The models REPA-E trains, in the order of their optimizer sections optim_<name> (stage=ldm: the SiT alone)."""


def flops_per_image(cfg: TrainConfig) -> float:
    """Training FLOPs per image of the SiT and the VAE (matmuls, convs, attention; counted on the meta device):
    SiT pass 3x forward, align pass ~2x forward of the blocks up to the projector, VAE 3x forward (stage=ldm: the
    SiT pass alone). DINOv2, LPIPS, the discriminator and the LDM stage's online VAE encode are left out, so the
    MFU built on it is a lower bound."""
    configs, R = cfg.model_configs(), cfg.data.resolution
    c = replace(configs.sit, kernel_backend="eager")  # the Triton kernels do not run on meta tensors
    with torch.device("meta"):
        sit, vae = SiT(c), build_vae(configs.vae)
        z = torch.zeros(1, c.in_channels, c.input_size, c.input_size)
        sit_f = count_flops(lambda: sit(z, torch.zeros(1, dtype=torch.long), torch.zeros(1), z,
                                        use_batch_stats=False))
        vae_f = count_flops(lambda: vae(torch.zeros(1, 3, R, R), sample_posterior=False))
    if cfg.stage == "ldm":
        return 3 * sit_f
    return 3 * sit_f + 2 * sit_f * c.encoder_depth / c.depth + 3 * vae_f


def build_encoders(cfg: TrainConfig) -> list[DINOv2Encoder]:
    """The frozen encoders; with encoder.allow_random, a missing weight file gives a random one (said loudly)."""
    encoders = []
    for spec in parse_enc_type(cfg.encoder.enc_type):
        try:
            enc = DINOv2Encoder(spec.enc_type, cfg.data.resolution, weights=cfg.encoder.weights,
                                weights_dir=cfg.encoder.weights_dir)
        except FileNotFoundError as err:
            if not cfg.encoder.allow_random:
                raise
            log0(f"NOTE: {err} encoder.allow_random is set: using a RANDOMLY INITIALISED {spec.enc_type} (demo only)")
            enc = DINOv2Encoder(spec.enc_type, cfg.data.resolution, pretrained=False)
        encoders.append(enc)
    return encoders


def build_lpips(cfg: TrainConfig) -> LPIPS:
    try:
        return LPIPS(cfg.loss.vae.lpips_double_rescale, vgg_weights=cfg.loss.lpips_weights)
    except FileNotFoundError as err:
        if not cfg.loss.lpips_allow_random:
            raise
        log0(f"NOTE: {err} loss.lpips_allow_random is set: LPIPS uses a RANDOM VGG16 trunk (demo only)")
        return LPIPS(cfg.loss.vae.lpips_double_rescale, pretrained=False)


def _build_sit_and_vae(cfg: TrainConfig, configs: ModelConfigs, world: int) -> tuple[SiT, AutoencoderKL]:
    """The SiT and the VAE; the VAE's weights and the latent BN's initial statistics from vae.weights if set."""
    sit, vae = SiT(configs.sit), build_vae(configs.vae)
    if cfg.vae.weights is not None:
        load_vae_weights(vae, cfg.vae.weights)
        stats = cfg.vae.latents_stats or latents_stats_path(cfg.vae.weights)
        if os.path.exists(stats):
            bias, scale = load_latents_stats(stats)
            sit.init_bn(latents_scale=scale, latents_bias=bias)
        else:
            log0(f"NOTE: no latents-stats file {stats}: the latent BN starts at mean 0, var 1")
    # PARITY: the original builds pos_embed frozen but its requires_grad(model, True) before each SiT update
    # trains it (gradient, clip norm, AdamW, EMA). Under DDP it then never all-reduces that gradient (frozen
    # when DDP was built), so its ranks drift apart; here it is reduced like every other gradient.
    sit.pos_embed.requires_grad_(not cfg.sit.freeze_pos_embed)
    if world > 1:
        sit.bn.stats_hook = allreduce_stats_hook()
    return sit, vae


def _build_ldm(cfg: TrainConfig, encoders: list, world: int, device: torch.device, *,
               use_deepspeed: bool) -> LdmModels:
    """stage=ldm: the SiT in an engine with its latent BN fixed to the VAE's statistics (the step never updates
    them), the frozen VAE (fp32, eval) built as the latent-cache writer builds it (a demo's random init included),
    the EMA (a copy of the SiT after its BN statistics are set)."""
    sit = SiT(cfg.model_configs().sit)
    vae, bias_C, scale_C = build_frozen_vae(cfg, device)  # ValueError (one line) when the statistics are missing
    sit.init_bn(latents_scale=scale_C, latents_bias=bias_C)
    # PARITY: the original's train_ldm_only.py never re-enables pos_embed (no requires_grad toggle): the LDM configs
    # set sit.freeze_pos_embed=true to match it.
    sit.pos_embed.requires_grad_(not cfg.sit.freeze_pos_embed)
    sit = sit.to(device)
    ema = EMA(sit)
    engine = build_engine(sit, cfg.optim_sit, cfg, world, device, use_deepspeed=use_deepspeed)
    engine.module.train()  # the latent BN still normalises with its running statistics (use_batch_stats=False)
    sit.bn.float()  # DeepSpeed's bf16/fp16 modes cast the BN buffers too: fp32 again, and the exact statistics
    sit.init_bn(latents_scale=scale_C, latents_bias=bias_C)
    return LdmModels(sit=engine, vae=vae, encoders=encoders, ema=ema, latents_stats=(bias_C, scale_C))


def build(cfg: TrainConfig, world: int, device: torch.device, *, use_deepspeed: bool) -> StepModels | LdmModels:
    """The step's models on `device`: SiT, VAE and discriminator in engines (DeepSpeed or PlainEngine), the frozen
    LPIPS and encoders, the EMA (a copy of the SiT after its BN statistics are set, as the original's step 0),
    the LeCam EMAs while that term is on (the original registers its buffers only then). stage=ldm: _build_ldm."""
    # The original turns TF32 on for matmuls and cuDNN (its fp32 parts: LPIPS, VAE/GAN losses, discriminator).
    torch.backends.cuda.matmul.allow_tf32 = cfg.schedule.tf32
    torch.backends.cudnn.allow_tf32 = cfg.schedule.tf32
    torch.manual_seed(cfg.schedule.seed)  # identical initial weights on every rank
    encoders = [e.to(device) for e in build_encoders(cfg)]
    if cfg.stage == "ldm":
        return _build_ldm(cfg, encoders, world, device, use_deepspeed=use_deepspeed)
    sit, vae = _build_sit_and_vae(cfg, cfg.model_configs(), world)
    disc = build_discriminator(cfg.vae.discriminator_weights)
    if cfg.loss.sync_discriminator_bn and world > 1:
        sync_batchnorm_(disc)
    sit, vae, disc = sit.to(device), vae.to(device), disc.to(device)
    ema = EMA(sit)
    lpips = build_lpips(cfg).to(device)
    engines = {name: build_engine(module, getattr(cfg, f"optim_{name}"), cfg, world, device,
                                  use_deepspeed=use_deepspeed)
               for name, module in zip(ENGINES, (sit, vae, disc))}
    for engine in engines.values():
        engine.module.train()
    sit.bn.float()  # DeepSpeed's bf16/fp16 modes cast the module; the latent BN statistics stay fp32 (kernel contract)
    lecam = (LeCamEMA(cfg.loss.vae.lecam_ema_decay).to(device) if cfg.loss.vae.lecam_regularization_weight > 0
             else None)
    return StepModels(sit=engines["sit"], vae=engines["vae"], disc=engines["disc"], lpips=lpips, encoders=encoders,
                      ema=ema, lecam=lecam)
