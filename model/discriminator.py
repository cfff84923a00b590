"""PatchGAN discriminator of REPA-E's VAE loss (docs/METHOD.md#vae-and-gan-losses): taming's NLayerDiscriminator,
BatchNorm variant.

    disc = build_discriminator("pretrained/sdvae/sdvae-f8d4-discriminator-ckpt.pt")   # strict load
    logits = disc(x_B3HW)                                                              # [B, 1, 30, 30] at 256 px

Holds: `NLayerDiscriminator` (keys `main.{0..11}`, the original's), taming's `weights_init`, and
`build_discriminator`, which loads a released `*-discriminator-ckpt.pt` (a bare state dict) through
model/weights.py. Must not hold the hinge/GAN losses or the requires_grad switching of the two loss passes
(model/losses.py and the train step), nor a weight-file reader (model/weights.py).

BatchNorm is plain nn.BatchNorm2d (eps 1e-5, momentum 0.1, not synced). The original keeps the module in
train mode throughout, so every call normalizes with batch statistics and updates the running stats
(3 times per step); which mode to use is the caller's choice here, through the usual train()/eval().
The original calls it inside the loss's autocast(enabled=False) region on fp32 inputs; precision is the
caller's too (this module does not cast).
"""

# B batch, F feature channels, H, W image (or logit-map) height and width

from __future__ import annotations

import math
import os

import torch
from torch import nn

from .weights import load_weights

NEGATIVE_SLOPE = 0.2
KERNEL_SIZE = 4
PADDING = 1


def weights_init(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """taming's weights_init: Conv weight ~ N(0, 0.02) (bias untouched); BatchNorm weight ~ N(1, 0.02), bias 0.

    Matched on the class name like the original (`"Conv" in name`, `"BatchNorm" in name`); meant for
    `module.apply(...)`, which visits children before parents, i.e. `main.0` .. `main.11` in order.
    """
    name = type(module).__name__
    if "Conv" in name:
        nn.init.normal_(module.weight, 0.0, 0.02, generator=generator)
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight, 1.0, 0.02, generator=generator)
        nn.init.constant_(module.bias, 0.0)


def _reset_conv_(conv: nn.Conv2d, generator: torch.Generator) -> None:
    """nn.Conv2d.reset_parameters drawn from `generator` (same draws, same order as PyTorch's default init)."""
    nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
    if conv.bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(conv.weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(conv.bias, -bound, bound, generator=generator)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: n_layers stride-2 convs, one stride-1 conv+BN, then a 1-channel stride-1 conv (raw logits)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, *,
                 generator: torch.Generator | None = None):
        """Build and initialize like `NLayerDiscriminator(...).apply(weights_init)` in the original.

        generator=None uses the global RNG exactly as the original (default conv init at construction, then
        weights_init), so torch.manual_seed(s) gives the original's weights. A generator makes the same draws in
        the same order and leaves the global RNG untouched; seeded alike, both give bitwise-equal weights.
        """
        super().__init__()
        for name, value in (("input_nc", input_nc), ("ndf", ndf), ("n_layers", n_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"NLayerDiscriminator: {name}={value!r}, expected a positive int")
        self.input_nc, self.ndf, self.n_layers = input_nc, ndf, n_layers
        # PARITY: use_actnorm=False only (REPA-E's setting); taming's ActNorm variant is not implemented.
        # with a generator, the default init that runs at construction must not consume the global RNG
        with torch.random.fork_rng(devices=[], enabled=generator is not None):
            k, p = KERNEL_SIZE, PADDING
            layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, k, stride=2, padding=p),
                                       nn.LeakyReLU(NEGATIVE_SLOPE, True)]
            mult = 1
            for n in range(1, n_layers):  # downsampling convs; BN follows, so they carry no bias
                prev, mult = mult, min(2**n, 8)
                layers += [nn.Conv2d(ndf * prev, ndf * mult, k, stride=2, padding=p, bias=False),
                           nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(NEGATIVE_SLOPE, True)]
            prev, mult = mult, min(2**n_layers, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, k, stride=1, padding=p, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(NEGATIVE_SLOPE, True)]
            layers += [nn.Conv2d(ndf * mult, 1, k, stride=1, padding=p)]  # one logit per patch
            self.main = nn.Sequential(*layers)

        if generator is not None:
            for module in self.main:
                if isinstance(module, nn.Conv2d):
                    _reset_conv_(module, generator)
        self.apply(lambda m: weights_init(m, generator))

    def output_size(self, size: int) -> int:
        """Logit-map side for an input side: every k4 s2 p1 conv halves (floor), each k4 s1 p1 conv takes 1."""
        for _ in range(self.n_layers):
            size //= 2
        return size - 2

    def forward(self, x_BFHW: torch.Tensor) -> torch.Tensor:
        """Images [B, input_nc, H, W] (float, [-1, 1] in REPA-E) -> patch logits [B, 1, P, P] (30 at 256 px)."""
        if (x_BFHW.ndim != 4 or x_BFHW.shape[1] != self.input_nc or not x_BFHW.is_floating_point()
                or min(self.output_size(x_BFHW.shape[2]), self.output_size(x_BFHW.shape[3])) < 1):
            min_side = 3 * 2**self.n_layers
            raise ValueError(f"NLayerDiscriminator: input of shape {tuple(x_BFHW.shape)} and dtype {x_BFHW.dtype}, "
                             f"expected float [B, {self.input_nc}, H, W] with H, W >= {min_side}")
        return self.main(x_BFHW)


def build_discriminator(weights: str | os.PathLike | None = None, *, input_nc: int = 3, ndf: int = 64,
                        n_layers: int = 3, generator: torch.Generator | None = None,
                        strict: bool = True) -> NLayerDiscriminator:
    """NLayerDiscriminator, initialized as the original, then loaded strictly from `weights` if given.

    The released `*-discriminator-ckpt.pt` files hold the state dict itself (`main.*`, BN running stats
    included). Returned in train mode, the mode the original uses throughout.
    """
    disc = NLayerDiscriminator(input_nc, ndf, n_layers, generator=generator)
    if weights is not None:
        load_weights(disc, weights, strict=strict, what="discriminator weight file")
    return disc
