"""repae.model: SiT, VAE, PatchGAN discriminator, LPIPS and the DINOv2 encoder (issue 4; empty so far)."""
