"""repae.model: SiT, VAE, PatchGAN discriminator, LPIPS and the DINOv2 encoder of REPA-E (docs/METHOD.md).

    from repae.model import build_sit, build_vae, build_discriminator, LPIPS, load_encoders
    from repae.model import load_weights, load_released_checkpoint

Every state dict is key-for-key the original's, so released checkpoints load strictly
(`load_weights`, `load_released_checkpoint`). The names below are imported on first use, so
`import repae.model` stays cheap (timm is only imported with the encoder).

Importing this package first makes torchvision (and so timm and lpips) importable beside a CPU-only torch.
"""

from __future__ import annotations

import importlib

from .compat import ensure_torchvision_importable

ensure_torchvision_importable()

# public name -> submodule that defines it
_EXPORTS = {
    "SiT": "sit", "SiTConfig": "sit", "SiTOutput": "sit", "SiT_models": "sit", "build_sit": "sit",
    "sit_config": "sit", "sit_config_from_args": "sit", "count_parameters": "sit",
    "Attention": "attention", "ATTN_BACKENDS": "attention",
    "AutoencoderKL": "vae", "DiagonalGaussianDistribution": "vae", "build_vae": "vae", "load_vae_weights": "vae",
    "load_latents_stats": "vae", "save_latents_stats": "vae", "diffusers_to_ldm": "vae",
    "ldm_to_diffusers": "vae", "diffusers_config": "vae",
    "NLayerDiscriminator": "discriminator", "build_discriminator": "discriminator",
    "LPIPS": "lpips",
    "DINOv2Encoder": "encoders", "load_encoders": "encoders", "preprocess_for_dinov2": "encoders",
    "load_weights": "weights", "save_weights": "weights", "read_weight_file": "weights",
    "load_state_dict_checked": "weights",
    "ReleasedModels": "release", "build_from_args": "release", "load_released_checkpoint": "release",
    "read_run_args": "release",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'repae.model' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
