"""The only place benchmark cases live: the real per-GPU shapes of the REPA-E recipe (b=32, the kernels' table in
kernels/recipe.py) with the dtypes each tensor has in training."""

import torch

from repae.kernels.recipe import ADALN_BTD, LATENT_BCHW, REPA_BNE

# Measured device-to-device copy bandwidth (bytes read + written), the roofline of the kernel benchmarks:
# H100 3.0 TB/s (project notes, 2026-11-23); H200 ~4.3 TB/s (device notes, 2026-10-28; bench/ceilings.py
# re-measures it into bench/results/<gpu>/hw.json in every GPU report).
HBM_GBPS_BY_GPU = {"H100": 3000.0, "H200": 4300.0}


def hbm_gbps(gpu_name: str) -> float:
    """The copy bandwidth of the named GPU (the first table entry found in its name; else the H100's)."""
    return next((v for k, v in HBM_GBPS_BY_GPU.items() if k in gpu_name), HBM_GBPS_BY_GPU["H100"])

BENCH_CASES = {
    # adaLN at SiT-XL/2's residual stream [b, T, D]: (shape, branch dtype, residual dtype, h dtype)
    "adaln": {
        "sitxl2_fp32res_bf16h": (ADALN_BTD, torch.bfloat16, torch.float32, torch.bfloat16),
        "sitxl2_bf16": (ADALN_BTD, torch.bfloat16, torch.bfloat16, torch.bfloat16),
    },
    # REPA loss: projector output (bf16) vs DINOv2-B features (fp32) [b, N, C]
    "repa_loss": {
        "dinov2b_bf16_fp32": (REPA_BNE, torch.bfloat16, torch.float32),
    },
    # latent BN + interpolation on z [b, C, H, W] fp32: f8d4 and f16d32 at 256 px
    "latent_bn": {
        "f8d4": (LATENT_BCHW["f8d4"], torch.float32),
        "f16d32": (LATENT_BCHW["f16d32"], torch.float32),
    },
}

# Whole-model benchmarks (bench/bench_models.py): (kind, sizes, per-GPU batch).
MODEL_CASES = {
    "sitxl_block": ("sit_block", {"hidden_size": 1152, "num_heads": 16, "tokens": 256}, 32),
    "sitxl2": ("sit", {"model": "SiT-XL/2", "overrides": {"input_size": 32, "in_channels": 4}}, 32),
    "sitxl2_loss": ("sit_loss", {"model": "SiT-XL/2", "overrides": {"input_size": 32, "in_channels": 4}}, 32),
    "vae_f8d4": ("vae", {"vae": "f8d4", "resolution": 256}, 8),
}
