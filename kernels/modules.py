"""nn.Module wrappers of the functional ops in repae.kernels (no math of their own).

LatentBatchNorm keeps nn.BatchNorm2d(C, affine=False)'s state_dict keys (running_mean, running_var,
num_batches_tracked), so an official SiT checkpoint's `bn.*` entries load strictly.
"""

# B batch, T SiT tokens, D SiT hidden width, N encoder tokens, C latent channels (in the REPA loss: the feature
# width of both inputs, the glossary's E), H, W latent height and width (docs/ARCHITECTURE.md#shape-letters)

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .adaln_ref import NORMS
from .functional import adaln, latent_bn, latent_bn_denorm, latent_bn_interp, repa_loss
from .latent_bn_ref import StatsHook


class AdaLN(nn.Module):
    """Gated residual + LayerNorm or RMSNorm + modulate: forward(x, shift, scale, y=None, gate=None).

    norm: "layer" or "rms"; elementwise_affine=True owns a weight Parameter [dim] (ones), as models that keep
    their norm's weight do (a weight only: no bias).
    """

    def __init__(self, eps: float = 1e-6, out_dtype: torch.dtype | None = None, backend: str | None = None, *,
                 norm: str = "layer", elementwise_affine: bool = False, dim: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if elementwise_affine and dim is None:
            raise ValueError("AdaLN: elementwise_affine=True needs dim (the width D of the weight)")
        self.eps, self.out_dtype, self.backend, self.norm = eps, out_dtype, backend, norm
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype)) if elementwise_affine else None

    def forward(self, x_BTD, shift_BD, scale_BD, y_BTD=None, gate_BD=None) -> tuple[torch.Tensor, torch.Tensor]:
        return adaln(x_BTD, shift_BD, scale_BD, y=y_BTD, gate=gate_BD, eps=self.eps, norm=self.norm,
                     weight=self.weight, out_dtype=self.out_dtype, backend=self.backend)

    def extra_repr(self) -> str:
        affine = "" if self.weight is None else f", elementwise_affine=True, dim={self.weight.numel()}"
        return f"eps={self.eps}, norm={self.norm}{affine}, out_dtype={self.out_dtype}, backend={self.backend}"


class REPALoss(nn.Module):
    """REPA cosine alignment loss: forward(zs_tilde, zs) with tensors [B, N, C] or lists (one per encoder)."""

    def __init__(self, eps: float = 1e-12, backend: str | None = None):
        super().__init__()
        self.eps, self.backend = eps, backend

    def forward(self, zs_tilde: torch.Tensor | Sequence[torch.Tensor], zs: torch.Tensor | Sequence[torch.Tensor]):
        return repa_loss(zs_tilde, zs, eps=self.eps, backend=self.backend)


class LatentBatchNorm(nn.Module):
    """REPA-E's latent BatchNorm2d(C, eps=1e-4, momentum=0.1, affine=False) with the fused flow interpolation.

    Which statistics normalise is an explicit argument (`use_batch_stats`), defaulting to the module's
    training flag; `stats_hook` (set by a distributed trainer) sums the batch statistics over ranks.
    """

    def __init__(self, num_features: int, eps: float = 1e-4, momentum: float | None = 0.1,
                 backend: str | None = None, stats_hook: StatsHook | None = None):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.backend, self.stats_hook = backend, stats_hook
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _batch_stats(self, use_batch_stats: bool | None) -> bool:
        return self.training if use_batch_stats is None else use_batch_stats

    def forward(self, z_BCHW: torch.Tensor, *, use_batch_stats: bool | None = None) -> torch.Tensor:
        """x0 = BN(z)."""
        return latent_bn(z_BCHW, self.running_mean, self.running_var, self.num_batches_tracked,
                         use_batch_stats=self._batch_stats(use_batch_stats), momentum=self.momentum, eps=self.eps,
                         stats_hook=self.stats_hook, backend=self.backend)

    def interpolate(self, z_BCHW: torch.Tensor, t_B: torch.Tensor, noise_BCHW: torch.Tensor, *, path: str = "linear",
                    use_batch_stats: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, v*) from z, t and noise in one launch (see kernels.latent_bn_interp)."""
        return latent_bn_interp(z_BCHW, t_B, noise_BCHW, self.running_mean, self.running_var,
                                self.num_batches_tracked, use_batch_stats=self._batch_stats(use_batch_stats),
                                path=path, momentum=self.momentum, eps=self.eps, stats_hook=self.stats_hook,
                                backend=self.backend)

    def denormalize(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Latents for the decoder: x / rsqrt(running_var) + running_mean (no eps)."""
        return latent_bn_denorm(x_BCHW, self.running_mean, self.running_var, backend=self.backend)

    def init_stats(self, *, latents_scale: torch.Tensor, latents_bias: torch.Tensor) -> None:
        """Set the running statistics from a `-latents-stats.pt` pair: mean = bias, var = (1/scale)^2."""
        with torch.no_grad():
            self.running_mean.copy_(latents_bias.reshape(-1).to(self.running_mean))
            self.running_var.copy_((1.0 / latents_scale.reshape(-1).to(self.running_var)).square())

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine=False, backend={self.backend}"
