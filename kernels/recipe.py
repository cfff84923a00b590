"""The per-GPU tensor shapes of the REPA-E recipe (SiT-XL/2 on 256 px images, DINOv2-B, 32 images per GPU): the
shapes the kernels are compile-checked (compile_check.py) and benchmarked (bench/shapes.py) at. One table."""

# B batch, T SiT tokens, D SiT hidden width, N encoder tokens, E encoder width, C latent channels, H, W latent height
# and width

ADALN_BTD = (32, 256, 1152)
"""adaLN on SiT-XL/2's residual stream: 256 tokens of a 32x32 latent in 2x2 patches, hidden 1152."""
REPA_BNE = (32, 256, 768)
"""REPA loss: projector output against DINOv2-B patch tokens (16x16 patches of a 224 px input, width 768)."""
LATENT_BCHW = {"f8d4": (32, 4, 32, 32), "f16d32": (32, 32, 16, 16)}
"""Latent BN + interpolation on the VAE's latents at 256 px: SD-VAE f8d4 and the f16d32 VAE."""
