"""BatchNorm2d whose training statistics span all ranks, on any device (torch's SyncBatchNorm is GPU-only).

Used for the discriminator when loss.sync_discriminator_bn is set (REPA-E keeps its BN per GPU; syncing
makes a run independent of the world size). Same parameters, buffers and state-dict keys as
nn.BatchNorm2d; eval mode is plain BatchNorm. The latent BN of the SiT has its own fused kernel hook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """Training: mean and biased variance over (ranks, B, H, W), differentiable (the backward all-reduces
    the statistic gradients); running statistics take the unbiased variance with the global count, as
    SyncBatchNorm does. Two all-reduces: (sum, count) gives the global mean, then the sums of the centred
    values give an exact two-pass variance (one all-reduce of sum and sum of squares would lose the
    variance to cancellation when |mean| >> std)."""

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x_BCHW)
        C, dims, shape = x_BCHW.shape[1], (0, 2, 3), (1, x_BCHW.shape[1], 1, 1)
        xf = x_BCHW.float()
        count = torch.full((1,), float(xf.numel() // C), device=xf.device)
        first = dist_fn.all_reduce(torch.cat([xf.sum(dim=dims), count]))
        n = first[-1]
        mean = first[:C] / n
        xc = xf - mean.view(shape)
        second = dist_fn.all_reduce(torch.cat([xc.sum(dim=dims), (xc * xc).sum(dim=dims)]))
        d = second[:C] / n  # the rounding remainder of the first mean
        var = (second[C:] / n - d * d).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean + d, alpha=m)
                self.running_var.mul_(1 - m).add_(var * n / (n - 1), alpha=m)
        y = (xc - d.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x_BCHW.dtype)


def sync_batchnorm_(module: nn.Module) -> nn.Module:
    """Turn every nn.BatchNorm2d of module into a GlobalBatchNorm2d in place (weights and buffers kept)."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
    return module
