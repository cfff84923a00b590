"""repae.model: SiT, VAE, PatchGAN discriminator, LPIPS and the DINOv2 encoder (issue 4; in progress).

Importing it first makes torchvision (and so timm and lpips) importable beside a CPU-only torch.
"""

from .compat import ensure_torchvision_importable

ensure_torchvision_importable()
