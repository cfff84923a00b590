"""LPIPS (VGG16) perceptual distance of REPA-E's VAE loss (docs/METHOD.md#vae-and-gan-losses), always computed in fp32.

    lpips = LPIPS(double_rescale=True)         # released checkpoints' behaviour; finds vgg16-397923af.pth
    d_B111 = lpips(x, x_hat)                   # x, x_hat in [-1, 1], [B, 3, H, W] -> [B, 1, 1, 1]

Holds: the VGG16 trunk split into relu1_2 .. relu5_3 slices, ScalingLayer, the five 1x1 linear heads,
LPIPS itself and the two weight sources: the heads from the `lpips` package's shipped
`weights/v0.1/vgg.pth` (byte-identical to the file the original downloads), the trunk from a local
torchvision `vgg16-397923af.pth` (nothing is downloaded). Must not hold the VAE loss that weights and
averages it (model/losses.py), nor a weight-file reader (model/weights.py reads every file).

State-dict keys are the original's (taming's LPIPS): `scaling_layer.{shift,scale}`, `net.slice{1..5}.{N}.*`
with N torchvision's `features.N` index, `lin{0..4}.model.1.weight`. The module is frozen and never leaves
eval mode (the original calls self.eval() on every call), so its dropout is inactive.
"""

# B batch, H, W image height and width, F feature channels

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re

import torch
from torch import nn

from .weights import StateDict, find_weight_file, load_weights

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 weights, the original's trunk
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
LPIPS_HEAD_MD5 = "d507d7349b931f0638a25a48a722f98a"  # lpips 0.1.4's weights/v0.1/vgg.pth == taming's vgg.pth

# torchvision's vgg16 "D" config: conv widths, "M" = 2x2 max pool; `features` indices follow from it
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
SLICE_ENDS = (4, 9, 16, 23, 30)  # features[0:4] .. features[23:30] end at relu1_2 .. relu5_3
CHANNELS = (64, 128, 256, 512, 512)
MIN_SIDE = 16  # four max pools before relu5_3


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features[:30]` (through relu5_3), same modules and indices, without torchvision.

    Building torchvision's whole vgg16 would also allocate and initialize its 124M-parameter classifier.
    """
    layers: list[nn.Module] = []
    in_ch = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = v
    assert len(layers) == SLICE_ENDS[-1]
    return nn.Sequential(*layers)


class VGG16Slices(nn.Module):
    """VGG16 features cut into slice1..slice5; forward returns the 5 activations relu1_2 .. relu5_3."""

    def __init__(self):
        super().__init__()
        features = vgg16_features()
        start = 0
        for k, end in enumerate(SLICE_ENDS, start=1):
            piece = nn.Sequential()
            for idx in range(start, end):  # keep torchvision's index as the name, as the original does
                piece.add_module(str(idx), features[idx])
            self.add_module(f"slice{k}", piece)
            start = end

    def reset_parameters(self) -> None:
        """torchvision's VGG init for a random trunk: conv weight kaiming_normal (fan_out, relu), bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x_B3HW: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        h = x_B3HW
        for k in range(1, len(SLICE_ENDS) + 1):
            h = getattr(self, f"slice{k}")(h)  # (B, C_k, H / 2^(k-1), W / 2^(k-1))
            feats.append(h)
        return feats


class ScalingLayer(nn.Module):
    """(x - shift) / scale per channel: [-1, 1] inputs to the trunk's ImageNet normalization."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return (x_B3HW - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """Dropout then a bias-free 1x1 conv C -> 1 (keys `model.1.weight`); dropout is inert in eval."""

    def __init__(self, chn_in: int, chn_out: int = 1):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False))

    def forward(self, x_BFHW: torch.Tensor) -> torch.Tensor:
        return self.model(x_BFHW)


def normalize_tensor(f_BFHW: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalize along channels: f / (sqrt(sum_c f^2) + eps)."""
    norm = torch.sqrt(torch.sum(f_BFHW**2, dim=1, keepdim=True))  # (B, 1, H, W)
    return f_BFHW / (norm + eps)


# ---------------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------------


def find_vgg16_weights(weights_dir: str | os.PathLike | None = None) -> str:
    """Path of a local vgg16-397923af.pth; FileNotFoundError saying what to put where otherwise."""
    return find_weight_file(
        VGG16_FILE, weights_dir, what="LPIPS VGG16 trunk weights",
        hint=f"Use torchvision's IMAGENET1K_V1 file, or pass its path (vgg_weights=...); it is published at "
             f"{VGG16_URL}. Nothing is downloaded here.")


def vgg16_torchvision_to_lpips(state_dict: StateDict) -> StateDict:
    """torchvision vgg16 keys -> VGG16Slices keys: `features.N.x` -> `slice{k}.N.x`; `classifier.*` dropped.

    Other keys pass through unchanged, so a file of another layout fails the strict load naming them.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith("classifier."):
            continue
        m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
        if m and int(m.group(1)) < SLICE_ENDS[-1]:
            idx = int(m.group(1))
            k = next(i for i, end in enumerate(SLICE_ENDS, start=1) if idx < end)
            key = f"slice{k}.{idx}.{m.group(2)}"
        out[key] = value
    return out


def lpips_head_file() -> str:
    """The `lpips` package's weights/v0.1/vgg.pth, found without importing lpips (which imports torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("LPIPS linear-head weights: the `lpips` package is not installed (pip install "
                                "lpips), so its weights/v0.1/vgg.pth cannot be found; or pass lin_weights=<vgg.pth>")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "weights", "v0.1", "vgg.pth")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LPIPS linear-head weights not found: {path} (the lpips package has no "
                                f"weights/v0.1/vgg.pth); reinstall lpips>=0.1.4 or pass lin_weights=<vgg.pth>")
    return path


def file_md5(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------------


class LPIPS(nn.Module):
    """Frozen, eval-only LPIPS-VGG; forward(x, x_hat) -> fp32 distance [B, 1, 1, 1]."""

    def __init__(self, double_rescale: bool, *, pretrained: bool = True, vgg_weights: str | os.PathLike | None = None,
                 weights_dir: str | os.PathLike | None = None, lin_weights: str | os.PathLike | None = None):
        """double_rescale: True reproduces the released checkpoints (inputs rescaled once more, x * 2 - 1),
        False the fixed upstream code (PR #17); the config calls it `lpips_double_rescale`. Required, since
        the two give different losses and neither is a safe silent default.

        pretrained: load the trunk from `vgg_weights` (a torchvision-layout file), or else from the first
            vgg16-397923af.pth found in weights_dir, $REPAE_WEIGHTS_DIR, torch.hub.get_dir()/checkpoints.
            False keeps a random trunk (torchvision's init; tests only).
        lin_weights: the linear heads' file; default the lpips package's weights/v0.1/vgg.pth, which must have
            md5 LPIPS_HEAD_MD5 (a file passed explicitly is loaded strictly but not md5-checked).
        """
        super().__init__()
        if double_rescale is not True and double_rescale is not False:  # a bool, not 0/1 or a string
            raise ValueError(f"LPIPS: double_rescale={double_rescale!r}, expected True or False")
        self.double_rescale = double_rescale
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        self.lin0, self.lin1, self.lin2, self.lin3, self.lin4 = (NetLinLayer(c) for c in CHANNELS)

        if pretrained:
            path = vgg_weights if vgg_weights is not None else find_vgg16_weights(weights_dir)
            load_weights(self.net, path, remap=vgg16_torchvision_to_lpips, what="LPIPS VGG16 trunk file")
        else:
            self.net.reset_parameters()
        self.load_heads(lin_weights)
        self.requires_grad_(False)
        self.train(False)

    @property
    def lins(self) -> list[NetLinLayer]:
        # a property, not a ModuleList, so the state dict keeps the original's keys only (no `lins.k.*` copies)
        return [self.lin0, self.lin1, self.lin2, self.lin3, self.lin4]

    def load_heads(self, path: str | os.PathLike | None = None) -> None:
        """Load `lin{0..4}.model.1.weight` strictly from `path` (default: the lpips package's md5-checked file)."""
        if path is None:
            path = lpips_head_file()
            md5 = file_md5(path)
            if md5 != LPIPS_HEAD_MD5:
                raise ValueError(f"LPIPS linear-head file {path}: md5 {md5}, expected {LPIPS_HEAD_MD5} (the file "
                                 f"the original loads); install lpips 0.1.4 or pass lin_weights= explicitly")
        # PARITY: the original loads this file into the whole module with strict=False; here only into the heads,
        # strictly, so a file without them is an error instead of silently random heads.
        heads = nn.ModuleDict({f"lin{k}": lin for k, lin in enumerate(self.lins)})
        load_weights(heads, path, what="LPIPS linear-head file")

    def train(self, mode: bool = True) -> LPIPS:
        """Stays in eval whatever `mode` is (the original calls self.eval() on every call)."""
        return super().train(False)

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Distance between images x and x_hat in [-1, 1], both [B, 3, H, W] (H, W >= 16) -> fp32 [B, 1, 1, 1].

        Computed in fp32 with autocast off, as the original's loss forward is decorated
        autocast(enabled=False) and casts its inputs to float. Gradients reach x_hat, and x only when it
        requires grad (the parameters are frozen, so nothing is recorded for an x that does not).
        """
        if (x.ndim != 4 or x.shape[1] != 3 or x.shape != x_hat.shape or min(x.shape[2:]) < MIN_SIDE
                or not (x.is_floating_point() and x_hat.is_floating_point())):
            raise ValueError(f"LPIPS: inputs of shapes {tuple(x.shape)} and {tuple(x_hat.shape)}, dtypes {x.dtype} "
                             f"and {x_hat.dtype}: expected two float [B, 3, H, W] of one shape, H, W >= {MIN_SIDE}")
        if self.lin0.model[1].weight.dtype != torch.float32:
            raise ValueError(f"LPIPS parameters are {self.lin0.model[1].weight.dtype}, expected torch.float32 "
                             "(do not cast the LPIPS module; it computes in fp32)")
        # Meta tensors (FLOP counting, bench/model_harness.py) have no autocast: nothing to switch off there.
        fp32 = (contextlib.nullcontext() if x.device.type == "meta"
                else torch.autocast(device_type=x.device.type, enabled=False))
        with fp32:
            x, x_hat = x.float(), x_hat.float()
            if self.double_rescale:
                # PARITY: REPA-E's initial commit (loss/lpips.py forward) maps inputs it believes are in [0, 1] to
                # [-1, 1], but they already are: the trunk sees [-3, 1]. PR #17 removed it; double_rescale=False.
                x, x_hat = x * 2.0 - 1.0, x_hat * 2.0 - 1.0
            feats0 = self.net(self.scaling_layer(x))
            feats1 = self.net(self.scaling_layer(x_hat))
            val = None
            for lin, f0, f1 in zip(self.lins, feats0, feats1):
                diff = (normalize_tensor(f0) - normalize_tensor(f1)) ** 2  # (B, C_k, H_k, W_k)
                res = lin.model(diff).mean(dim=[2, 3], keepdim=True)  # (B, 1, 1, 1): spatial average
                val = res if val is None else val + res  # summed in layer order, as the original
        return val
