"""PSNR, SSIM and LPIPS of VAE reconstructions against their originals, per image, on uint8 images, batched on the
images' device. The rFID is train/evaluate_metrics.py's Frechet distance on train/evaluate_inception.py's features;
the command is train/evaluate_vae.py. No network is built and no file is read here.

Per pair (a original, b reconstruction, uint8 [H, W, 3]), in float64:
  PSNR   10 log10(255^2 / mse), mse = mean((a - b)^2) over all H * W * 3 values; +inf when a == b
  SSIM   skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
         data_range=255, channel_axis=-1): per channel, Gaussian-weighted means mu, variances var = E[x^2] - mu^2 and
         covariance (window 11 x 11: sigma 1.5 truncated at 3.5 sigma, radius 5, weights normalised to sum 1),
           S = (2 mu_a mu_b + C1)(2 cov_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2)),
           C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2,
         averaged over the (H - 10) x (W - 10) positions whose window lies inside the image, then over the channels.
         skimage filters with mode='reflect' and then drops 5 px at every border, so the padded values never reach
         the mean: the 'valid' convolution here is the same. Sides below 11 are a ValueError (skimage's too).
  LPIPS  a model/lpips.py LPIPS module (the command builds VGG with double_rescale=False) on x / 127.5 - 1
Summaries are means over images; PSNR's mean leaves out identical pairs (+inf) and reports how many there were,
and is +inf only when every pair is identical.
Legend: B batch, H W image height and width, k window side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DATA_RANGE = 255.0
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # scipy's gaussian_filter(truncate=3.5), as skimage calls it: radius int(3.5 * 1.5 + 0.5) = 5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(a_BHW3: torch.Tensor, b_BHW3: torch.Tensor) -> None:
    if a_BHW3.shape != b_BHW3.shape or a_BHW3.dim() != 4 or a_BHW3.shape[-1] != 3:
        raise ValueError(f"expected two image batches [B, H, W, 3] of one shape, got {list(a_BHW3.shape)} and "
                         f"{list(b_BHW3.shape)}")
    if a_BHW3.dtype != torch.uint8 or b_BHW3.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {a_BHW3.dtype} and {b_BHW3.dtype}")


def psnr(a_BHW3: torch.Tensor, b_BHW3: torch.Tensor) -> torch.Tensor:
    """float64 [B] PSNR of each pair of uint8 images (data range 255); +inf for identical images."""
    _check_pair(a_BHW3, b_BHW3)
    mse_B = (a_BHW3.double() - b_BHW3.double()).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(DATA_RANGE**2 / mse_B)  # mse 0 -> 255^2 / 0 = inf -> inf


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> torch.Tensor:
    """float64 [k] normalised Gaussian taps exp(-x^2 / (2 sigma^2)), x = -r..r, r = int(truncate * sigma + 0.5)
    (scipy.ndimage's kernel)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 / sigma**2 * x.square())
    return taps / taps.sum()


def ssim(a_BHW3: torch.Tensor, b_BHW3: torch.Tensor) -> torch.Tensor:
    """float64 [B] SSIM of each pair of uint8 images, skimage's Gaussian variant (module docstring)."""
    _check_pair(a_BHW3, b_BHW3)
    taps = gaussian_window().to(a_BHW3.device)
    k = len(taps)
    if min(a_BHW3.shape[1:3]) < k:
        raise ValueError(f"SSIM needs images of at least {k} x {k} px (its window), got {list(a_BHW3.shape[1:3])}")
    x = a_BHW3.permute(0, 3, 1, 2).double()  # (B, 3, H, W)
    y = b_BHW3.permute(0, 3, 1, 2).double()
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 15, H, W)
    groups = maps.shape[1]
    # Separable 'valid' filter: rows then columns, one depthwise conv each -> (B, 15, H - k + 1, W - k + 1)
    maps = F.conv2d(maps, taps.view(1, 1, 1, k).expand(groups, 1, 1, k), groups=groups)
    maps = F.conv2d(maps, taps.view(1, 1, k, 1).expand(groups, 1, k, 1), groups=groups)
    mu_x, mu_y, xx, yy, xy = maps.split(3, dim=1)
    var_x, var_y, cov_xy = xx - mu_x * mu_x, yy - mu_y * mu_y, xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))  # every channel has the same number of positions: the mean of the channel means


def to_unit_range(images_BHW3: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1] (x / 127.5 - 1, the VAE's and LPIPS's input)."""
    return images_BHW3.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class ReconstructionScores:
    """Per-image PSNR, SSIM and (with an LPIPS module) LPIPS of every pair passed to update(), and their means."""

    def __init__(self, lpips: nn.Module | None = None):
        self.lpips = lpips
        self.parts: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "lpips": []}

    @torch.inference_mode()
    def update(self, originals_BHW3: torch.Tensor, recons_BHW3: torch.Tensor) -> None:
        """Score one batch of uint8 pairs on their device; the per-image values are kept on the CPU."""
        self.parts["psnr"].append(psnr(originals_BHW3, recons_BHW3).cpu())
        self.parts["ssim"].append(ssim(originals_BHW3, recons_BHW3).cpu())
        if self.lpips is not None:
            d_B111 = self.lpips(to_unit_range(originals_BHW3), to_unit_range(recons_BHW3))
            self.parts["lpips"].append(d_B111.reshape(-1).double().cpu())

    def per_image(self) -> dict[str, torch.Tensor]:
        """{'psnr', 'ssim', 'lpips'}: float64 [n] each (lpips empty without an LPIPS module)."""
        return {name: torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)
                for name, parts in self.parts.items()}

    def summary(self) -> dict[str, float | int | None]:
        """psnr (mean over non-identical pairs), psnr_num_identical, ssim, lpips (None without LPIPS), num_images."""
        scores = self.per_image()
        finite = torch.isfinite(scores["psnr"])
        num = len(scores["psnr"])
        if num == 0:
            raise ValueError("no image pairs were scored")
        return {
            "psnr": float(scores["psnr"][finite].mean()) if finite.any() else math.inf,
            "psnr_num_identical": int((~finite).sum()),
            "ssim": float(scores["ssim"].mean()),
            "lpips": float(scores["lpips"].mean()) if len(scores["lpips"]) else None,
            "num_images": num,
        }
