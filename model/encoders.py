"""DINOv2 representation encoder for the REPA loss (docs/METHOD.md#dinov2-encoder): enc_type parsing, local weights,
preprocessing.

    encoders, z_dims = load_encoders("dinov2-vit-b", resolution=256)   # finds dinov2_vitb14_pretrain.pth
    zs = [enc(raw_uint8_B3HW) for enc in encoders]                     # each [B, 256, 768], no grad

The original builds facebookresearch/dinov2 through an unpinned, online torch.hub call
(docs/METHOD.md#bugs-of-the-original-code, item 13). Here the
same network is timm's `vit_*_patch14_dinov2`, built offline at the hub model's layout (img 518, 37x37 patches
+ cls), loaded strictly from a local file (the official `dinov2_vit?14[_reg4]_pretrain.pth`, renamed to timm's
keys here, or a timm-layout file), then its pos_embed is resampled to the training grid as REPA-E does.
This file must not hold the REPA projector or loss (model/sit.py, model/losses.py) nor a weight-file reader
(model/weights.py reads every file); other encoder families (mocov3, clip, mae, jepa, dinov1) are not here.
"""

# B batch, N encoder tokens (patches), E encoder width, R image side, S DINOv2 input side

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import timm  # importable beside CPU torch because repae.model's __init__ installed the torchvision guard
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from .weights import StateDict, find_weight_file, load_weights

# cfg letter of "dinov2-vit-<cfg>" -> (timm size word, embed dim)
DINOV2_ARCHS = {"s": ("small", 384), "b": ("base", 768), "l": ("large", 1024), "g": ("giant", 1536)}
DINOV2_FAMILIES = {"dinov2": False, "dinov2reg": True, "dinov2_reg": True}  # family -> has 4 registers
OTHER_FAMILIES = ("mocov3", "clip", "mae", "jepa", "dinov1")  # supported by REPA-E, out of scope here
PATCH_SIZE = 14
HUB_IMG_SIZE = 518  # the hub models' img_size: pos_embed holds 37x37 patch positions + cls
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{cfg}14/{file}"


@dataclass(frozen=True)
class EncoderSpec:
    """One parsed entry of enc_type, e.g. "dinov2-vit-b"."""

    enc_type: str
    cfg: str  # s, b, l or g
    registers: bool

    @property
    def timm_name(self) -> str:
        return f"vit_{DINOV2_ARCHS[self.cfg][0]}_patch14{'_reg4' if self.registers else ''}_dinov2"

    @property
    def embed_dim(self) -> int:
        return DINOV2_ARCHS[self.cfg][1]

    @property
    def file_name(self) -> str:
        """Name of the official weight file (also the name torch.hub caches it under)."""
        return f"dinov2_vit{self.cfg}14{'_reg4' if self.registers else ''}_pretrain.pth"

    @property
    def url(self) -> str:
        return _URL.format(cfg=self.cfg, file=self.file_name)


def parse_enc_type(enc_type: str) -> list[EncoderSpec]:
    """ "dinov2-vit-b,dinov2reg-vit-l" -> one EncoderSpec per comma-separated "<family>-vit-<cfg>" entry."""
    supported = "dinov2-vit-{s,b,l,g} or dinov2reg-vit-{s,b,l,g}, comma-separated"
    if not isinstance(enc_type, str) or not enc_type.strip():
        raise ValueError(f"enc_type {enc_type!r}: expected {supported}")
    specs = []
    for name in (n.strip() for n in enc_type.split(",")):
        parts = name.split("-")
        if len(parts) != 3:
            raise ValueError(f"enc_type entry {name!r} (in {enc_type!r}): expected <family>-vit-<cfg>, "
                             f"i.e. {supported}")
        family, arch, cfg = parts
        if family in OTHER_FAMILIES:
            raise NotImplementedError(f"enc_type {name!r}: only DINOv2 encoders are implemented ({supported}); "
                                      f"{', '.join(OTHER_FAMILIES)} are not")
        if family not in DINOV2_FAMILIES or arch != "vit" or cfg not in DINOV2_ARCHS:
            raise ValueError(f"enc_type entry {name!r} (in {enc_type!r}) is not supported: expected {supported}")
        specs.append(EncoderSpec(name, cfg, DINOV2_FAMILIES[family]))
    return specs


def _check_resolution(resolution: int) -> int:
    """resolution itself if DINOv2's input side 224 * resolution / 256 is a whole number of 14-px patches.

    That is resolution % 16 == 0: grid = resolution / 16 patches a side, input side S = 14 * grid.
    """
    # PARITY: the original computes 224 * (resolution // 256) (16 * (resolution // 256) patches), which equals
    # this at multiples of 256 and gives a size 0 or a token count no SiT matches otherwise. Any multiple of 16 is
    # accepted here so small demo runs work (64 px -> 56 px input -> 4x4 = 16 tokens, a SiT/2 on f8 latents).
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or resolution % 16:
        raise ValueError(f"resolution {resolution!r}: expected a positive multiple of 16 (DINOv2 sees "
                         f"224 * resolution / 256 px, which must be a multiple of its patch {PATCH_SIZE}), "
                         "e.g. 256 or 512 (64 for demos)")
    return resolution


def dinov2_grid_size(resolution: int) -> int:
    """Patch grid side for a training resolution: resolution / 16 (16 at 256 px, 32 at 512 px, 4 at 64 px)."""
    return _check_resolution(resolution) // 16


def dinov2_input_size(resolution: int) -> int:
    """Side of the image DINOv2 sees: 224 * resolution / 256 = grid * 14 (224 at 256 px, 448 at 512, 56 at 64)."""
    return PATCH_SIZE * dinov2_grid_size(resolution)  # == the original's 224 * (resolution // 256) at k * 256


def preprocess_for_dinov2(x_B3RR: torch.Tensor, resolution: int) -> torch.Tensor:
    """Raw pixels in [0, 255] (uint8 or float) -> ImageNet-normalized, bicubic-resized fp32 [B, 3, S, S].

    Same ops in the same order as REPA-E's preprocess_raw_image: x / 255, torchvision Normalize (sub mean, div
    std), F.interpolate(size=dinov2_input_size(resolution), bicubic, align_corners=False, no antialias); the size
    is the original's 224 * (resolution // 256) at multiples of 256, and 224 * resolution / 256 for the other
    multiples of 16 allowed here. Always fp32: autocast is switched off here (the ops are fp32 in the original
    too, because x / 255 is fp32).
    """
    if x_B3RR.ndim != 4 or x_B3RR.shape[1] != 3:
        raise ValueError(f"preprocess_for_dinov2: images of shape {tuple(x_B3RR.shape)}, expected [B, 3, H, W]")
    if not (x_B3RR.dtype == torch.uint8 or x_B3RR.is_floating_point()):
        raise ValueError(f"preprocess_for_dinov2: images of dtype {x_B3RR.dtype}, expected uint8 or float in [0, 255]")
    size = dinov2_input_size(resolution)
    with torch.autocast(device_type=x_B3RR.device.type, enabled=False):
        x = x_B3RR.to(torch.float32) / 255.0
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
        x = (x - mean) / std  # torchvision Normalize: sub_(mean).div_(std)
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False)  # (B, 3, S, S)


def dinov2_official_to_timm(state_dict: StateDict) -> StateDict:
    """facebookresearch/dinov2 key names -> timm's; a timm-layout dict passes through unchanged.

    Same mapping as timm's own `_convert_dinov2`: drop `mask_token` (masked-image training only), rename the
    giant models' fused SwiGLU `mlp.w12`/`mlp.w3` to `mlp.fc1`/`mlp.fc2`, and for register models turn
    `register_tokens` into `reg_token`. timm keeps register models as no_embed_class (cls and registers sit
    outside pos_embed), so DINOv2's cls position pos_embed[:, 0] is folded into cls_token; DINOv2 adds it to
    cls only and registers get none, so the network computes the same tokens.
    """
    sd = dict(state_dict)
    sd.pop("mask_token", None)
    out = {}
    if "register_tokens" in sd:
        pos_embed = sd.pop("pos_embed")  # (1, 1 + N, E)
        out["reg_token"] = sd.pop("register_tokens")
        out["cls_token"] = sd.pop("cls_token") + pos_embed[:, :1]
        out["pos_embed"] = pos_embed[:, 1:]
    for key, value in sd.items():
        key = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", key)
        key = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", key)
        out[key] = value
    return out


def find_dinov2_weights(spec: EncoderSpec, weights_dir: str | os.PathLike | None = None) -> str:
    """Path of the official weight file for `spec`; FileNotFoundError saying what to put where otherwise."""
    return find_weight_file(
        spec.file_name, weights_dir, what=f"DINOv2 weights for enc_type {spec.enc_type!r}",
        hint=f"Or pass its path (weights=...); it is published at {spec.url}. A timm-layout file of "
             f"{spec.timm_name} works too.")


def resample_pos_embed_to_grid(vit: nn.Module, grid: int) -> None:
    """Resample a timm ViT's pos_embed to grid x grid patches and set its input size to grid * patch.

    The patch part is resampled exactly as REPA-E does: timm's resample_abs_pos_embed (bicubic, antialias=True),
    prefix positions kept. After this, timm adds pos_embed as is at forward time (dynamic_img_size is off).
    """
    num_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    old = vit.pos_embed.detach()  # (1, prefix + G0*G0, E)
    new = resample_abs_pos_embed(old, [grid, grid], num_prefix_tokens=num_prefix, interpolation="bicubic",
                                 antialias=True)
    img_size = grid * vit.patch_embed.patch_size[0]
    if hasattr(vit, "set_input_size"):
        # set_input_size resamples pos_embed itself (with the same defaults in timm 1.0.31); the tensor is
        # replaced below by the one computed above, so the result never depends on those defaults.
        vit.set_input_size(img_size=(img_size, img_size))
    else:  # older timm: the patch embedding's size attributes are all there is to update
        vit.patch_embed.img_size = (img_size, img_size)
        vit.patch_embed.grid_size = (grid, grid)
        vit.patch_embed.num_patches = grid * grid
    vit.pos_embed = nn.Parameter(new, requires_grad=False)
    assert tuple(vit.patch_embed.grid_size) == (grid, grid) and not vit.dynamic_img_size


def build_dinov2_vit(spec: EncoderSpec, resolution: int = 256, *, weights: str | os.PathLike | None = None,
                     weights_dir: str | os.PathLike | None = None, pretrained: bool = True) -> nn.Module:
    """timm ViT for `spec`: hub layout, weights loaded strictly, pos_embed resampled, eval, frozen.

    weights: a file (official or timm layout, .pth/.pt/.safetensors); None searches model.weights.weight_search_dirs()
    for the official file name. pretrained=False keeps timm's random init (tests only).
    """
    grid = dinov2_grid_size(resolution)
    if not pretrained and weights is not None:
        raise ValueError(f"build_dinov2_vit: weights={os.fspath(weights)!r} given with pretrained=False")
    if pretrained and weights is None:
        weights = find_dinov2_weights(spec, weights_dir)  # before building: a missing file fails fast
    # The official layout: 37x37 positions + cls. dynamic_img_size stays off: positions are never resampled
    # at forward time, as in the original, where DINOv2's interpolate_pos_encoding is a no-op at 256 patches.
    # PARITY: the original runs facebookresearch's DinoVisionTransformer (xformers attention when installed);
    # timm's network is the same math with F.scaled_dot_product_attention, so features agree up to rounding.
    # Its random init draws from the CPU RNG differently from the hub build (the original builds DINOv2 before the SiT;
    # weights overwrite it).
    vit = timm.create_model(spec.timm_name, pretrained=False, img_size=HUB_IMG_SIZE, num_classes=0,
                            dynamic_img_size=False)
    if pretrained:
        load_weights(vit, weights, remap=dinov2_official_to_timm, what=f"DINOv2 weight file for {spec.enc_type}")
    resample_pos_embed_to_grid(vit, grid)
    vit.requires_grad_(False)
    return vit.eval()


class DINOv2Encoder(nn.Module):
    """Frozen DINOv2: raw images [B, 3, R, R] -> final-norm patch tokens [B, T, E] (no cls, no registers)."""

    def __init__(self, enc_type: str = "dinov2-vit-b", resolution: int = 256, *,
                 weights: str | os.PathLike | None = None, weights_dir: str | os.PathLike | None = None,
                 pretrained: bool = True):
        super().__init__()
        specs = parse_enc_type(enc_type)
        if len(specs) != 1:
            raise ValueError(f"DINOv2Encoder takes one enc_type, got {enc_type!r}; use load_encoders for a list")
        self.spec = specs[0]
        self.enc_type = self.spec.enc_type
        self.resolution = resolution
        self.embed_dim = self.spec.embed_dim
        self.vit = build_dinov2_vit(self.spec, resolution, weights=weights, weights_dir=weights_dir,
                                    pretrained=pretrained)
        self.num_prefix_tokens = self.vit.num_prefix_tokens  # cls (+ 4 registers)
        self.num_patches = dinov2_grid_size(resolution) ** 2
        self.train(False)

    def train(self, mode: bool = True) -> DINOv2Encoder:
        """Always eval: the encoder is a fixed feature extractor (a parent's .train() must not flip it)."""
        return super().train(False)

    @torch.no_grad()
    def encode_preprocessed(self, x_B3SS: torch.Tensor) -> torch.Tensor:
        """Preprocessed images -> forward_features(x)['x_norm_patchtokens'] of the original, [B, T, E]."""
        tokens_BtE = self.vit.forward_features(x_B3SS)  # final LayerNorm applied to every token
        return tokens_BtE[:, self.num_prefix_tokens:]

    @torch.no_grad()
    def forward(self, images_B3RR: torch.Tensor) -> torch.Tensor:
        """Raw pixels (uint8, or float in [0, 255]) at the training resolution -> zs [B, T, E].

        Runs in the caller's autocast (REPA-E: fp16); the output is fp32 there, since the final LayerNorm is.
        """
        if images_B3RR.ndim != 4 or tuple(images_B3RR.shape[1:]) != (3, self.resolution, self.resolution):
            raise ValueError(f"{self.enc_type}: images of shape {tuple(images_B3RR.shape)}, expected "
                             f"[B, 3, {self.resolution}, {self.resolution}]")
        return self.encode_preprocessed(preprocess_for_dinov2(images_B3RR, self.resolution))


def load_encoders(enc_type: str = "dinov2-vit-b", resolution: int = 256, *,
                  weights: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                  weights_dir: str | os.PathLike | None = None, pretrained: bool = True,
                  device: torch.device | str | None = None) -> tuple[list[DINOv2Encoder], list[int]]:
    """REPA-E's load_encoders: (encoders, z_dims), one per comma-separated enc_type entry.

    weights: one file per entry (a single path when enc_type names one encoder); None looks up each official
    file name in weights_dir, $REPAE_WEIGHTS_DIR and the torch hub cache (FileNotFoundError naming it if absent).
    """
    specs = parse_enc_type(enc_type)
    _check_resolution(resolution)
    if weights is None or isinstance(weights, (str, os.PathLike)):
        paths = [weights] * len(specs) if weights is None or len(specs) == 1 else None
    else:
        paths = list(weights) if len(weights) == len(specs) else None
    if paths is None:
        raise ValueError(f"load_encoders: weights={weights!r} must give one file per encoder of {enc_type!r}")
    encoders = [DINOv2Encoder(s.enc_type, resolution, weights=p, weights_dir=weights_dir, pretrained=pretrained)
                for s, p in zip(specs, paths, strict=True)]
    if device is not None:
        encoders = [e.to(device) for e in encoders]
    return encoders, [e.embed_dim for e in encoders]
