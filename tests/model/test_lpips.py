"""LPIPS (docs/METHOD.md#vae-and-gan-losses): parity with the `lpips` package, the double-rescale flag, fp32 under
autocast, gradients, frozen eval-only module, the shipped linear heads (md5) and the local VGG16 trunk file (layout,
search, errors).

Oracle: `lpips.LPIPS(net="vgg", pnet_rand=True)` (the reference implementation; its trunk is torchvision's
vgg16().features and its heads the same vgg.pth) with our random trunk copied in. The math is the same ops in
the same order, so values are compared with rtol 1e-6 (measured: bitwise equal), input gradients with 1e-5.
No real VGG16 weights exist on this machine: trunk files are written here in torchvision's layout (key names
from torchvision's vgg16 built on the meta device). Images are 32x32/64x64. Runtime ~8 s on 2 CPU cores,
most of it importing lpips/torchvision and building the package's full vgg16.
"""

# B batch

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from repae.model import lpips as ours_lpips
from repae.model.lpips import LPIPS, VGG16_FILE, file_md5, lpips_head_file, vgg16_features
from repae.model.weights import read_weight_file

lpips = pytest.importorskip("lpips")  # absent on the GPU machine; our heads come from its shipped file
torchvision = pytest.importorskip("torchvision")

HEAD_MD5 = "d507d7349b931f0638a25a48a722f98a"
CONV_IDX = {1: (0, 2), 2: (5, 7), 3: (10, 12, 14), 4: (17, 19, 21), 5: (24, 26, 28)}  # slice -> conv indices
RTOL = 1e-6


def images(shape=(2, 3, 64, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1, torch.rand(shape, generator=g) * 2 - 1  # in [-1, 1]


@pytest.fixture(scope="module")
def ours():
    """{double_rescale: LPIPS} sharing one random trunk."""
    torch.manual_seed(0)
    fixed = LPIPS(False, pretrained=False)
    buggy = LPIPS(True, pretrained=False)
    buggy.load_state_dict(fixed.state_dict())
    return {False: fixed, True: buggy}


@pytest.fixture(scope="module")
def theirs(ours):
    with warnings.catch_warnings():  # torchvision's deprecation of vgg16(pretrained=...), which lpips still uses
        warnings.simplefilter("ignore", UserWarning)
        ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    ref.net.load_state_dict(ours[False].net.state_dict())  # strict: same slice layout, same trunk weights
    return ref.requires_grad_(False)


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """A vgg16-397923af.pth-layout file with random features and its state dict."""
    with torch.device("meta"):
        keys = list(torchvision.models.vgg16(weights=None).state_dict().items())
    torch.manual_seed(1)
    sd = {}
    for key, meta in keys:
        # classifier keys get small placeholders (the real ones are 124M floats): they are dropped anyway
        sd[key] = torch.randn(meta.shape) * 0.05 if key.startswith("features.") else torch.zeros(2)
    path = tmp_path_factory.mktemp("hub") / VGG16_FILE
    torch.save(sd, path)
    return path, sd


# ---------------------------------------------------------------------------------------------------
# Layout, heads, frozen/eval
# ---------------------------------------------------------------------------------------------------


def test_state_dict_keys_are_the_originals(ours, theirs):
    keys = ["scaling_layer.shift", "scaling_layer.scale"]
    keys += [f"net.slice{k}.{i}.{p}" for k, idx in CONV_IDX.items() for i in idx for p in ("weight", "bias")]
    keys += [f"lin{k}.model.1.weight" for k in range(5)]
    sd = ours[False].state_dict()
    assert list(sd) == keys
    assert [tuple(sd[f"lin{k}.model.1.weight"].shape) for k in range(5)] == [(1, c, 1, 1) for c in (64, 128, 256,
                                                                                                     512, 512)]
    # the package holds the same keys plus `lins.k.*` copies (a ModuleList we do not keep)
    assert [k for k in theirs.state_dict() if not k.startswith("lins.")] == keys
    assert torch.equal(sd["scaling_layer.shift"], torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
    assert torch.equal(sd["scaling_layer.scale"], torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))


def test_shipped_head_file_md5_and_heads_loaded(ours, theirs):
    path = lpips_head_file()
    assert file_md5(path) == HEAD_MD5
    heads = read_weight_file(path)
    assert sorted(heads) == [f"lin{k}.model.1.weight" for k in range(5)]
    for k in range(5):
        assert torch.equal(ours[False].state_dict()[f"lin{k}.model.1.weight"], heads[f"lin{k}.model.1.weight"])
        assert torch.equal(getattr(theirs, f"lin{k}").model[1].weight, heads[f"lin{k}.model.1.weight"])


def test_frozen_and_always_in_eval(ours):
    lp = ours[True]
    assert all(not p.requires_grad for p in lp.parameters())
    assert lp.train() is lp and not any(m.training for m in lp.modules())
    nn.Sequential(lp).train()  # a parent's train() reaches it too
    assert not any(m.training for m in lp.modules())


# ---------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_rescale", [False, True])
def test_identical_images_give_exactly_zero(ours, double_rescale):
    x, _ = images()
    d = ours[double_rescale](x, x.clone())
    assert d.shape == (2, 1, 1, 1) and d.dtype == torch.float32
    assert torch.equal(d, torch.zeros_like(d))


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 32, 48)])
def test_matches_the_lpips_package(ours, theirs, shape):
    x, y = images(shape)
    with torch.no_grad():
        fixed, buggy = ours[False](x, y), ours[True](x, y)
        ref_fixed, ref_buggy = theirs(x, y), theirs(2 * x - 1, 2 * y - 1)  # the bug: [-1, 1] rescaled again
    torch.testing.assert_close(fixed, ref_fixed, rtol=RTOL, atol=0)
    torch.testing.assert_close(buggy, ref_buggy, rtol=RTOL, atol=0)
    assert (fixed - buggy).abs().min() > 1e-3 * fixed.abs().max()  # the flag changes every value


def test_gradients_reach_x_hat_only_and_match_the_package(ours, theirs):
    lp = ours[True]
    x, y = images()
    x_hat = y.clone().requires_grad_(True)
    lp(x, x_hat).sum().backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    assert x.grad is None and not x.requires_grad
    assert all(p.grad is None for p in lp.parameters())

    ref_hat = y.clone().requires_grad_(True)
    theirs(2 * x - 1, 2 * ref_hat - 1).sum().backward()
    torch.testing.assert_close(x_hat.grad, ref_hat.grad, rtol=1e-5, atol=1e-5 * ref_hat.grad.abs().max().item())

    x_req = x.clone().requires_grad_(True)  # x gets a gradient only when it asks for one
    lp(x_req, y).sum().backward()
    assert x_req.grad is not None and x_req.grad.abs().sum() > 0


def test_fp32_under_autocast_and_low_precision_inputs(ours):
    lp = ours[False]
    x, y = images((2, 3, 32, 32))
    with torch.no_grad():
        ref = lp(x, y)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            under_autocast = lp(x, y)
        from_bf16 = lp(x.bfloat16(), y.bfloat16())
        ref_bf16 = lp(x.bfloat16().float(), y.bfloat16().float())
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, ref)
    assert from_bf16.dtype == torch.float32 and torch.equal(from_bf16, ref_bf16)


@pytest.mark.parametrize("shape_x,shape_y,dtype", [
    ((2, 3, 32, 32), (2, 3, 32, 48), torch.float32),   # shapes differ
    ((2, 1, 32, 32), (2, 1, 32, 32), torch.float32),   # not 3 channels
    ((3, 32, 32), (3, 32, 32), torch.float32),         # no batch dim
    ((2, 3, 8, 32), (2, 3, 8, 32), torch.float32),     # smaller than 16
    ((2, 3, 32, 32), (2, 3, 32, 32), torch.uint8),     # not float
])
def test_bad_inputs_name_the_shapes(ours, shape_x, shape_y, dtype):
    with pytest.raises(ValueError, match=r"\(" + ", ".join(map(str, shape_y)) + r"\)"):
        ours[False](torch.zeros(shape_x, dtype=dtype), torch.zeros(shape_y, dtype=dtype))


def test_bad_flag_and_cast_module():
    with pytest.raises(ValueError, match="double_rescale"):
        LPIPS(1, pretrained=False)
    lp = LPIPS(False, pretrained=False).bfloat16()
    with pytest.raises(ValueError, match="bfloat16"):
        lp(*images((1, 3, 32, 32)))


# ---------------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------------


def test_trunk_from_a_torchvision_layout_file(torchvision_file):
    path, sd = torchvision_file
    lp = LPIPS(True, vgg_weights=path)
    for key, value in sd.items():
        if key.startswith("features."):
            idx, name = key.split(".")[1:]
            k = next(k for k, conv in CONV_IDX.items() if int(idx) in conv)
            assert torch.equal(lp.state_dict()[f"net.slice{k}.{idx}.{name}"], value), key
    # the slices cut torchvision's own `features` at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    with torch.device("meta"):
        features = torchvision.models.vgg16(weights=None).features
    features = features.to_empty(device="cpu")
    features.load_state_dict({k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got = lp.net(x)
        h, want = x, []
        for i, layer in enumerate(features):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                want.append(h.clone())
    assert len(got) == 5 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert [repr(m) for m in vgg16_features()] == [repr(m) for m in features[:30]]  # same layers, same settings


@pytest.mark.parametrize("where", ["weights_dir", "env", "hub"])
def test_trunk_file_is_found_in_the_search_dirs(torchvision_file, tmp_path, monkeypatch, where):
    path, sd = torchvision_file
    found = {"weights_dir": tmp_path / "mine", "env": tmp_path / "env", "hub": tmp_path / "hub" / "checkpoints"}
    for folder in found.values():
        folder.mkdir(parents=True)
    (found[where] / VGG16_FILE).symlink_to(path)  # only one of the three folders holds the file
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # downloads go to <hub>/checkpoints
    monkeypatch.setenv("REPAE_WEIGHTS_DIR", str(found["env"]))
    lp = LPIPS(False, weights_dir=found["weights_dir"])
    assert torch.equal(lp.state_dict()["net.slice5.28.bias"], sd["features.28.bias"])


def test_missing_trunk_file_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("REPAE_WEIGHTS_DIR", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as err:
        LPIPS(True, weights_dir=tmp_path / "mine")
    msg = str(err.value)
    for part in (VGG16_FILE, str(tmp_path / "mine"), str(tmp_path / "env"), str(tmp_path / "hub" / "checkpoints"),
                 "REPAE_WEIGHTS_DIR", "vgg_weights=", "https://download.pytorch.org/models/vgg16-397923af.pth"):
        assert part in msg, part
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        LPIPS(True, vgg_weights=tmp_path / "nowhere.pth")


def test_trunk_file_with_missing_keys_is_named(torchvision_file, tmp_path):
    _, sd = torchvision_file
    sd = {k: v for k, v in sd.items() if k != "features.26.weight"}
    torch.save(sd, tmp_path / VGG16_FILE)
    with pytest.raises(ValueError, match=r"missing: slice5\.26\.weight"):
        LPIPS(True, vgg_weights=tmp_path / VGG16_FILE)


def test_head_file_md5_is_checked_and_an_explicit_file_is_loaded(tmp_path, monkeypatch):
    heads = {k: v * 2 for k, v in read_weight_file(lpips_head_file()).items()}
    torch.save(heads, tmp_path / "vgg.pth")
    lp = LPIPS(False, pretrained=False, lin_weights=tmp_path / "vgg.pth")  # explicit: loaded, not md5-checked
    assert torch.equal(lp.lin3.model[1].weight, heads["lin3.model.1.weight"])
    monkeypatch.setattr(ours_lpips, "lpips_head_file", lambda: str(tmp_path / "vgg.pth"))
    with pytest.raises(ValueError, match=f"md5 .* expected {HEAD_MD5}"):
        LPIPS(False, pretrained=False)
