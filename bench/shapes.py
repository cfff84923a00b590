"""The only place benchmark cases live: the real per-GPU shapes of the REPA-E recipe (b=32, the kernels' table in
kernels/recipe.py) with the dtypes each tensor has in training."""

import torch

from repae.kernels.recipe import ADALN_BTD, LATENT_BCHW, REPA_BNE

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

# Sampling benchmarks (bench/bench_sampling.py): (SiT and VAE sizes, the train/generate.py preset whose guidance
# every sampler uses, batch). repae-sdvae: SiT-XL/2 on f8d4 latents [B, 4, 32, 32], CFG 2.2 on t in [0, 0.65].
SAMPLING_CASES = {
    "sitxl2_f8d4_b256": ({"model": "SiT-XL/2", "overrides": {"input_size": 32, "in_channels": 4}, "vae": "f8d4"},
                         "repae-sdvae", 256),
}
# The samplers each sampling case is composed for: (generate.py --mode, --num-steps).
SAMPLER_RUNS = {"ode50": ("ode", 50), "sde250": ("sde", 250)}
# FID Inception (bench/bench_sampling.py): (images per forward, side of the uint8 images).
INCEPTION_CASES = {"b100_r256": (100, 256), "b500_r256": (500, 256)}

# Patched foreign models (bench/bench_integrations.py): (kind, diffusers constructor arguments, per-GPU batch,
# extra inputs). DiT-XL/2 at 256 px, as DiTTransformer2DModel's defaults describe it (28 layers, 16 heads x 72 =
# 1152, patch 2 on 32x32x4 latents, 1000 classes; out_channels 8 for the learned sigma) at b=32, the per-GPU batch
# of the SiT-XL/2 rows of bench_models.py (global 256 on 8 GPUs), so the two tables compare. PixArt-alpha XL/2 at
# 512 px (64x64 latents, 1024 tokens; 28 layers, 1152 wide, T5-XXL captions: 120 tokens of 4096 channels projected
# to the cross-attention width 1152) at b=16: 16384 tokens a batch, about 30 GB of activations in fwd+bwd.
INTEGRATION_CASES = {
    "diffusers_dit_xl2": ("diffusers_dit", dict(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                                out_channels=8, num_layers=28, sample_size=32, patch_size=2,
                                                num_embeds_ada_norm=1000), 32, {}),
    "pixart_alpha_xl2_512": ("pixart", dict(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                            out_channels=8, num_layers=28, cross_attention_dim=1152,
                                            caption_channels=4096, sample_size=64, patch_size=2,
                                            use_additional_conditions=False), 16, {"text_tokens": 120}),
}
