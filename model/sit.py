"""SiT (Scalable Interpolant Transformer) of REPA-E: the module tree, keys, init and forward of docs/METHOD.md#sit.

    model = build_sit("SiT-XL/2", input_size=32, in_channels=4)          # f8d4 latents, T = 256
    out = model(z, y, t, noise)                                          # BN by model.training
    out.v_pred, out.v_target, out.zs_tilde                               # losses live in model/losses.py

Holds: SiTConfig + the `SiT_models` registry, the embedders, SiTBlock, FinalLayer, SiT. Must not hold
losses, time sampling or optimizer code (the original computes its loss and samples t inside forward;
here t, noise and the label-drop mask are arguments).

State-dict keys are those of the original (pos_embed first, x_embedder, t_embedder, y_embedder,
blocks.{i}, projectors.{j}, final_layer, bn last), so released `model`/`ema` entries load strictly.

Every norm+modulate runs through `repae.kernels.adaln` (fused Triton kernel, or the eager reference
with backend "eager"), and the gated residual of each branch is fused into the *next* norm: a block
hands its MLP branch (y, gate) on, and the next block's first norm computes x + gate * y and the
LayerNorm in one pass. The latent BatchNorm and the flow interpolation are one `latent_bn_interp` call.
"""

# B batch, T tokens, D hidden, C latent channels, H, W latent sides, P patch size, F patch features (P*P*C),
# E encoder width

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from repae.kernels import BACKENDS, PATH_TYPES, LatentBatchNorm, adaln, autocast_out_dtype

from .attention import ATTN_BACKENDS, Attention

# ---------------------------------------------------------------------------------------------------
# Config and registry
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SiTConfig:
    """Everything that shapes a SiT. Field names are the original constructor's (args.json) names."""

    input_size: int = 32
    """Latent height = width (resolution // VAE factor: 32 for f8d4 at 256 px, 16 for f16d32)."""
    patch_size: int = 2
    """Patch side p; T = (input_size / p)^2 tokens."""
    in_channels: int = 4
    """Latent channels C (4 for f8d4, 32 for f16d32); also the output channels."""
    hidden_size: int = 1152
    """Width D of the residual stream (the final layer uses the same width)."""
    depth: int = 28
    """Number of SiT blocks."""
    num_heads: int = 16
    """Attention heads (head dim = hidden_size / num_heads: 72 for XL)."""
    mlp_ratio: float = 4.0
    """MLP hidden = int(hidden_size * mlp_ratio)."""
    class_dropout_prob: float = 0.1
    """Label-dropout probability (REPA-E --cfg-prob); > 0 adds the null class row num_classes."""
    num_classes: int = 1000
    """Class labels 0..num_classes-1."""
    encoder_depth: int = 8
    """The projector reads the stream after this block (1-indexed); the align pass stops there."""
    z_dims: tuple[int, ...] = (768,)
    """Feature dim of each representation encoder (one projector each): 768 for DINOv2-B."""
    projector_dim: int = 2048
    """Hidden width of the projector MLP."""
    bn_momentum: float | None = 0.1
    """Latent BatchNorm momentum (None = cumulative average)."""
    qk_norm: bool = False
    """LayerNorm on q and k per head (off in REPA-E)."""
    path_type: str = "linear"
    """Interpolant: "linear" (x_t = (1 - t) x0 + t eps) or "cosine"."""
    kernel_backend: str | None = None
    """repae.kernels backend for adaLN and latent BN: None (process default), "auto", "triton", "eager"."""
    attn_backend: str = "auto"
    """Attention backend, see model/attention.py."""

    def __post_init__(self):
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes",
                     "projector_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SiTConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"SiTConfig: input_size={self.input_size} is not divisible by "
                             f"patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"SiTConfig: hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"SiTConfig: hidden_size={self.hidden_size} must be divisible by 4 (2D sin-cos embedding)")
        if not 1 <= self.encoder_depth <= self.depth:
            raise ValueError(f"SiTConfig.encoder_depth={self.encoder_depth} must be in [1, depth={self.depth}]")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"SiTConfig.class_dropout_prob={self.class_dropout_prob} must be in [0, 1)")
        if not self.z_dims or any(not isinstance(d, int) or d < 1 for d in self.z_dims):
            raise ValueError(f"SiTConfig.z_dims must be a non-empty list of positive ints, got {self.z_dims!r}")
        if self.path_type not in PATH_TYPES:
            raise ValueError(f"SiTConfig.path_type must be one of {PATH_TYPES}, got {self.path_type!r}")
        if self.kernel_backend is not None and self.kernel_backend not in BACKENDS:
            raise ValueError(f"SiTConfig.kernel_backend must be None or one of {BACKENDS}, got "
                             f"{self.kernel_backend!r}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"SiTConfig.attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


# name -> (depth, hidden_size, num_heads); every size comes with patch 1, 2, 4 and 8.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
SiT_models: dict[str, dict] = {
    f"SiT-{size}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
    for size, (d, h, n) in _SIZES.items()
    for p in (1, 2, 4, 8)
}

# args.json names of the original that map onto ours under another name.
_ARG_ALIASES = {"cfg_prob": "class_dropout_prob"}
# VAE name -> (downsampling factor, latent channels), to derive input_size / in_channels from args.json.
_VAE_LATENTS = {"f8d4": (8, 4), "f16d32": (16, 32)}
# DINOv2 (and other) encoder widths by the size letter of REPA-E's enc_type "<type>-vit-<size>".
_ENC_DIMS = {"s": 384, "b": 768, "l": 1024, "g": 1536}


def sit_config(name: str | None = None, **overrides) -> SiTConfig:
    """A SiTConfig from a registry name ("SiT-XL/2") and/or explicit fields; unknown fields are errors."""
    kwargs = {}
    if name is not None:
        if name not in SiT_models:
            raise ValueError(f"unknown SiT model {name!r}; known: {', '.join(SiT_models)}")
        kwargs.update(SiT_models[name])
    known = {f.name for f in fields(SiTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown SiT config key(s) {unknown}; known keys: {sorted(known)}")
    kwargs.update(overrides)
    if "z_dims" in kwargs:
        kwargs["z_dims"] = tuple(kwargs["z_dims"])
    return SiTConfig(**kwargs)


def sit_config_from_args(args: Mapping | object) -> SiTConfig:
    """The SiTConfig of a released run, from its args.json dict (or the checkpoint's `args` Namespace).

    Reads the original's names: `model` ("SiT-XL/2"), `resolution` + `vae` (-> input_size, in_channels),
    `enc_type` (-> z_dims), `cfg_prob`, `encoder_depth`, `bn_momentum`, `qk_norm`, `num_classes`,
    `path_type`, `projector_embed_dims`, and the SiT constructor names (`input_size`, `patch_size`,
    `hidden_size`, ..., `z_dims`, `projector_dim`) which win when both are present. Training-only keys
    (lr, batch size, paths, ...) are ignored.
    """
    a = dict(vars(args)) if not isinstance(args, Mapping) else dict(args)
    out: dict = {}
    if "resolution" in a and "vae" in a:
        if a["vae"] not in _VAE_LATENTS:
            raise ValueError(f"args: unknown vae {a['vae']!r}; known: {sorted(_VAE_LATENTS)}")
        factor, channels = _VAE_LATENTS[a["vae"]]
        out.update(input_size=int(a["resolution"]) // factor, in_channels=channels)
    if "enc_type" in a and a["enc_type"]:
        dims = []
        for enc in str(a["enc_type"]).split(","):
            size = enc.strip().split("-")[-1]
            if size not in _ENC_DIMS:
                raise ValueError(f"args: cannot infer the feature dim of encoder {enc!r} (enc_type)")
            dims.append(_ENC_DIMS[size])
        out["z_dims"] = dims
    if a.get("projector_embed_dims"):
        out["z_dims"] = [int(d) for d in str(a["projector_embed_dims"]).split(",")]
    known = {f.name for f in fields(SiTConfig)} - {"kernel_backend", "attn_backend"}
    for key, value in a.items():
        key = _ARG_ALIASES.get(key, key)
        if key in known and value is not None:
            out[key] = value
    dec = a.get("decoder_hidden_size")
    hidden = out.get("hidden_size", SiT_models.get(a.get("model"), {}).get("hidden_size"))
    if dec is not None and hidden is not None and dec != hidden:
        # PARITY: the original FinalLayer is built with decoder_hidden_size and crashes unless it equals
        # hidden_size (the SiT-S bug, docs/METHOD.md#bugs-of-the-original-code item 6); here the final layer always has
        # the stream's width.
        raise ValueError(f"args: decoder_hidden_size={dec} != hidden_size={hidden} is not a trainable SiT")
    return sit_config(a.get("model"), **out)


# ---------------------------------------------------------------------------------------------------
# Embedding layers
# ---------------------------------------------------------------------------------------------------


def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE 1D sin-cos: [len(pos), embed_dim] = concat[sin(pos w), cos(pos w)], w = 1/10000^(i/(D/2)), float64."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE 2D sin-cos table [grid_size^2, embed_dim]: first half from the w coordinate grid, second from h."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)  # w goes first
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


class PatchEmbed(nn.Module):
    """timm PatchEmbed (conv k=p s=p, flatten to tokens, no norm): [B, C, H, W] -> [B, T, D]."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (not scaled by 1000) -> 256 sinusoidal frequencies (cos first) -> MLP -> [B, D]."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """[B, dim] = concat[cos(t f), sin(t f)], f_i = exp(-ln(max_period) i / (dim/2)), in fp32."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
        args = t_B[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        # The table is fp32 (as the original builds it); cast to the weights' dtype so a bf16/fp64 model takes it
        # (no-op for fp32).
        return self.mlp(self.timestep_embedding(t_B, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> [B, D]; row num_classes is the null (CFG) class, present when dropout_prob > 0."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, y_B: torch.Tensor, drop_mask_B: torch.Tensor | None = None) -> torch.Tensor:
        """drop_mask_B (bool [B]) replaces those labels by the null class; None drops nothing."""
        if drop_mask_B is not None:
            if self.dropout_prob <= 0:
                raise ValueError("a label drop mask was given but this SiT has no null class (class_dropout_prob=0)")
            y_B = torch.where(drop_mask_B.to(device=y_B.device, dtype=torch.bool), self.num_classes, y_B)
        return self.embedding_table(y_B)


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """Linear(D, P) -> SiLU -> Linear(P, P) -> SiLU -> Linear(P, E): keys {0,2,4}.{weight,bias}."""
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, z_dim))


# ---------------------------------------------------------------------------------------------------
# Core SiT model
# ---------------------------------------------------------------------------------------------------

Pending = tuple[torch.Tensor, torch.Tensor] | None
"""A gated residual branch (y [B, T, D], gate [B, D]) not yet added to the stream x."""


def add_pending(x_BTD: torch.Tensor, pending: Pending) -> torch.Tensor:
    """x + gate * y, as the original block writes it (eager; used where the stream itself is needed)."""
    if pending is None:
        return x_BTD
    y_BTD, gate_BD = pending
    return x_BTD + gate_BD.unsqueeze(1) * y_BTD


class Mlp(nn.Module):
    """timm Mlp: fc1 -> GELU(tanh) -> fc2 (keys fc1, fc2)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """x += gate_msa * attn(modulate(norm1(x))); x += gate_mlp * mlp(modulate(norm2(x))).

    forward(x, c, pending) takes the previous block's unadded MLP branch and returns (x, pending) with
    this block's MLP branch unadded: the block output is add_pending(x, pending).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *, qk_norm: bool = False,
                 attn_backend: str = "auto", kernel_backend: str | None = None):
        super().__init__()
        # norm1 / norm2 (LayerNorm, no affine, eps 1e-6) have no parameters: they are the adaln calls below.
        self.kernel_backend = kernel_backend
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm, backend=attn_backend)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x_BTD: torch.Tensor, c_BD: torch.Tensor, pending: Pending = None) -> tuple[torch.Tensor, Pending]:
        # (B, D) views of one (B, 6D) tensor: the kernels read strided rows, no copies.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c_BD).chunk(6, dim=1)
        y_prev, gate_prev = pending if pending is not None else (None, None)
        kw = dict(eps=1e-6, out_dtype=autocast_out_dtype(x_BTD), backend=self.kernel_backend)
        # PARITY: with the triton backend the previous branch is added in fp32 inside the fused kernel; the
        # original adds the (autocast-dtype) product gate * y to the fp32 stream. Same math up to one rounding.
        x_BTD, h_BTD = adaln(x_BTD, shift_msa, scale_msa, y=y_prev, gate=gate_prev, **kw)  # norm1
        x_BTD, h_BTD = adaln(x_BTD, shift_mlp, scale_mlp, y=self.attn(h_BTD), gate=gate_msa, **kw)  # norm2
        return x_BTD, (self.mlp(h_BTD), gate_mlp)


class FinalLayer(nn.Module):
    """modulate(norm_final(x), shift, scale) -> Linear(D, p*p*C); adaLN chunk order (shift, scale)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, kernel_backend: str | None = None):
        super().__init__()
        self.kernel_backend = kernel_backend  # norm_final = the adaln call below (no parameters)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x_BTD: torch.Tensor, c_BD: torch.Tensor, pending: Pending = None) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c_BD).chunk(2, dim=1)
        y_prev, gate_prev = pending if pending is not None else (None, None)
        _, h_BTD = adaln(x_BTD, shift, scale, y=y_prev, gate=gate_prev, eps=1e-6, out_dtype=autocast_out_dtype(x_BTD),
                         backend=self.kernel_backend)
        return self.linear(h_BTD)


class SiTOutput(NamedTuple):
    """What a training forward returns (losses are computed by the caller)."""

    v_pred: torch.Tensor | None
    """Velocity prediction [B, C, H, W]; None for align_only."""
    v_target: torch.Tensor
    """Target v* = alpha'_t x0 + sigma'_t eps [B, C, H, W], fp32."""
    zs_tilde: list[torch.Tensor]
    """Projector outputs after block encoder_depth, one [B, T, E] per encoder."""


class SiT(nn.Module):
    """REPA-E's SiT: latent BN + flow interpolation, transformer, projector at encoder_depth."""

    def __init__(self, config: SiTConfig | None = None, **overrides):
        super().__init__()
        cfg = replace(config, **overrides) if config is not None else sit_config(**overrides)
        self.config = cfg
        D, p, C = cfg.hidden_size, cfg.patch_size, cfg.in_channels
        self.in_channels = self.out_channels = C
        self.patch_size, self.num_heads, self.encoder_depth = p, cfg.num_heads, cfg.encoder_depth
        self.path_type = cfg.path_type

        # Registration order = state_dict order: pos_embed (a direct parameter) comes first, bn last.
        self.x_embedder = PatchEmbed(cfg.input_size, p, C, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, D), requires_grad=False)
        self.blocks = nn.ModuleList([
            SiTBlock(D, cfg.num_heads, cfg.mlp_ratio, qk_norm=cfg.qk_norm, attn_backend=cfg.attn_backend,
                     kernel_backend=cfg.kernel_backend)
            for _ in range(cfg.depth)
        ])
        self.projectors = nn.ModuleList([build_projector(D, cfg.projector_dim, z) for z in cfg.z_dims])
        self.final_layer = FinalLayer(D, p, C, kernel_backend=cfg.kernel_backend)
        self.bn = LatentBatchNorm(C, eps=1e-4, momentum=cfg.bn_momentum, backend=cfg.kernel_backend)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Spec §2.3: xavier Linear / zero bias, sin-cos pos_embed, N(0, .02) embeddings, zero adaLN and output."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid = int(self.x_embedder.num_patches**0.5)
        self.pos_embed.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)).float()[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def init_bn(self, *, latents_scale: torch.Tensor, latents_bias: torch.Tensor) -> None:
        """Latent BN statistics from a `-latents-stats.pt` pair (mean = bias, var = 1/scale^2).

        Keyword-only: the original's positional order is (scale, bias), load_latents_stats returns (bias, scale).
        """
        self.bn.init_stats(latents_scale=latents_scale, latents_bias=latents_bias)

    def unpatchify(self, x_BTF: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*C] (c fastest) -> [B, C, H, W]."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x_BTF.shape[1] ** 0.5)
        x = x_BTF.reshape(x_BTF.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x_BTF.shape[0], c, h * p, w * p)

    def _check_latents(self, name: str, z: torch.Tensor) -> None:
        s = self.config.input_size
        if z.dim() != 4 or tuple(z.shape[1:]) != (self.in_channels, s, s):
            raise ValueError(f"SiT: {name} must be [B, {self.in_channels}, {s}, {s}], got {list(z.shape)}")

    def _embed(self, x_t_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor,
               drop_mask_B: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # x_t is fp32 from the BN; a model cast to bf16/fp64 takes it in its own dtype (no-op for fp32).
        x_BTD = self.x_embedder(x_t_BCHW.to(self.x_embedder.proj.weight.dtype)) + self.pos_embed  # fp32 stream
        c_BD = self.t_embedder(t_B) + self.y_embedder(y_B, drop_mask_B)
        return x_BTD, c_BD

    def _project(self, x_BTD: torch.Tensor) -> list[torch.Tensor]:
        B, T, D = x_BTD.shape
        return [proj(x_BTD.reshape(-1, D)).reshape(B, T, -1) for proj in self.projectors]

    def forward(self, z_BCHW: torch.Tensor, y_B: torch.Tensor, t_B: torch.Tensor, noise_BCHW: torch.Tensor, *,
                drop_mask_B: torch.Tensor | None = None, align_only: bool = False,
                use_batch_stats: bool | None = None) -> SiTOutput:
        """Training forward on clean latents z (docs/METHOD.md#sit, without the loss).

        x0 = BN(z) (batch statistics, updating the running ones, when use_batch_stats, default
        self.training; else the running statistics), x_t = alpha_t x0 + sigma_t eps, v* = alpha'_t x0 +
        sigma'_t eps; labels in drop_mask_B go to the null class (None: in train mode a fresh
        mask with probability class_dropout_prob, as the original; in eval mode none). align_only stops after the
        projector block (the REPA-E align pass needs nothing past it).
        """
        self._check_latents("z", z_BCHW)
        B = z_BCHW.shape[0]
        if y_B.shape != (B,):
            raise ValueError(f"SiT: labels y must be [B={B}], got {list(y_B.shape)}")
        t_B = t_B.reshape(-1)
        if drop_mask_B is None and self.training and self.config.class_dropout_prob > 0:
            # The original's LabelEmbedder.token_drop: uniform draws on the labels' device RNG.
            drop_mask_B = torch.rand(B, device=y_B.device) < self.config.class_dropout_prob
        x_t, v_target = self.bn.interpolate(z_BCHW, t_B, noise_BCHW, path=self.path_type,
                                            use_batch_stats=use_batch_stats)
        x_BTD, c_BD = self._embed(x_t, t_B, y_B, drop_mask_B)
        pending: Pending = None
        zs_tilde: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x_BTD, pending = block(x_BTD, c_BD, pending)
            if i + 1 == self.encoder_depth:
                # The projector reads the stream itself: add the branch here (the next norm then has none).
                x_BTD, pending = add_pending(x_BTD, pending), None
                zs_tilde = self._project(x_BTD)
                if align_only:
                    return SiTOutput(None, v_target, zs_tilde)
        v_pred = self.unpatchify(self.final_layer(x_BTD, c_BD, pending))
        return SiTOutput(v_pred, v_target, zs_tilde)

    def inference(self, x_t_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
        """Velocity at (x_t, t, y) for the samplers: no BN, no projector, no label dropout."""
        self._check_latents("x_t", x_t_BCHW)
        t_B = t_B.reshape(-1).expand(x_t_BCHW.shape[0]) if t_B.numel() == 1 else t_B.reshape(-1)
        x_BTD, c_BD = self._embed(x_t_BCHW, t_B, y_B, None)
        pending: Pending = None
        for block in self.blocks:
            x_BTD, pending = block(x_BTD, c_BD, pending)
        return self.unpatchify(self.final_layer(x_BTD, c_BD, pending))


def build_sit(name: str | SiTConfig | None = None, **overrides) -> SiT:
    """SiT from a registry name ("SiT-XL/2") or a SiTConfig, plus field overrides."""
    if isinstance(name, SiTConfig):
        return SiT(name, **overrides)
    return SiT(sit_config(name, **overrides))


def count_parameters(module: nn.Module) -> int:
    """All parameters, frozen ones (pos_embed) included: the counts of docs/METHOD.md#sit."""
    return sum(p.numel() for p in module.parameters())


__all__: Sequence[str] = [
    "FinalLayer",
    "SiT",
    "SiTBlock",
    "SiTConfig",
    "SiTOutput",
    "SiT_models",
    "add_pending",
    "build_sit",
    "count_parameters",
    "sit_config",
    "sit_config_from_args",
]
