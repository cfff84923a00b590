"""DINOv2 encoder: preprocessing, pos-embed resample, official/timm weight files, output, frozen/eval.

References are written here independently of model/encoders.py: the preprocessing as explicit mean/std math
and F.interpolate (no torchvision), the pos_embed as timm's resample_abs_pos_embed and as a plain
F.interpolate(bicubic, antialias=True), and official-layout files built by renaming a random timm model.
Same ops in the same order are compared exactly (the eager antialias reference equals timm's bitwise);
reordered math (normalize after resize) to 1e-5, and the register model, whose cls_token is rebuilt as
(cls - pos0) + pos0, to 1e-5 (measured 5e-10). Runtime: ViT-S everywhere, one ViT-B test for the
[1, 256, 768] shape; ~11 s on 2 CPU cores.
"""

# B batch, T tokens, E encoder dim

from __future__ import annotations

import re

import pytest
import timm
import timm.models.vision_transformer as timm_vit
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from repae.model.encoders import (
    DINOv2Encoder,
    dinov2_grid_size,
    dinov2_input_size,
    dinov2_official_to_timm,
    load_encoders,
    parse_enc_type,
    preprocess_for_dinov2,
)
from repae.model.weights import save_weights

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def preprocess_ref(x, resolution, normalize_first=True):
    """REPA-E's preprocess_raw_image for DINOv2, without torchvision (size 224 * resolution / 256, exact)."""
    x = x.float() / 255.0
    assert (224 * resolution) % (256 * 14) == 0
    size = 224 * resolution // 256
    if normalize_first:
        return F.interpolate((x - MEAN) / STD, size=size, mode="bicubic", align_corners=False)
    return (F.interpolate(x, size=size, mode="bicubic", align_corners=False) - MEAN) / STD


def pos_embed_ref(pe, grid, num_prefix):
    """Eager bicubic+antialias resample of the square patch part; prefix positions kept."""
    prefix, patches = pe[:, :num_prefix], pe[:, num_prefix:]
    side, dim = int(patches.shape[1] ** 0.5), pe.shape[-1]
    patches = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([prefix, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


def images(batch, resolution, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8, generator=g)


def official_layout(timm_model, registers):
    """A facebookresearch/dinov2 `*_pretrain.pth` state dict holding timm_model's weights (37x37 + cls)."""
    sd = {k: v.clone() for k, v in timm_model.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    sd["mask_token"] = torch.randn(1, dim)
    if registers:  # DINOv2 keeps the cls position inside pos_embed; timm folds it into cls_token
        pos0 = 0.02 * torch.randn(1, 1, dim)
        sd["register_tokens"] = sd.pop("reg_token")
        sd["pos_embed"] = torch.cat([pos0, sd["pos_embed"]], dim=1)
        sd["cls_token"] = sd["cls_token"] - pos0
    assert sd["pos_embed"].shape[1] == 1 + 37 * 37
    return sd


@pytest.fixture(scope="module")
def vit_s_source():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0).eval()


@pytest.fixture(scope="module")
def vit_s_official(tmp_path_factory, vit_s_source):
    folder = tmp_path_factory.mktemp("weights")
    torch.save(official_layout(vit_s_source, registers=False), folder / "dinov2_vits14_pretrain.pth")
    return folder


@pytest.fixture(scope="module")
def vit_s_loaded(vit_s_official):
    encoders, z_dims = load_encoders("dinov2-vit-s", 256, weights_dir=vit_s_official)
    assert z_dims == [384] and len(encoders) == 1
    return encoders[0]


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("resolution", [256, 512, 64])
def test_preprocess_matches_reference(resolution):
    """x / 255, normalize, bicubic to 224 (448 at 512 px, 56 at 64 px) without antialias, fp32, bit for bit."""
    x = images(2, resolution)
    got = preprocess_for_dinov2(x, resolution)
    size = 224 * resolution // 256
    assert got.shape == (2, 3, size, size) and got.dtype == torch.float32
    torch.testing.assert_close(got, preprocess_ref(x, resolution), rtol=0, atol=0)
    # no clamp in between, so normalizing after the resize is the same math (up to rounding)
    torch.testing.assert_close(got, preprocess_ref(x, resolution, normalize_first=False), rtol=0, atol=1e-5)
    # float pixels in [0, 255] give the same result as uint8
    torch.testing.assert_close(preprocess_for_dinov2(x.double(), resolution), got, rtol=0, atol=0)


def test_preprocess_rejects_bad_input():
    """The shape (or the resolution) is named in the error."""
    with pytest.raises(ValueError, match=r"\(3, 256, 256\)"):
        preprocess_for_dinov2(images(1, 256)[0], 256)
    with pytest.raises(ValueError, match=r"\(1, 4, 256, 256\)"):
        preprocess_for_dinov2(torch.zeros(1, 4, 256, 256), 256)
    with pytest.raises(ValueError, match="300"):
        preprocess_for_dinov2(images(1, 256), 300)


@pytest.mark.parametrize("resolution,grid", [(256, 16), (512, 32), (1024, 64), (64, 4), (128, 8), (16, 1), (96, 6)])
def test_resolution_grid_and_input_size(resolution, grid):
    """Input side 224 * resolution / 256 = 14 * grid; at multiples of 256 exactly the original's 224 * (res // 256)."""
    assert dinov2_grid_size(resolution) == grid
    assert dinov2_input_size(resolution) == 14 * grid == 224 * resolution // 256
    if resolution % 256 == 0:
        assert dinov2_input_size(resolution) == 224 * (resolution // 256)
        assert dinov2_grid_size(resolution) == 16 * (resolution // 256)


@pytest.mark.parametrize("bad", [0, -256, 300, 100, 8, 264.0, True, "256"])
def test_bad_resolution_is_a_value_error(bad):
    """Not a positive multiple of 16 (so 224 * res / 256 is no multiple of the patch 14): ValueError naming it."""
    for fn in (dinov2_grid_size, dinov2_input_size):
        with pytest.raises(ValueError, match=re.escape(f"resolution {bad!r}")):
            fn(bad)
    with pytest.raises(ValueError, match="multiple of 16"):
        load_encoders("dinov2-vit-s", bad, pretrained=False)


def test_demo_resolution_64_gives_16_tokens():
    """64 px: 56 px DINOv2 input, a 4x4 grid = 16 tokens, the token count of a SiT/2 on 8x8 f8 latents."""
    torch.manual_seed(0)
    enc = DINOv2Encoder("dinov2-vit-s", 64, pretrained=False)
    assert enc.vit.pos_embed.shape == (1, 1 + 16, 384) and enc.vit.patch_embed.grid_size == (4, 4)
    x = images(2, 64, seed=4)
    got = enc(x)
    assert got.shape == (2, 16, 384) and got.dtype == torch.float32
    with torch.no_grad():
        expected = enc.vit.forward_features(preprocess_ref(x, 64))[:, 1:]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---------------------------------------------------------------- enc_type


def test_parse_enc_type():
    """Comma-separated list, spaces allowed; reg -> timm's _reg4_ model and the official _reg4_ file."""
    specs = parse_enc_type("dinov2-vit-b, dinov2reg-vit-l,dinov2-vit-g")
    assert [s.timm_name for s in specs] == [
        "vit_base_patch14_dinov2", "vit_large_patch14_reg4_dinov2", "vit_giant_patch14_dinov2"]
    assert [s.embed_dim for s in specs] == [768, 1024, 1536]
    assert [s.file_name for s in specs] == [
        "dinov2_vitb14_pretrain.pth", "dinov2_vitl14_reg4_pretrain.pth", "dinov2_vitg14_pretrain.pth"]
    assert parse_enc_type("dinov2-vit-s")[0].embed_dim == 384


@pytest.mark.parametrize("bad", ["dinov3-vit-b", "dinov2-vit-x", "dinov2-vit", "dinov2-resnet-b", ""])
def test_unknown_enc_type_is_a_value_error(bad):
    with pytest.raises(ValueError, match="dinov2-vit"):
        load_encoders(bad, pretrained=False)


def test_other_families_are_not_implemented():
    with pytest.raises(NotImplementedError, match="mocov3-vit-b"):
        load_encoders("dinov2-vit-b,mocov3-vit-b", pretrained=False)


# ---------------------------------------------------------------- weights


def test_official_key_conversion():
    """mask_token dropped, giant SwiGLU renamed, registers: cls position folded into cls_token."""
    sd = {"mask_token": torch.zeros(1, 4), "cls_token": torch.ones(1, 1, 4), "pos_embed": torch.arange(12.0).view(
        1, 3, 4), "register_tokens": torch.zeros(1, 4, 4), "blocks.3.mlp.w12.weight": torch.zeros(2),
        "blocks.3.mlp.w3.bias": torch.zeros(1), "norm.weight": torch.zeros(4)}
    out = dinov2_official_to_timm(sd)
    assert sorted(out) == ["blocks.3.mlp.fc1.weight", "blocks.3.mlp.fc2.bias", "cls_token", "norm.weight",
                           "pos_embed", "reg_token"]
    torch.testing.assert_close(out["cls_token"], 1 + torch.arange(4.0).view(1, 1, 4))
    torch.testing.assert_close(out["pos_embed"], sd["pos_embed"][:, 1:])
    assert dinov2_official_to_timm(out).keys() == out.keys()  # timm layout passes through


def test_official_file_round_trip(vit_s_source, vit_s_loaded):
    """Found in $REPAE_WEIGHTS_DIR-like dir, loaded strictly: same weights, pos_embed resampled like REPA-E."""
    pe_37 = vit_s_source.pos_embed.detach()
    expected_pe = resample_abs_pos_embed(pe_37, [16, 16], num_prefix_tokens=1)
    got = vit_s_loaded.vit.state_dict()
    assert got.keys() == vit_s_source.state_dict().keys()
    for key, value in vit_s_source.state_dict().items():
        if key != "pos_embed":
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(got["pos_embed"], expected_pe, rtol=0, atol=0)
    torch.testing.assert_close(got["pos_embed"], pos_embed_ref(pe_37, 16, 1), rtol=0, atol=0)


def test_output_equals_manual_pipeline(vit_s_source, vit_s_loaded, monkeypatch):
    """forward == the 37x37 model's weights + resampled pos_embed, run at 224 px, prefix dropped."""
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=0).eval()
    sd = dict(vit_s_source.state_dict())
    sd["pos_embed"] = pos_embed_ref(sd["pos_embed"], 16, 1)
    ref.load_state_dict(sd, strict=True)
    x = images(2, 256)
    with torch.no_grad():
        expected = ref.forward_features(preprocess_ref(x, 256))[:, 1:]

    def no_resample(*args, **kwargs):
        raise AssertionError("timm resampled pos_embed at forward time")

    monkeypatch.setattr(timm_vit, "resample_abs_pos_embed", no_resample)
    got = vit_s_loaded(x)
    assert got.shape == (2, 256, 384) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(2, 3, 512, 512\)"):
        vit_s_loaded(images(2, 512))


def test_register_model_official_round_trip(tmp_path):
    """Registers: cls position folded into cls_token; pos_embed resampled without prefix; output unchanged."""
    torch.manual_seed(1)
    src = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=518, num_classes=0).eval()
    official = official_layout(src, registers=True)
    path = tmp_path / "my_dinov2_reg.pth"
    torch.save(official, path)
    enc = DINOv2Encoder("dinov2reg-vit-s", 256, weights=path)
    assert enc.num_prefix_tokens == 5
    # DINOv2 resamples its (1 + 37*37) pos_embed with one prefix token; the patch part must match
    expected_pe = resample_abs_pos_embed(official["pos_embed"], [16, 16], num_prefix_tokens=1)
    torch.testing.assert_close(enc.vit.pos_embed.detach(), expected_pe[:, 1:], rtol=0, atol=0)
    # (cls - pos0) + pos0 rounds in the last bit: cls and the output are compared with a tolerance here
    torch.testing.assert_close(enc.vit.cls_token.detach(), src.cls_token.detach(), rtol=0, atol=1e-7)
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=224, num_classes=0).eval()
    sd = dict(src.state_dict())
    sd["pos_embed"] = pos_embed_ref(sd["pos_embed"], 16, 0)
    ref.load_state_dict(sd, strict=True)
    x = images(1, 256, seed=3)
    with torch.no_grad():
        expected = ref.forward_features(preprocess_ref(x, 256))[:, 5:]
    torch.testing.assert_close(enc(x), expected, rtol=0, atol=1e-5)


def test_timm_layout_safetensors(tmp_path, vit_s_source, vit_s_loaded):
    """A timm-layout file (37x37 pos_embed) loads to the same encoder as the official one."""
    path = tmp_path / "vit_small_patch14_dinov2.safetensors"
    save_weights(vit_s_source.state_dict(), path)
    enc = DINOv2Encoder("dinov2-vit-s", 256, weights=path)
    for key, value in vit_s_loaded.vit.state_dict().items():
        torch.testing.assert_close(enc.vit.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_wrong_file_is_a_strict_error(tmp_path, vit_s_source):
    """Strict loading: a missing key or a shape difference is a ValueError naming it."""
    sd = official_layout(vit_s_source, registers=False)
    del sd["blocks.11.ls2.gamma"]
    torch.save(sd, tmp_path / "dinov2_vits14_pretrain.pth")
    with pytest.raises(ValueError, match="blocks.11.ls2.gamma"):
        load_encoders("dinov2-vit-s", weights_dir=tmp_path)
    with pytest.raises(ValueError, match="pos_embed"):  # a ViT-S file for a ViT-B encoder: shapes differ
        load_encoders("dinov2-vit-b", weights=tmp_path / "dinov2_vits14_pretrain.pth")


def test_missing_file_names_it(tmp_path, monkeypatch):
    """No file anywhere: the error names the file, every directory searched and the download URL."""
    monkeypatch.setenv("REPAE_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as err:
        load_encoders("dinov2-vit-b")
    message = str(err.value)
    for part in ("dinov2_vitb14_pretrain.pth", str(tmp_path / "weights"), str(tmp_path / "torch_home"),
                 "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"):
        assert part in message


# ---------------------------------------------------------------- random init, shapes, frozen


def test_random_init_resamples_the_37x37_grid():
    """pretrained=False builds the same 37x37 model (same seed) and resamples it: 32x32 at 512 px."""
    torch.manual_seed(5)
    src = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0)
    torch.manual_seed(5)
    enc = DINOv2Encoder("dinov2-vit-s", 512, pretrained=False)
    assert enc.vit.pos_embed.shape == (1, 1 + 32 * 32, 384) and enc.vit.patch_embed.grid_size == (32, 32)
    expected = resample_abs_pos_embed(src.pos_embed.detach(), [32, 32], num_prefix_tokens=1)
    torch.testing.assert_close(enc.vit.pos_embed.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(enc.vit.pos_embed.detach(), pos_embed_ref(src.pos_embed.detach(), 32, 1),
                               rtol=0, atol=0)
    assert enc(images(1, 512)).shape == (1, 1024, 384)


def test_vit_b_shape_and_manual_pipeline():
    """DINOv2-B at 256 px: [1, 256, 768] = forward_features(preprocessed)[:, 1:] (x_norm_patchtokens)."""
    enc = DINOv2Encoder("dinov2-vit-b", 256, pretrained=False)
    assert enc.embed_dim == 768 and enc.vit.pos_embed.shape == (1, 257, 768)
    x = images(1, 256, seed=7)
    got = enc(x)
    assert got.shape == (1, 256, 768)
    with torch.no_grad():
        expected = enc.vit.forward_features(preprocess_ref(x, 256))[:, 1:]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_frozen_and_always_eval():
    """A parent's .train() leaves the encoder in eval; no parameter trains and no graph is recorded."""
    encoders, z_dims = load_encoders("dinov2-vit-s,dinov2reg-vit-s", pretrained=False)
    assert z_dims == [384, 384]
    enc = encoders[1]
    parent = torch.nn.ModuleDict({"enc": enc, "head": torch.nn.Linear(384, 1)}).train()
    assert parent.head.training and not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    x = images(1, 256).float().requires_grad_(True)
    zs = enc(x)
    assert not zs.requires_grad and zs.grad_fn is None
    with pytest.raises(ValueError, match="one file per encoder"):
        load_encoders("dinov2-vit-s,dinov2-vit-s", weights="one.pth")
