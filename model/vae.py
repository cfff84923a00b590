"""The VAE of REPA-E (spec §3): LDM/CompVis `AutoencoderKL`, f8d4 (SD-VAE) and f16d32 (IN-VAE, VA-VAE).

    vae = build_vae("f8d4")                              # 83,653,863 parameters, LDM state-dict keys
    load_vae_weights(vae, "e2e-sdvae.pt")               # LDM file, or a diffusers AutoencoderKL file (remapped)
    posterior, z, recon = vae(x)                        # x in [-1, 1], [B, 3, 256, 256]; z [B, 4, 32, 32]
    bias_C, scale_C = load_latents_stats("e2e-sdvae-latents-stats.pt")

Holds: the encoder/decoder building blocks, DiagonalGaussianDistribution, AutoencoderKL, the VAE
registry, the diffusers -> LDM key remap and the latents-stats file format. Must not hold losses (the
VAE loss lives in model/losses.py) or a weight-file reader (model/weights.py reads every file).
"""

# B batch, C channels, H/W height/width, E latent channels (embed_dim)

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .weights import StateDict, load_state_dict_checked, read_weight_file, save_weights, state_dict_from

# ---------------------------------------------------------------------------------------------------
# Config and registry
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """Shape of an LDM AutoencoderKL (REPA-E: ch 128, 2 res blocks, attention at 16x16, 256 px)."""

    embed_dim: int = 4
    """Latent channels E (the encoder outputs 2E: mean and log-variance)."""
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
        if self.embed_dim < 1 or self.ch < 1 or self.num_res_blocks < 1 or not self.ch_mult:
            raise ValueError(f"VAEConfig: embed_dim, ch, num_res_blocks must be >= 1 and ch_mult non-empty, got {self}")
        if any(self.ch * m % 32 for m in self.ch_mult):
            raise ValueError(f"VAEConfig: every level width ch*mult must be divisible by 32 (GroupNorm), got {self}")

    @property
    def factor(self) -> int:
        """Spatial downsampling factor (8 for f8d4, 16 for f16d32)."""
        return 2 ** (len(self.ch_mult) - 1)


VAE_CONFIGS: dict[str, VAEConfig] = {
    "f8d4": VAEConfig(embed_dim=4, ch_mult=(1, 2, 4, 4)),
    "f16d32": VAEConfig(embed_dim=32, ch_mult=(1, 1, 2, 2, 4)),
}


# ---------------------------------------------------------------------------------------------------
# Building blocks (LDM `diffusionmodules/model.py`, without the timestep embedding: temb_ch = 0)
# ---------------------------------------------------------------------------------------------------


def Normalize(channels: int) -> nn.GroupNorm:  # noqa: N802 (the original's name)
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), as the original writes it (same function as F.silu)."""
    return x * torch.sigmoid(x)


class Upsample(nn.Module):
    """Nearest x2, then conv 3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """Pad (0, 1, 0, 1) with zeros, then conv 3x3 stride 2 without padding."""

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
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        B, C, H, W = h.shape
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        # PARITY: the original writes bmm + softmax + bmm; SDPA is the same math (scale C^-0.5 is its default).
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(out.transpose(-1, -2).reshape(B, C, H, W))


def _level(blocks: Sequence[nn.Module], attns: Sequence[nn.Module]) -> nn.Module:
    """One resolution level: `block` and `attn` lists (the original's bare nn.Module container)."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


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
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.embed_dim, kernel_size=3, stride=1, padding=1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_B3HW)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in, mid, up levels from lowest resolution (num_res_blocks+1 ResnetBlocks [+ Attn], Upsample), out."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult, L = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        block_in = ch * mult[-1]
        res = cfg.resolution // 2 ** (L - 1)
        self.conv_in = nn.Conv2d(cfg.embed_dim, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout)
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
            levels.insert(0, level)  # up.0 is the highest resolution, as in the LDM keys
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z_BEhw: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z_BEhw)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------------
# Posterior and the autoencoder
# ---------------------------------------------------------------------------------------------------


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) per latent element from the encoder's 2E channels; logvar clamped to [-30, 20]."""

    def __init__(self, moments_B2Ehw: torch.Tensor):
        self.moments = moments_B2Ehw
        self.mean, self.logvar = torch.chunk(moments_B2Ehw, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, 1) in fp32 on the latents' device (from `generator` when given)."""
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
        self.config = cfg = config or VAE_CONFIGS["f8d4"]
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.embed_dim, 2 * cfg.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, kernel_size=1)

    def _check(self, name: str, x: torch.Tensor, channels: int, factor: int) -> None:
        if x.dim() != 4 or x.shape[1] != channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"VAE: {name} must be [B, {channels}, H, W] with H, W multiples of {factor}, got "
                             f"{list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"VAE: {name} must be a float tensor in [-1, 1] (uint8 / 127.5 - 1), got {x.dtype}")

    def encode(self, x_B3HW: torch.Tensor) -> DiagonalGaussianDistribution:
        self._check("x", x_B3HW, self.config.in_channels, self.config.factor)
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x_B3HW)))

    def decode(self, z_BEhw: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] (not clamped). PARITY: the original wraps it as `.sample` of a dict; this returns it."""
        self._check("z", z_BEhw, self.config.embed_dim, 1)
        return self.decoder(self.post_quant_conv(z_BEhw))

    def forward(self, x_B3HW: torch.Tensor, *, sample_posterior: bool = True, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> tuple[DiagonalGaussianDistribution, torch.Tensor, torch.Tensor]:
        """(posterior, z, recon): z = mean + std * eps with eps = `noise` when given (fp32, like the mean),
        else drawn from `generator`; z = mode() when sample_posterior is False."""
        posterior = self.encode(x_B3HW)
        if not sample_posterior:
            z = posterior.mode()
        elif noise is not None:
            if noise.shape != posterior.mean.shape:
                raise ValueError(f"VAE: noise {list(noise.shape)} must match the latents {list(posterior.mean.shape)}")
            z = posterior.mean + posterior.std * noise
        else:
            z = posterior.sample(generator)
        return posterior, z, self.decode(z)


def build_vae(name: str | VAEConfig = "f8d4") -> AutoencoderKL:
    """AutoencoderKL from a registry name ("f8d4", "f16d32") or a VAEConfig."""
    if isinstance(name, VAEConfig):
        return AutoencoderKL(name)
    if name not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE {name!r}; known: {', '.join(VAE_CONFIGS)}")
    return AutoencoderKL(VAE_CONFIGS[name])


# ---------------------------------------------------------------------------------------------------
# diffusers AutoencoderKL files -> LDM keys
# ---------------------------------------------------------------------------------------------------

# (diffusers pattern, LDM replacement), applied to the key after the up-block index is flipped.
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
_LDM_KEY = re.compile(r"^(encoder|decoder)\.(conv_in|conv_out|norm_out|mid|down|up)\.|^(quant_conv|post_quant_conv)\.")


def is_diffusers_state_dict(sd: StateDict) -> bool:
    """True for a diffusers AutoencoderKL layout (down_blocks / up_blocks / mid_block names)."""
    return any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in sd)


def diffusers_to_ldm(sd: StateDict) -> StateDict:
    """Rename a diffusers AutoencoderKL state dict to LDM keys; attention Linear [C, C] -> conv [C, C, 1, 1].

    diffusers numbers decoder up_blocks from the lowest resolution; LDM's `up.{i}` from the highest, so
    index i becomes L - 1 - i. Keys that map to no LDM name raise ValueError naming them.
    """
    ups = [int(m.group(1)) for k in sd if (m := re.match(r"^decoder\.up_blocks\.(\d+)\.", k))]
    num_up = max(ups) + 1 if ups else 0
    out, unknown = {}, []
    for key, value in sd.items():
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up_blocks.{num_up - 1 - int(m.group(1))}.", key)
        for pattern, repl in _DIFFUSERS_RULES:
            new = re.sub(pattern, repl, new)
        if not _LDM_KEY.match(new):
            unknown.append(key)
            continue
        if re.search(r"\.attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$", new) and value.dim() == 2:
            value = value[:, :, None, None]
        out[new] = value
    if unknown:
        raise ValueError(f"diffusers VAE state dict: {len(unknown)} keys have no LDM name: {unknown[:10]}")
    return out


def load_vae_weights(vae: AutoencoderKL, path: str | os.PathLike, *, key: str | None = None,
                     strict: bool = True) -> AutoencoderKL:
    """Load an LDM-format (`.pt` / `.safetensors`, or a checkpoint's `vae` entry with key="vae") or a
    diffusers-format file into `vae`, strictly by default (spec §9.1-5: the original's strict=False
    silently left the VAE random on a diffusers file)."""
    sd = state_dict_from(read_weight_file(path, what="VAE weight file"), key, source=os.fspath(path))
    if is_diffusers_state_dict(sd):
        sd = diffusers_to_ldm(sd)
    load_state_dict_checked(vae, sd, strict=strict, source=os.fspath(path))
    return vae


# ---------------------------------------------------------------------------------------------------
# Latents-stats files: `<vae>-latents-stats.pt` = {latents_scale, latents_bias}
# ---------------------------------------------------------------------------------------------------


def latents_stats_path(vae_path: str | os.PathLike) -> str:
    """`<vae>.pt` -> `<vae>-latents-stats.pt` (the original's naming)."""
    root, ext = os.path.splitext(os.fspath(vae_path))
    return f"{root}-latents-stats{ext or '.pt'}"


def load_latents_stats(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias [C], scale [C]) from a latents-stats file; normalise with (z - bias) * scale."""
    obj = read_weight_file(path, what="latents-stats file")
    missing = [k for k in ("latents_bias", "latents_scale") if k not in obj]
    if missing:
        raise ValueError(f"latents-stats file {os.fspath(path)} lacks {missing}; it holds {sorted(obj)}")
    bias, scale = obj["latents_bias"].float().reshape(-1), obj["latents_scale"].float().reshape(-1)
    if bias.shape != scale.shape:
        raise ValueError(f"latents-stats file {os.fspath(path)}: bias {list(bias.shape)} and scale "
                         f"{list(scale.shape)} differ")
    return bias, scale


def save_latents_stats(path: str | os.PathLike, bias: torch.Tensor, scale: torch.Tensor) -> None:
    """Write {latents_scale, latents_bias} as [1, C, 1, 1] fp32 tensors, as save_vae_weights.py does."""
    save_weights({"latents_scale": scale.detach().float().reshape(1, -1, 1, 1).cpu(),
                  "latents_bias": bias.detach().float().reshape(1, -1, 1, 1).cpu()}, path)
