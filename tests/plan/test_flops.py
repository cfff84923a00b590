"""The run planner's FLOP counts (plan/trace.py, plan/roofline.py) against analytic counts written out here.

The SiT-XL/2 count is the textbook one (linear layers 24 d^2 T L, attention 4 T^2 d L, plus the adaLN, embedder,
projector and final-layer matmuls); the VAE's conv count is a hand list of the f8d4 layers. Both to 1 %.
"""

# T tokens, d hidden width, L depth, p patch, C latent channels

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from repae.model.flops import flops_by_family
from repae.model.vae import build_vae
from repae.plan.roofline import flops_per_image
from repae.plan.trace import PHASES, trace_step
from repae.train.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "sitxl_repae.json"


@pytest.fixture(scope="module")
def step_flops() -> dict[str, dict[str, float]]:
    return flops_per_image(trace_step(load_config(CONFIG), 2))


def sit_xl2_forward_flops(T=256, d=1152, L=28, p=2, C=4, freq=256, proj=2048, z=768) -> int:
    """Forward FLOPs per image of SiT-XL/2 (2 FLOPs per multiply-add; biases and elementwise ops not counted)."""
    blocks = 24 * d * d * T * L + 4 * T * T * d * L  # qkv 3d^2 + out d^2 + mlp 8d^2 per token; QK^T and AV
    adaln = 2 * d * 6 * d * L + 2 * d * 2 * d  # one conditioning row per image: 6d per block, 2d in the final layer
    embed = 2 * T * (p * p * C) * d + 2 * (freq * d + d * d)  # patch conv, timestep MLP (labels: a table lookup)
    final = 2 * T * d * (p * p * C)
    projector = 2 * T * (d * proj + proj * proj + proj * z)  # the REPA projector after block encoder_depth
    return blocks + adaln + embed + final + projector


def vae_f8d4_conv_flops(R=256, ch=128) -> int:
    """Conv FLOPs per image of the f8d4 VAE forward (encode + decode) at R px, from its layer list."""
    def conv(cin, cout, k, side):
        return 2 * cin * cout * k * k * side * side

    def res(cin, cout, side):  # conv1, conv2, 1x1 shortcut when the width changes
        return conv(cin, cout, 3, side) + conv(cout, cout, 3, side) + (conv(cin, cout, 1, side) if cin != cout else 0)

    attn = 4 * conv(4 * ch, 4 * ch, 1, R // 8)  # q, k, v, proj_out (the attention matmuls are not convs)
    mid = 2 * res(4 * ch, 4 * ch, R // 8) + attn
    encoder = (conv(3, ch, 3, R)
               + 2 * res(ch, ch, R) + conv(ch, ch, 3, R // 2)  # level 0, downsample
               + res(ch, 2 * ch, R // 2) + res(2 * ch, 2 * ch, R // 2) + conv(2 * ch, 2 * ch, 3, R // 4)
               + res(2 * ch, 4 * ch, R // 4) + res(4 * ch, 4 * ch, R // 4) + conv(4 * ch, 4 * ch, 3, R // 8)
               + 2 * res(4 * ch, 4 * ch, R // 8)  # level 3: no downsample
               + mid + conv(4 * ch, 8, 3, R // 8) + conv(8, 8, 1, R // 8))  # conv_out to 2E, quant_conv
    decoder = (conv(4, 4, 1, R // 8) + conv(4, 4 * ch, 3, R // 8) + mid  # post_quant_conv, conv_in
               + 3 * res(4 * ch, 4 * ch, R // 8) + conv(4 * ch, 4 * ch, 3, R // 4)  # up.3, upsample (conv after x2)
               + 3 * res(4 * ch, 4 * ch, R // 4) + conv(4 * ch, 4 * ch, 3, R // 2)  # up.2
               + res(4 * ch, 2 * ch, R // 2) + 2 * res(2 * ch, 2 * ch, R // 2) + conv(2 * ch, 2 * ch, 3, R)  # up.1
               + res(2 * ch, ch, R) + 2 * res(ch, ch, R)  # up.0
               + conv(ch, 3, 3, R))
    return encoder + decoder


def test_sit_xl2_forward_matches_the_analytic_count(step_flops):
    counted = sum(step_flops["sit_forward"].values())
    assert counted == pytest.approx(sit_xl2_forward_flops(), rel=0.01)
    assert step_flops["sit_forward"]["attention"] == pytest.approx(4 * 256**2 * 1152 * 28, rel=0.01)


def test_sit_training_is_about_three_forwards(step_flops):
    fwd = sum(step_flops["sit_forward"].values())
    assert fwd + sum(step_flops["sit_backward_step"].values()) == pytest.approx(3 * fwd, rel=0.01)


def test_vae_conv_flops_match_the_hand_count(step_flops):
    with torch.device("meta"):
        vae = build_vae("f8d4")
        x = torch.zeros(1, 3, 256, 256)
        counter = FlopCounterMode(display=False)
        with counter:
            vae(x, sample_posterior=False)
    conv = flops_by_family(counter.get_flop_counts()["Global"])["conv"]
    assert conv == pytest.approx(vae_f8d4_conv_flops(), rel=0.01)
    assert step_flops["vae_forward"]["conv"] == pytest.approx(conv, rel=0.01)  # the step's phase: the same pass


def test_every_phase_is_counted(step_flops):
    assert tuple(step_flops) == PHASES
    for name in ("dinov2", "vae_forward", "lpips_gan_loss", "align_forward", "vae_backward_step", "disc"):
        assert sum(step_flops[name].values()) > 0, name
    assert all(v >= 0 for fam in step_flops.values() for v in fam.values())
