"""VAE (spec §3): parameter counts, LDM keys and shapes, strict reloads, posterior math, and diffusers files.

The diffusers tests build real `diffusers.AutoencoderKL` models (the `test` extra installs diffusers; they
skip without it) and check that our remap loads their state dicts strictly and computes the same
function. Forward tests use 32-64 px images so the file runs in seconds on 2 CPU cores.
"""

from __future__ import annotations

import re

import pytest
import torch

from repae.model.sit import count_parameters
from repae.model.vae import (
    VAE_CONFIGS,
    DiagonalGaussianDistribution,
    build_vae,
    diffusers_to_ldm,
    latents_stats_path,
    load_latents_stats,
    load_vae_weights,
    save_latents_stats,
)
from repae.model.weights import save_weights


def meta_vae(name):
    with torch.device("meta"):
        return build_vae(name)


@pytest.mark.parametrize("name,expected", [("f8d4", 83_653_863), ("f16d32", 69_836_067)])
def test_parameter_counts_match_spec(name, expected):
    assert count_parameters(meta_vae(name)) == expected


def expected_ldm_keys(ch_mult, E, attn_levels_enc, attn_levels_dec):
    """(key prefix -> shape of its weight) for the LDM layout, written out from spec §3."""
    ch = [128 * m for m in ch_mult]
    L = len(ch)
    keys = {"encoder.conv_in": (128, 3, 3, 3)}

    def resnet(prefix, cin, cout):
        keys.update({f"{prefix}.norm1": (cin,), f"{prefix}.conv1": (cout, cin, 3, 3), f"{prefix}.norm2": (cout,),
                     f"{prefix}.conv2": (cout, cout, 3, 3)})
        if cin != cout:
            keys[f"{prefix}.nin_shortcut"] = (cout, cin, 1, 1)

    def attn(prefix, c):
        keys.update({f"{prefix}.norm": (c,), **{f"{prefix}.{n}": (c, c, 1, 1) for n in ("q", "k", "v", "proj_out")}})

    cin = 128
    for i in range(L):
        for j in range(2):
            resnet(f"encoder.down.{i}.block.{j}", cin if j == 0 else ch[i], ch[i])
            if i in attn_levels_enc:
                attn(f"encoder.down.{i}.attn.{j}", ch[i])
        cin = ch[i]
        if i < L - 1:
            keys[f"encoder.down.{i}.downsample.conv"] = (ch[i], ch[i], 3, 3)
    for part in ("encoder", "decoder"):
        resnet(f"{part}.mid.block_1", ch[-1], ch[-1])
        attn(f"{part}.mid.attn_1", ch[-1])
        resnet(f"{part}.mid.block_2", ch[-1], ch[-1])
    keys.update({"encoder.norm_out": (ch[-1],), "encoder.conv_out": (2 * E, ch[-1], 3, 3),
                 "decoder.conv_in": (ch[-1], E, 3, 3)})
    cin = ch[-1]
    for i in reversed(range(L)):
        for j in range(3):
            resnet(f"decoder.up.{i}.block.{j}", cin if j == 0 else ch[i], ch[i])
            if i in attn_levels_dec:
                attn(f"decoder.up.{i}.attn.{j}", ch[i])
        cin = ch[i]
        if i > 0:
            keys[f"decoder.up.{i}.upsample.conv"] = (ch[i], ch[i], 3, 3)
    keys.update({"decoder.norm_out": (128,), "decoder.conv_out": (3, 128, 3, 3),
                 "quant_conv": (2 * E, 2 * E, 1, 1), "post_quant_conv": (E, E, 1, 1)})
    return keys


@pytest.mark.parametrize("name,ch_mult,E,attn_levels", [("f8d4", (1, 2, 4, 4), 4, ()),
                                                        ("f16d32", (1, 1, 2, 2, 4), 32, (4,))])
def test_ldm_keys_and_shapes_match_spec(name, ch_mult, E, attn_levels):
    sd = meta_vae(name).state_dict()
    want = expected_ldm_keys(ch_mult, E, attn_levels, attn_levels)
    got_weights = {k[: -len(".weight")]: tuple(v.shape) for k, v in sd.items() if k.endswith(".weight")}
    assert got_weights == want
    assert {k for k in sd if k.endswith(".bias")} == {k + ".bias" for k in want}
    # Module order: encoder, decoder, quant_conv, post_quant_conv; decoder levels up.0 .. up.L-1.
    tops = list(dict.fromkeys(k.split(".")[0] for k in sd))
    assert tops == ["encoder", "decoder", "quant_conv", "post_quant_conv"]
    ups = list(dict.fromkeys(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))))
    assert ups == list(range(len(ch_mult)))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_strict_save_reload(tmp_path, suffix):
    torch.manual_seed(0)
    vae = build_vae("f16d32")
    save_weights(vae.state_dict(), tmp_path / f"vae{suffix}")
    other = load_vae_weights(build_vae("f16d32"), tmp_path / f"vae{suffix}")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), other.state_dict().values()))
    with pytest.raises(ValueError, match="shape mismatch"):  # an f16d32 file is not an f8d4 VAE
        load_vae_weights(build_vae("f8d4"), tmp_path / f"vae{suffix}")


def test_checkpoint_vae_entry_and_missing_key(tmp_path):
    vae = build_vae("f8d4")
    sd = vae.state_dict()
    torch.save({"vae": sd, "steps": 1}, tmp_path / "ckpt.pt")
    load_vae_weights(build_vae("f8d4"), tmp_path / "ckpt.pt", key="vae")
    sd.pop("decoder.up.0.block.2.conv2.bias")
    save_weights(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"decoder\.up\.0\.block\.2\.conv2\.bias"):
        load_vae_weights(build_vae("f8d4"), tmp_path / "bad.pt")


@pytest.mark.parametrize("name,factor,E", [("f8d4", 8, 4), ("f16d32", 16, 32)])
def test_encode_decode_shapes(name, factor, E):
    torch.manual_seed(0)
    vae = build_vae(name)
    x = torch.rand(2, 3, 64, 32) * 2 - 1
    posterior, z, recon = vae(x)
    assert z.shape == (2, E, 64 // factor, 32 // factor) and z.dtype == torch.float32
    assert posterior.mean.shape == z.shape and recon.shape == x.shape
    torch.testing.assert_close(vae.decode(posterior.mode()), vae(x, sample_posterior=False)[2])
    with pytest.raises(ValueError, match=rf"multiples of {factor}"):
        vae.encode(torch.zeros(1, 3, 36, 64))
    with pytest.raises(ValueError, match="float tensor"):
        vae.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_posterior_kl_clamp_and_sampling():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 4, 4, generator=g) * 3
    moments[0, 4:, 0, 0] = 50.0  # logvar above the clamp
    moments[1, 4:, 0, 0] = -80.0  # below
    post = DiagonalGaussianDistribution(moments)
    mean, logvar = moments[:, :4], moments[:, 4:].clamp(-30, 20)
    assert post.logvar[0, 0, 0, 0] == 20 and post.logvar[1, 0, 0, 0] == -30
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), kl)
    eps = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(post.sample(torch.Generator().manual_seed(7)), mean + (0.5 * logvar).exp() * eps)
    assert torch.equal(post.mode(), mean)


def test_latents_stats_file_round_trip(tmp_path):
    path = latents_stats_path(tmp_path / "e2e-sdvae.pt")
    assert path.endswith("e2e-sdvae-latents-stats.pt")
    bias, scale = torch.randn(4), torch.rand(4) + 0.1
    save_latents_stats(path, bias, scale)
    raw = torch.load(path, weights_only=True)
    assert raw["latents_scale"].shape == (1, 4, 1, 1) and raw["latents_bias"].shape == (1, 4, 1, 1)
    b, s = load_latents_stats(path)
    assert torch.equal(b, bias) and torch.equal(s, scale)
    torch.save({"latents_scale": scale}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="lacks"):
        load_latents_stats(tmp_path / "bad.pt")


# ---------------------------------------------------------------------------------------------------
# diffusers files (real diffusers.AutoencoderKL models)
# ---------------------------------------------------------------------------------------------------


def diffusers_vae(name):
    diffusers = pytest.importorskip("diffusers")
    cfg = VAE_CONFIGS[name]
    L = len(cfg.ch_mult)
    attn = [cfg.resolution // 2**i in cfg.attn_resolutions for i in range(L)]
    down = tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn)
    up = tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn))  # lowest res first
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=down, up_block_types=up,
                                    block_out_channels=tuple(128 * m for m in cfg.ch_mult), layers_per_block=2,
                                    latent_channels=cfg.embed_dim, norm_num_groups=32, sample_size=cfg.resolution)
    with torch.no_grad():  # random non-trivial values everywhere (GroupNorm affine included)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.mark.parametrize("name", ["f8d4", "f16d32"])
def test_diffusers_file_loads_and_computes_the_same(tmp_path, name):
    theirs = diffusers_vae(name)
    save_weights(theirs.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    ours = load_vae_weights(build_vae(name), tmp_path / "diffusion_pytorch_model.safetensors").eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        dist = theirs.encode(x).latent_dist
        post = ours.encode(x)
        torch.testing.assert_close(post.mean, dist.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(post.logvar, dist.logvar, atol=1e-5, rtol=1e-5)
        z = dist.mean
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=1e-4, rtol=1e-4)


def test_diffusers_remap_is_a_bijection_onto_ldm_keys():
    theirs = diffusers_vae("f16d32").state_dict()
    mapped = diffusers_to_ldm(theirs)
    ours = meta_vae("f16d32").state_dict()
    assert set(mapped) == set(ours) and len(mapped) == len(theirs)
    assert all(tuple(mapped[k].shape) == tuple(ours[k].shape) for k in ours)
    with pytest.raises(ValueError, match="no LDM name"):
        diffusers_to_ldm({**theirs, "encoder.extra_block.weight": torch.zeros(1)})


def test_old_diffusers_attention_names_are_understood():
    theirs = diffusers_vae("f8d4").state_dict()
    old = {re.sub(r"\.to_q\.", ".query.", re.sub(r"\.to_k\.", ".key.", re.sub(r"\.to_v\.", ".value.",
           re.sub(r"\.to_out\.0\.", ".proj_attn.", k)))): v for k, v in theirs.items()}
    assert diffusers_to_ldm(old).keys() == diffusers_to_ldm(theirs).keys()
