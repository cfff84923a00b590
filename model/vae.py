"""The VAE of REPA-E (docs/METHOD.md#vae): LDM/CompVis `AutoencoderKL`, f8d4 (SD-VAE) and f16d32 (IN-VAE, VA-VAE).

    vae = build_vae("f8d4")                              # 83,653,863 parameters, LDM state-dict keys
    load_vae_weights(vae, "e2e-sdvae.pt")               # LDM file, or a diffusers AutoencoderKL file (remapped)
    posterior, z, recon = vae(x)                        # x in [-1, 1], [B, 3, 256, 256]; z [B, 4, 32, 32]
    bias_C, scale_C = load_latents_stats("e2e-sdvae-latents-stats.pt")   # normalise: (z - bias) * scale

Holds: the encoder/decoder building blocks, DiagonalGaussianDistribution, AutoencoderKL, the VAE
registry, the diffusers <-> LDM key remaps and the diffusers config.json, the config read back from a state
dict's shapes and the latents-stats file format. Must not hold losses (the VAE loss lives in model/losses.py),
the latent BatchNorm (kernels/) or a weight-file reader (model/weights.py reads and writes every file).
"""

# B batch, F feature channels, H, W image height and width, h, w latent height and width, C latent channels
# (embed_dim)

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from .weights import StateDict, load_weights, read_weight_file, save_weights

# ---------------------------------------------------------------------------------------------------
# Config and registry
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """Shape of an LDM AutoencoderKL (REPA-E: ch 128, 2 res blocks, attention at 16x16, 256 px)."""

    embed_dim: int = 4
    """Latent channels E (the encoder outputs 2E: mean and log-variance, `double_z`)."""
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multiplier per level; len(ch_mult) - 1 downsamplings by 2."""
    ch: int = 128
    """Base width."""
    num_res_blocks: int = 2
    """ResnetBlocks per encoder level (the decoder has one more)."""
    attn_resolutions: tuple[int, ...] = (16,)
    """Feature-map sides (for a `resolution` input) that get an AttnBlock after each ResnetBlock."""
    resolution: int = 256
    """Nominal input side: decides where attention sits (any multiple of the factor runs)."""
    in_channels: int = 3
    """Image channels."""
    dropout: float = 0.0
    """ResnetBlock dropout (0 in REPA-E)."""

    def __post_init__(self):
        for name in ("embed_dim", "ch", "num_res_blocks", "resolution", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"VAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"VAEConfig.ch_mult must be a non-empty list of ints >= 1, got {self.ch_mult}")
        if any(self.ch * m % 32 for m in self.ch_mult):
            raise ValueError(f"VAEConfig.ch_mult: every level width ch * mult must be divisible by 32 (GroupNorm "
                             f"groups), got ch={self.ch}, ch_mult={self.ch_mult}")
        if self.resolution % self.factor:
            raise ValueError(f"VAEConfig.resolution={self.resolution} must be a multiple of the factor {self.factor}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VAEConfig.dropout must be in [0, 1), got {self.dropout}")
        # JSON configs give lists; keep the frozen config hashable.
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))

    @property
    def factor(self) -> int:
        """Spatial downsampling factor (8 for f8d4, 16 for f16d32)."""
        return 2 ** (len(self.ch_mult) - 1)


VAE_CONFIGS: dict[str, VAEConfig] = {
    "f8d4": VAEConfig(embed_dim=4, ch_mult=(1, 2, 4, 4)),  # SD-VAE layout
    "f16d32": VAEConfig(embed_dim=32, ch_mult=(1, 1, 2, 2, 4)),  # IN-VAE / VA-VAE layout
}


# ---------------------------------------------------------------------------------------------------
# Building blocks (LDM `diffusionmodules/model.py`, without the timestep embedding: temb_ch = 0)
# ---------------------------------------------------------------------------------------------------


def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps=1e-6, affine): the original's `Normalize`."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x).

    PARITY: the original writes `x * torch.sigmoid(x)`; F.silu is the same function (equal up to rounding).
    PERF: one kernel instead of two, and autograd saves only x instead of x and sigmoid(x), which at
    256 px is one full-resolution activation less per ResnetBlock in the VAE backward.
    """
    return F.silu(x)


class Upsample(nn.Module):
    """Nearest x2, then conv 3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """Pad (0, 1, 0, 1) with zeros (right and bottom only), then conv 3x3 stride 2 without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    """norm1, swish, conv1, norm2, swish, dropout, conv2, + (1x1 nin_shortcut of) x."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:  # the key exists only then (LDM: nin_shortcut, diffusers: conv_shortcut)
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions; q, k, v, proj_out are 1x1 convs, scale C^-0.5."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x_BFHW: torch.Tensor) -> torch.Tensor:
        h = self.norm(x_BFHW)
        B, C, H, W = h.shape
        # (B, C, H, W) -> (B, 1 head, HW, C) for q, k and v
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        # PARITY: the original writes bmm + softmax + bmm; SDPA is the same math (scale C^-0.5 is its default).
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x_BFHW + self.proj_out(out.transpose(-1, -2).reshape(B, C, H, W))


def _level(blocks: Sequence[nn.Module], attns: Sequence[nn.Module]) -> nn.Module:
    """One resolution level: `block` and `attn` lists (the original's bare nn.Module container)."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _mid(channels: int, dropout: float) -> nn.Module:
    """block_1, attn_1, block_2 at the lowest resolution (encoder and decoder alike)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(nn.Module):
    """conv_in, down levels (ResnetBlocks [+ AttnBlocks], Downsample except last), mid, norm_out, conv_out -> 2E."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult, L = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, kernel_size=3, stride=1, padding=1)
        res, block_in = cfg.resolution, ch
        self.down = nn.ModuleList()
        for i in range(L):
            block_out = ch * mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i != L - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _mid(block_in, cfg.dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.embed_dim, kernel_size=3, stride=1, padding=1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_B3HW)  # (B, ch, H, W)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))  # (B, ch * ch_mult[-1], h, w)
        return self.conv_out(swish(self.norm_out(h)))  # (B, 2E, h, w)


class Decoder(nn.Module):
    """conv_in, mid, up levels from lowest resolution (num_res_blocks+1 ResnetBlocks [+ Attn], Upsample), out."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult, L = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        block_in = ch * mult[-1]
        res = cfg.resolution // 2 ** (L - 1)
        self.conv_in = nn.Conv2d(cfg.embed_dim, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid(block_in, cfg.dropout)
        # Built from the lowest resolution up, stored so that `up.0` is the highest (the LDM key order).
        levels = []
        for i in reversed(range(L)):
            block_out = ch * mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z_BChw)  # (B, ch * ch_mult[-1], h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))  # (B, 3, H, W)


# ---------------------------------------------------------------------------------------------------
# Posterior and the autoencoder
# ---------------------------------------------------------------------------------------------------


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) per latent element from the encoder's 2E channels; logvar clamped to [-30, 20]."""

    def __init__(self, moments_B2Ehw: torch.Tensor):
        self.moments = moments_B2Ehw
        self.mean, logvar = torch.chunk(moments_B2Ehw, 2, dim=1)  # (B, E, h, w) each
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, 1) in fp32 on the latents' device (from `generator` when given)."""
        # PARITY: the original draws torch.randn(mean.shape) from the global RNG; the math is the same.
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=torch.float32)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample: 0.5 * sum_{E,h,w}(mean^2 + var - 1 - logvar) -> [B]."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """encoder -> quant_conv (2E -> 2E) -> posterior; post_quant_conv (E -> E) -> decoder."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else VAE_CONFIGS["f8d4"]
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.embed_dim, 2 * cfg.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, kernel_size=1)

    def _check(self, name: str, x: torch.Tensor, channels: int, factor: int) -> None:
        """ValueError unless x is a float [B, channels, H, W] with H, W multiples of factor."""
        if x.dim() != 4 or x.shape[1] != channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"VAE: {name} must be [B, {channels}, H, W] with H, W multiples of {factor}, got "
                             f"{list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"VAE: {name} must be a float tensor in [-1, 1] (uint8 / 127.5 - 1), got {x.dtype} "
                             f"{list(x.shape)}")

    def encode(self, x_B3HW: torch.Tensor) -> DiagonalGaussianDistribution:
        """Posterior over the [B, E, H/f, W/f] latents of images in [-1, 1]."""
        self._check("x", x_B3HW, self.config.in_channels, self.config.factor)
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x_B3HW)))

    def decode(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] (not clamped), [B, 3, h*f, w*f]."""
        # PARITY: the original returns a dict-like with `.sample`; this returns that tensor itself.
        self._check("z", z_BChw, self.config.embed_dim, 1)
        return self.decoder(self.post_quant_conv(z_BChw))

    def forward(self, x_B3HW: torch.Tensor, *, sample_posterior: bool = True, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> tuple[DiagonalGaussianDistribution, torch.Tensor, torch.Tensor]:
        """(posterior, z, recon): z = mean + std * eps with eps = `noise` when given (fp32, like the mean),
        else drawn from `generator` (posterior.sample); z = mode() when sample_posterior is False."""
        posterior = self.encode(x_B3HW)
        if not sample_posterior:
            z = posterior.mode()
        elif noise is not None:
            # Noise drawn by the caller (per-sample streams that do not depend on the world size).
            if noise.shape != posterior.mean.shape:
                raise ValueError(f"VAE: noise {list(noise.shape)} must match the latents {list(posterior.mean.shape)}")
            z = posterior.mean + posterior.std * noise
        else:
            z = posterior.sample(generator)
        return posterior, z, self.decode(z)


def vae_config(name: str = "f8d4", **overrides) -> VAEConfig:
    """The registry config `name` with fields replaced by `overrides` (lists allowed: VAEConfig makes tuples);
    an unknown name or field is a ValueError naming it."""
    if name not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE {name!r}; known: {', '.join(VAE_CONFIGS)}")
    known = [f.name for f in fields(VAEConfig)]
    unknown = [k for k in overrides if k not in known]
    if unknown:
        raise ValueError(f"unknown VAE config key {unknown[0]!r} (known: {', '.join(known)})")
    return replace(VAE_CONFIGS[name], **overrides)


def build_vae(name: str | VAEConfig = "f8d4") -> AutoencoderKL:
    """AutoencoderKL from a registry name ("f8d4", "f16d32") or a VAEConfig (randomly initialized)."""
    return AutoencoderKL(name if isinstance(name, VAEConfig) else vae_config(name))


# ---------------------------------------------------------------------------------------------------
# diffusers AutoencoderKL files <-> LDM keys, and the diffusers config
# ---------------------------------------------------------------------------------------------------

# (diffusers pattern, LDM replacement), applied in order after the decoder up-block index is flipped.
_DIFFUSERS_RULES = [
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.attentions\.(\d+)\.", r"encoder.down.\1.attn.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.up.\1.block.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.attentions\.(\d+)\.", r"decoder.up.\1.attn.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.\1.upsample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
    (r"\.conv_shortcut\.", r".nin_shortcut."),
    # attention projections: current diffusers names, then the pre-0.14 ones
    (r"\.attn(_1|\.\d+)\.group_norm\.", r".attn\1.norm."),
    (r"\.attn(_1|\.\d+)\.(to_q|query)\.", r".attn\1.q."),
    (r"\.attn(_1|\.\d+)\.(to_k|key)\.", r".attn\1.k."),
    (r"\.attn(_1|\.\d+)\.(to_v|value)\.", r".attn\1.v."),
    (r"\.attn(_1|\.\d+)\.(to_out\.0|proj_attn)\.", r".attn\1.proj_out."),
]
# Every name an LDM AutoencoderKL key can have (docs/METHOD.md#vae); a remapped key must match one.
_RESNET = r"block(_[12]|\.\d+)\.(norm1|conv1|norm2|conv2|nin_shortcut)"
_ATTN = r"attn(_1|\.\d+)\.(norm|q|k|v|proj_out)"
_LDM_KEY = re.compile(
    r"^(?:(encoder|decoder)\.(conv_in|norm_out|conv_out)"
    rf"|(encoder|decoder)\.mid\.({_RESNET}|{_ATTN})"
    rf"|encoder\.down\.\d+\.({_RESNET}|{_ATTN}|downsample\.conv)"
    rf"|decoder\.up\.\d+\.({_RESNET}|{_ATTN}|upsample\.conv)"
    r"|quant_conv|post_quant_conv)\.(weight|bias)$"
)
_ATTN_PROJ_WEIGHT = re.compile(r"\.attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$")


def is_diffusers_state_dict(sd: StateDict) -> bool:
    """True for a diffusers AutoencoderKL layout (down_blocks / up_blocks / mid_block names)."""
    return any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in sd)


def diffusers_to_ldm(sd: StateDict) -> StateDict:
    """Rename a diffusers AutoencoderKL state dict to LDM keys; attention Linear [C, C] -> conv [C, C, 1, 1].

    diffusers numbers decoder up_blocks from the lowest resolution, LDM's `up.{i}` from the highest, so
    up_blocks.i becomes up.{L-1-i}. Keys that map to no LDM name raise ValueError naming them. Tensors
    are not copied (the attention weights are views).
    """
    ups = [int(m.group(1)) for k in sd if (m := re.match(r"^decoder\.up_blocks\.(\d+)\.", k))]
    num_up = max(ups) + 1 if ups else 0
    out, unknown = {}, []
    for key, value in sd.items():
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up_blocks.{num_up - 1 - int(m.group(1))}.",
                     key)
        for pattern, repl in _DIFFUSERS_RULES:
            new = re.sub(pattern, repl, new)
        if not _LDM_KEY.match(new):
            unknown.append(key)
            continue
        if _ATTN_PROJ_WEIGHT.search(new) and value.dim() == 2:
            value = value[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        out[new] = value
    if unknown:
        raise ValueError(f"diffusers VAE state dict: {len(unknown)} keys have no LDM name: {unknown[:10]}")
    return out


# LDM -> diffusers: the inverse of the rules above (after the decoder up-level index is flipped).
_LDM_TO_DIFFUSERS_RULES = [
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."),
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.up\.(\d+)\.block\.", r"decoder.up_blocks.\1.resnets."),
    (r"^decoder\.up\.(\d+)\.attn\.", r"decoder.up_blocks.\1.attentions."),
    (r"^decoder\.up\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"\.nin_shortcut\.", r".conv_shortcut."),
    (r"\.attentions\.(\d+)\.norm\.", r".attentions.\1.group_norm."),
    (r"\.attentions\.(\d+)\.(q|k|v)\.", r".attentions.\1.to_\2."),
    (r"\.attentions\.(\d+)\.proj_out\.", r".attentions.\1.to_out.0."),
]


def ldm_to_diffusers(sd: StateDict) -> StateDict:
    """Rename an LDM AutoencoderKL state dict to diffusers keys; attention conv [C, C, 1, 1] -> Linear [C, C].

    The exact inverse of diffusers_to_ldm (current diffusers names: to_q/to_k/to_v/to_out.0, group_norm):
    LDM `up.{i}` becomes up_blocks.{L-1-i}. Keys that are not LDM AutoencoderKL names raise ValueError naming
    them. Tensors are not copied (the attention weights are views).
    """
    unknown = [k for k in sd if not _LDM_KEY.match(k)]
    if unknown:
        raise ValueError(f"LDM VAE state dict: {len(unknown)} keys are not AutoencoderKL names: {unknown[:10]}")
    ups = [int(m.group(1)) for k in sd if (m := re.match(r"^decoder\.up\.(\d+)\.", k))]
    num_up = max(ups) + 1 if ups else 0
    out = {}
    for key, value in sd.items():
        new = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{num_up - 1 - int(m.group(1))}.", key)
        for pattern, repl in _LDM_TO_DIFFUSERS_RULES:
            new = re.sub(pattern, repl, new)
        if _ATTN_PROJ_WEIGHT.search(key) and value.dim() == 4:
            value = value[:, :, 0, 0]  # 1x1 conv [C, C, 1, 1] -> Linear [C, C]
        out[new] = value
    return out


DIFFUSERS_VERSION = "0.42.1"
"""`_diffusers_version` written into config.json: the diffusers release the exported layout was checked with
(tests/train/test_export_formats.py loads it with the installed one; every key below exists since 0.30)."""


def diffusers_config(cfg: VAEConfig, latents_mean: Sequence[float], latents_std: Sequence[float], *,
                     sample_size: int | None = None) -> dict:
    """The config.json of a diffusers `AutoencoderKL` with the modules of `cfg` (ldm_to_diffusers gives its
    weights), carrying the latent statistics.

    scaling_factor is 1.0 and shift_factor None: the per-channel latents_mean / latents_std (the EMA latent BN's
    running_mean and sqrt(running_var)) are the whole normalisation, z_norm = (z - latents_mean) / latents_std,
    and decoding takes z = z_norm * latents_std + latents_mean (diffusers' SDXL convention with scaling_factor
    1). A pipeline that only knows a scalar shift_factor fails on None rather than skipping the statistics.
    sample_size (diffusers' tiling size): the training resolution when given, else cfg.resolution.
    """
    mean, std = [float(v) for v in latents_mean], [float(v) for v in latents_std]
    if len(mean) != cfg.embed_dim or len(std) != cfg.embed_dim:
        raise ValueError(f"diffusers_config: latents_mean ({len(mean)}) and latents_std ({len(std)}) need one value "
                         f"per latent channel ({cfg.embed_dim})")
    levels, attn = range(len(cfg.ch_mult)), _attn_levels(cfg)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
        "down_block_types": ["AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D" for i in levels],
        # diffusers lists the decoder from the lowest resolution up
        "up_block_types": ["AttnUpDecoderBlock2D" if i in attn else "UpDecoderBlock2D" for i in reversed(levels)],
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu", "latent_channels": cfg.embed_dim, "norm_num_groups": 32,  # Normalize(): 32 groups
        "sample_size": sample_size or cfg.resolution, "scaling_factor": 1.0, "shift_factor": None,
        "latents_mean": mean, "latents_std": std, "force_upcast": True, "use_quant_conv": True,
        "use_post_quant_conv": True, "mid_block_add_attention": True,
    }


def _ldm_layout(sd: StateDict) -> StateDict:
    """The state dict in LDM names: diffusers layouts are remapped, LDM ones returned as they are."""
    return diffusers_to_ldm(sd) if is_diffusers_state_dict(sd) else sd


def load_vae_weights(vae: AutoencoderKL, path: str | os.PathLike, *, key: str | None = None,
                     strict: bool = True) -> AutoencoderKL:
    """Load an LDM-format (`.pt` / `.safetensors`, or a checkpoint's `vae` entry with key="vae") or a
    diffusers-format file into `vae`, strictly by default (docs/METHOD.md#bugs-of-the-original-code, item 5: the
    original's strict=False silently left the VAE random on a diffusers file)."""
    return load_weights(vae, path, key=key, strict=strict, remap=_ldm_layout, what="VAE weight file")


def _attn_levels(cfg: VAEConfig) -> tuple[int, ...]:
    """Encoder levels that hold AttnBlocks (level i sees side resolution / 2^i)."""
    return tuple(i for i in range(len(cfg.ch_mult)) if cfg.resolution // 2**i in cfg.attn_resolutions)


def vae_config_from_state_dict(sd: StateDict) -> VAEConfig:
    """The shape of the AutoencoderKL an LDM-layout state dict belongs to, read from its keys and shapes: the
    registry config that builds the same modules when there is one, else a config with resolution 256 (which
    only places the attention). ValueError naming the key it lacks; a strict load then checks every tensor."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ValueError(f"not an AutoencoderKL state dict in LDM or diffusers layout: no {key}")
        return tuple(sd[key].shape)

    def count(pattern: str) -> int:  # 1 + the largest index the pattern's group takes (at least 1)
        found = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
        return 1 + max(found, default=0)

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    embed_dim = shape("post_quant_conv.weight")[0]
    levels, blocks = count(r"encoder\.down\.(\d+)\."), count(r"encoder\.down\.0\.block\.(\d+)\.")
    ch_mult = tuple(shape(f"encoder.down.{i}.block.0.conv2.weight")[0] // ch for i in range(levels))
    attn = tuple(i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in sd)
    cfg = VAEConfig(embed_dim=embed_dim, ch_mult=ch_mult, ch=ch, num_res_blocks=blocks,
                    attn_resolutions=tuple(256 >> i for i in attn), in_channels=in_channels)
    key = (cfg.embed_dim, cfg.ch_mult, cfg.ch, cfg.num_res_blocks, cfg.in_channels, attn)
    same = [c for c in VAE_CONFIGS.values() if (c.embed_dim, c.ch_mult, c.ch, c.num_res_blocks, c.in_channels,
                                                 _attn_levels(c)) == key]
    return same[0] if same else cfg


# ---------------------------------------------------------------------------------------------------
# Latents-stats files: `<vae>-latents-stats.pt` = {latents_scale, latents_bias}, normalise (z - bias) * scale
# ---------------------------------------------------------------------------------------------------


def latents_stats_path(vae_path: str | os.PathLike) -> str:
    """`<vae>.pt` -> `<vae>-latents-stats.pt` (the original's naming)."""
    root, ext = os.path.splitext(os.fspath(vae_path))
    return f"{root}-latents-stats{ext or '.pt'}"


def _per_channel(t: torch.Tensor, name: str, source: str) -> torch.Tensor:
    """[C] or [1, C, 1, 1] -> fp32 [C]; any other shape is a ValueError naming it."""
    if not (t.dim() == 1 or (t.dim() == 4 and t.shape[0] == t.shape[2] == t.shape[3] == 1)):
        raise ValueError(f"{source}: {name} must be [C] or [1, C, 1, 1], got {list(t.shape)}")
    return t.detach().float().reshape(-1)


def load_latents_stats(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias [C], scale [C]) fp32 from a latents-stats file; normalise with (z - bias) * scale."""
    source = f"latents-stats file {os.fspath(path)}"
    obj = read_weight_file(path, what="latents-stats file")
    missing = [k for k in ("latents_bias", "latents_scale") if k not in obj]
    if missing:
        raise ValueError(f"{source} lacks {missing}; it holds {sorted(obj)}")
    bias = _per_channel(obj["latents_bias"], "latents_bias", source)
    scale = _per_channel(obj["latents_scale"], "latents_scale", source)
    if bias.shape != scale.shape:
        raise ValueError(f"{source}: latents_bias {list(bias.shape)} and latents_scale {list(scale.shape)} differ")
    return bias, scale


def save_latents_stats(path: str | os.PathLike, bias: torch.Tensor, scale: torch.Tensor) -> None:
    """Write {latents_scale, latents_bias} as [1, C, 1, 1] fp32 tensors, as save_vae_weights.py does.

    `.pt` is the original's format; `.safetensors` also works (both are read by load_latents_stats).
    """
    source = f"save_latents_stats({os.fspath(path)})"
    bias_C, scale_C = _per_channel(bias, "bias", source), _per_channel(scale, "scale", source)
    if bias_C.shape != scale_C.shape:
        raise ValueError(f"{source}: bias {list(bias.shape)} and scale {list(scale.shape)} differ in channels")
    save_weights({"latents_scale": scale_C.cpu().reshape(1, -1, 1, 1),
                  "latents_bias": bias_C.cpu().reshape(1, -1, 1, 1)}, path)
