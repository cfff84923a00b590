"""timm and lpips import and build models offline once repae.model is imported (CPU torch included)."""

import torch

import repae.model  # noqa: F401  (installs the torchvision guard)


def test_timm_dinov2_builds_offline():
    import timm

    m = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56)
    assert m.forward_features(torch.randn(1, 3, 56, 56)).shape == (1, 1 + 16, 384)


def test_lpips_linear_heads_ship_with_the_package():
    import lpips

    assert lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).lin0.model[1].weight.shape == (1, 64, 1, 1)
