"""VAE (docs/METHOD.md#vae): parameter counts, LDM keys and shapes, strict reloads, posterior math, latents-stats files
and diffusers files.

The diffusers layout is written out by hand here (`ldm_to_diffusers`, following diffusers' AutoencoderKL
naming) so the remap is checked without diffusers; with diffusers installed (the `test` extra), real
`diffusers.AutoencoderKL` models also check that naming and that our remap computes the same function.
Forward tests use 32-64 px images so the file runs in seconds on 2 CPU cores.
"""

from __future__ import annotations

import re

import pytest
import torch

from repae.model.sit import count_parameters
from repae.model.vae import (
    VAE_CONFIGS,
    DiagonalGaussianDistribution,
    VAEConfig,
    build_vae,
    diffusers_to_ldm,
    is_diffusers_state_dict,
    latents_stats_path,
    load_latents_stats,
    load_vae_weights,
    save_latents_stats,
    vae_config,
)
from repae.model.weights import save_weights

# name -> (ch_mult, E, levels with attention); written from the method's table (docs/METHOD.md#vae), not from
# VAE_CONFIGS
SPEC = {"f8d4": ((1, 2, 4, 4), 4, ()), "f16d32": ((1, 1, 2, 2, 4), 32, (4,))}


def meta_vae(name):
    with torch.device("meta"):
        return build_vae(name)


def seeded_vae(name, seed=0):
    """A VAE with random non-trivial values everywhere (GroupNorm affine included)."""
    torch.manual_seed(seed)
    vae = build_vae(name).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vae


# ---------------------------------------------------------------------------------------------------
# Sizes, keys and shapes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,expected", [("f8d4", 83_653_863), ("f16d32", 69_836_067)])
def test_parameter_counts_match_spec(name, expected):
    """Spec section 3 table: 83,653,863 (f8d4) and 69,836,067 (f16d32), counted on meta tensors."""
    assert count_parameters(meta_vae(name)) == expected


def expected_ldm_keys(ch_mult, E, attn_levels):
    """(key prefix -> shape of its weight) for the LDM layout, written out from docs/METHOD.md#vae."""
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
            if i in attn_levels:
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
            if i in attn_levels:
                attn(f"decoder.up.{i}.attn.{j}", ch[i])
        cin = ch[i]
        if i > 0:
            keys[f"decoder.up.{i}.upsample.conv"] = (ch[i], ch[i], 3, 3)
    keys.update({"decoder.norm_out": (128,), "decoder.conv_out": (3, 128, 3, 3),
                 "quant_conv": (2 * E, 2 * E, 1, 1), "post_quant_conv": (E, E, 1, 1)})
    return keys


@pytest.mark.parametrize("name", list(SPEC))
def test_ldm_keys_and_shapes_match_spec(name):
    """Every LDM key and weight shape, generated independently from the description in docs/METHOD.md#vae."""
    ch_mult, E, attn_levels = SPEC[name]
    cfg = VAE_CONFIGS[name]
    assert (cfg.ch_mult, cfg.embed_dim, cfg.factor) == (ch_mult, E, 2 ** (len(ch_mult) - 1))
    sd = meta_vae(name).state_dict()
    want = expected_ldm_keys(ch_mult, E, attn_levels)
    got_weights = {k[: -len(".weight")]: tuple(v.shape) for k, v in sd.items() if k.endswith(".weight")}
    assert got_weights == want
    assert {k for k in sd if k.endswith(".bias")} == {k + ".bias" for k in want}
    # Module order: encoder, decoder, quant_conv, post_quant_conv; decoder levels up.0 .. up.L-1.
    tops = list(dict.fromkeys(k.split(".")[0] for k in sd))
    assert tops == ["encoder", "decoder", "quant_conv", "post_quant_conv"]
    ups = list(dict.fromkeys(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))))
    assert ups == list(range(len(ch_mult)))


# The LDM key families of docs/METHOD.md#vae; every key must match exactly one.
LDM_PATTERNS = {
    "level_resnet": r"(encoder\.down|decoder\.up)\.\d+\.block\.\d+\.(norm1|conv1|norm2|conv2|nin_shortcut)",
    "level_attn": r"(encoder\.down|decoder\.up)\.\d+\.attn\.\d+\.(norm|q|k|v|proj_out)",
    "resample": r"(encoder\.down\.\d+\.downsample|decoder\.up\.\d+\.upsample)\.conv",
    "mid": r"(encoder|decoder)\.mid\.(block_[12]\.(norm1|conv1|norm2|conv2|nin_shortcut)"
           r"|attn_1\.(norm|q|k|v|proj_out))",
    "in_out": r"(encoder|decoder)\.(conv_in|norm_out|conv_out)",
    "quant": r"(quant_conv|post_quant_conv)",
}
# Tensors per family (weight + bias): f8d4 has 20 res blocks in levels (4 with nin_shortcut), no level
# attention, 3 + 3 resamplers; f16d32 has 25 (4 with nin_shortcut), 2 + 3 AttnBlocks, 4 + 4 resamplers.
PATTERN_COUNTS = {
    "f8d4": {"level_resnet": 20 * 8 + 4 * 2, "level_attn": 0, "resample": 12, "mid": 52, "in_out": 12, "quant": 4},
    "f16d32": {"level_resnet": 25 * 8 + 4 * 2, "level_attn": 5 * 10, "resample": 16, "mid": 52, "in_out": 12,
               "quant": 4},
}
SHAPES = {
    "f8d4": {"encoder.conv_out.weight": (8, 512, 3, 3), "quant_conv.weight": (8, 8, 1, 1),
             "post_quant_conv.weight": (4, 4, 1, 1), "decoder.conv_in.weight": (512, 4, 3, 3),
             "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
             "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
             "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
             "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3), "decoder.mid.attn_1.q.weight": (512, 512, 1, 1)},
    "f16d32": {"encoder.conv_out.weight": (64, 512, 3, 3), "quant_conv.weight": (64, 64, 1, 1),
               "post_quant_conv.weight": (32, 32, 1, 1), "decoder.conv_in.weight": (512, 32, 3, 3),
               "encoder.down.4.attn.1.proj_out.weight": (512, 512, 1, 1),
               "decoder.up.4.attn.2.q.weight": (512, 512, 1, 1),
               "decoder.up.1.block.0.nin_shortcut.weight": (128, 256, 1, 1),
               "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1)},
}
ABSENT = {"f8d4": ["decoder.up.0.upsample.conv.weight", "encoder.down.3.downsample.conv.weight",
                   "decoder.up.2.block.0.nin_shortcut.weight", "encoder.down.3.attn.0.q.weight"],
          "f16d32": ["decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.3.attn.0.q.weight",
                     "encoder.down.4.downsample.conv.weight", "encoder.down.4.attn.2.q.weight"]}


@pytest.mark.parametrize("name", list(SPEC))
def test_key_families_counts_and_exact_shapes(name):
    """Each key in exactly one LDM family, the family sizes, and spot shapes incl. absent keys."""
    sd = meta_vae(name).state_dict()
    counts = dict.fromkeys(LDM_PATTERNS, 0)
    for key in sd:
        hits = [f for f, p in LDM_PATTERNS.items() if re.fullmatch(rf"{p}\.(weight|bias)", key)]
        assert len(hits) == 1, f"{key} matches {hits}"
        counts[hits[0]] += 1
    assert counts == PATTERN_COUNTS[name] and len(sd) == sum(PATTERN_COUNTS[name].values())
    assert {k: tuple(sd[k].shape) for k in SHAPES[name]} == SHAPES[name]
    assert not [k for k in ABSENT[name] if k in sd]


def test_config_errors_name_the_field():
    """Bad VAEConfig values and unknown registry names are ValueErrors naming them."""
    with pytest.raises(ValueError, match=r"divisible by 32 .*ch=40"):  # GroupNorm(32) needs widths % 32 == 0
        VAEConfig(ch=40)
    with pytest.raises(ValueError, match="ch_mult"):
        VAEConfig(ch_mult=())
    with pytest.raises(ValueError, match="embed_dim"):
        VAEConfig(embed_dim=0)
    with pytest.raises(ValueError, match="resolution"):
        VAEConfig(resolution=100)
    with pytest.raises(ValueError, match="unknown VAE 'f4d8'"):
        build_vae("f4d8")
    assert VAEConfig(ch_mult=[1, 2], attn_resolutions=[8]).ch_mult == (1, 2)


# ---------------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_strict_save_reload(tmp_path, suffix):
    """save_weights -> load_vae_weights restores every tensor and the key order; wrong configs fail."""
    vae = seeded_vae("f16d32")
    save_weights(vae.state_dict(), tmp_path / f"vae{suffix}")
    other = load_vae_weights(build_vae("f16d32"), tmp_path / f"vae{suffix}")
    assert list(other.state_dict()) == list(vae.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), other.state_dict().values()))
    with pytest.raises(ValueError, match="shape mismatch"):  # an f16d32 file is not an f8d4 VAE
        load_vae_weights(build_vae("f8d4"), tmp_path / f"vae{suffix}")


def test_checkpoint_entry_missing_key_and_wrong_shape_are_named(tmp_path):
    """key='vae' picks a checkpoint entry; strict errors name the key."""
    vae = build_vae("f16d32")
    sd = vae.state_dict()
    torch.save({"vae": sd, "steps": 1}, tmp_path / "ckpt.pt")
    load_vae_weights(build_vae("f16d32"), tmp_path / "ckpt.pt", key="vae")
    missing = {k: v for k, v in sd.items() if k != "decoder.up.0.block.2.conv2.bias"}
    save_weights(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing: decoder\.up\.0\.block\.2\.conv2\.bias"):
        load_vae_weights(vae, tmp_path / "missing.pt")
    wrong = {**sd, "encoder.mid.attn_1.q.weight": sd["encoder.mid.attn_1.q.weight"][:, :, 0, 0]}  # Linear shape
    save_weights(wrong, tmp_path / "wrong.safetensors")
    want = r"encoder\.mid\.attn_1\.q\.weight: model \(512, 512, 1, 1\), file \(512, 512\)"
    with pytest.raises(ValueError, match=want):
        load_vae_weights(vae, tmp_path / "wrong.safetensors")


# ---------------------------------------------------------------------------------------------------
# Forward and posterior
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,factor,E", [("f8d4", 8, 4), ("f16d32", 16, 32)])
def test_encode_decode_shapes(name, factor, E):
    """Latent and image shapes for both factors, channels_last inputs, and input-shape errors."""
    torch.manual_seed(0)
    vae = build_vae(name)
    x = torch.rand(2, 3, 64, 32) * 2 - 1
    with torch.no_grad():
        posterior, z, recon = vae(x)
        assert z.shape == (2, E, 64 // factor, 32 // factor) and z.dtype == torch.float32
        assert posterior.mean.shape == z.shape and posterior.kl().shape == (2,) and recon.shape == x.shape
        torch.testing.assert_close(vae.decode(posterior.mode()), vae(x, sample_posterior=False)[2])
        # channels_last inputs flow through (same values)
        z_cl = vae.encode(x.contiguous(memory_format=torch.channels_last)).mode()
        torch.testing.assert_close(z_cl, posterior.mode(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=rf"multiples of {factor}, got \[1, 3, 36, 64\]"):
        vae.encode(torch.zeros(1, 3, 36, 64))
    with pytest.raises(ValueError, match=r"got \[3, 64, 64\]"):
        vae.encode(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="float tensor"):
        vae.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=rf"z must be \[B, {E}, H, W\]"):
        vae.decode(torch.zeros(1, E + 1, 4, 4))


def test_posterior_kl_clamp_and_sampling():
    """logvar clamp, KL against an element-by-element fp64 loop, seeded sampling."""
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 4, 4, generator=g) * 3
    moments[0, 4:, 0, 0] = 50.0  # logvar above the clamp
    moments[1, 4:, 0, 0] = -80.0  # below
    post = DiagonalGaussianDistribution(moments)
    mean, logvar = moments[:, :4], moments[:, 4:].clamp(-30, 20)
    assert post.logvar[0, 0, 0, 0] == 20 and post.logvar[1, 0, 0, 0] == -30
    torch.testing.assert_close(post.var, logvar.exp())
    torch.testing.assert_close(post.std, (0.5 * logvar).exp())
    kl = torch.zeros(3, dtype=torch.float64)  # hand-written: one term per element, fp64
    for b in range(3):
        for c in range(4):
            for h in range(4):
                for w in range(4):
                    m, lv = mean[b, c, h, w].double(), logvar[b, c, h, w].double()
                    kl[b] += 0.5 * (m * m + lv.exp() - 1 - lv)
    torch.testing.assert_close(post.kl().double(), kl, rtol=1e-5, atol=1e-3)
    eps = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    z = post.sample(torch.Generator().manual_seed(7))
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, mean + (0.5 * logvar).exp() * eps)
    assert torch.equal(z, post.sample(torch.Generator().manual_seed(7)))
    assert torch.equal(post.mode(), mean)


def test_forward_sampling_is_reproducible_and_takes_noise():
    """vae(x, generator=) repeats; vae(x, noise=eps) is the same z."""
    vae = build_vae("f16d32").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        post, z1, r1 = vae(x, generator=torch.Generator().manual_seed(3))
        _, z2, r2 = vae(x, generator=torch.Generator().manual_seed(3))
        assert torch.equal(z1, z2) and torch.equal(r1, r2)
        eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(3))
        assert torch.equal(z1, post.mean + post.std * eps)
        assert torch.equal(vae(x, noise=eps)[1], z1)
    with pytest.raises(ValueError, match=r"noise \[2, 32, 1, 1\] must match the latents \[2, 32, 2, 2\]"):
        vae(x, noise=torch.zeros(2, 32, 1, 1))


# ---------------------------------------------------------------------------------------------------
# Latents-stats files
# ---------------------------------------------------------------------------------------------------


def test_latents_stats_file_round_trip(tmp_path):
    """[1, C, 1, 1] on disk, [C] on load; [C] files, .safetensors and bad files."""
    path = latents_stats_path(tmp_path / "e2e-sdvae.pt")
    assert path.endswith("e2e-sdvae-latents-stats.pt")
    bias, scale = torch.randn(4), torch.rand(4) + 0.1
    save_latents_stats(path, bias, scale)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"latents_scale", "latents_bias"}
    assert raw["latents_scale"].shape == (1, 4, 1, 1) and raw["latents_bias"].shape == (1, 4, 1, 1)
    b, s = load_latents_stats(path)
    assert torch.equal(b, bias) and torch.equal(s, scale)
    # [C]-shaped entries (squeezed on load either way), safetensors, C = 1
    save_weights({"latents_scale": scale[:1], "latents_bias": bias[:1]}, tmp_path / "one.safetensors")
    b, s = load_latents_stats(tmp_path / "one.safetensors")
    assert b.shape == s.shape == (1,) and torch.equal(s, scale[:1])
    torch.save({"latents_scale": scale}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"lacks \['latents_bias'\]"):
        load_latents_stats(tmp_path / "bad.pt")
    torch.save({"latents_scale": scale.view(2, 2), "latents_bias": bias}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"latents_scale must be \[C\] or \[1, C, 1, 1\], got \[2, 2\]"):
        load_latents_stats(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="differ"):
        save_latents_stats(tmp_path / "x.pt", bias, scale[:3])


# ---------------------------------------------------------------------------------------------------
# diffusers layout, written by hand
# ---------------------------------------------------------------------------------------------------

DIFFUSERS_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
DIFFUSERS_ATTN_OLD = {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}


def ldm_to_diffusers(sd, num_levels, attn_names=DIFFUSERS_ATTN):
    """diffusers AutoencoderKL names for an LDM state dict (attention projections as Linear [C, C])."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        part, rest = parts[0], parts[1:]
        if rest[0] == "norm_out":
            rest = ["conv_norm_out"] + rest[1:]
        elif rest[0] == "mid":
            inner = {"block_1": ["resnets", "0"], "block_2": ["resnets", "1"], "attn_1": ["attentions", "0"]}
            rest = ["mid_block"] + inner[rest[1]] + rest[2:]
        elif rest[0] in ("down", "up"):
            i = int(rest[1])
            if rest[0] == "up":
                i = num_levels - 1 - i  # diffusers counts up_blocks from the lowest resolution
            blocks = "down_blocks" if rest[0] == "down" else "up_blocks"
            kind = {"block": ["resnets", rest[3]] if len(rest) > 3 else None,
                    "attn": ["attentions", rest[3]] if len(rest) > 3 else None,
                    "downsample": ["downsamplers", "0"], "upsample": ["upsamplers", "0"]}[rest[2]]
            tail = rest[4:] if rest[2] in ("block", "attn") else rest[3:]
            rest = [blocks, str(i)] + kind + tail
        if "resnets" in rest and rest[-2] == "nin_shortcut":
            rest[-2] = "conv_shortcut"
        if "attentions" in rest:
            rest[-2] = attn_names[rest[-2]]
            if rest[-1] == "weight" and value.dim() == 4:
                value = value[:, :, 0, 0]
        out[".".join([part] + rest)] = value
    return out


@pytest.mark.parametrize("name", list(SPEC))
def test_diffusers_remap_gives_exactly_the_ldm_dict(name):
    """Hand-written diffusers names (new and pre-0.14 attention) map back exactly."""
    torch.manual_seed(0)
    sd = {k: torch.randn(v.shape) for k, v in meta_vae(name).state_dict().items()}
    num_levels = len(SPEC[name][0])
    theirs = ldm_to_diffusers(sd, num_levels)
    assert is_diffusers_state_dict(theirs) and not is_diffusers_state_dict(sd)
    # diffusers counts up_blocks from the lowest resolution: up_blocks.0 = LDM up.{L-1} (512 wide, upsamples)
    assert theirs["decoder.up_blocks.0.resnets.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in theirs
    assert theirs[f"decoder.up_blocks.{num_levels - 1}.resnets.2.norm1.weight"].shape == (128,)
    for names in (DIFFUSERS_ATTN, DIFFUSERS_ATTN_OLD):
        mapped = diffusers_to_ldm(ldm_to_diffusers(sd, num_levels, names))
        assert set(mapped) == set(sd)
        assert all(mapped[k].shape == sd[k].shape and torch.equal(mapped[k], sd[k]) for k in sd)


def test_unmappable_diffusers_keys_are_named():
    """Keys with no LDM name are listed in the error, in their diffusers spelling."""
    theirs = ldm_to_diffusers(meta_vae("f8d4").state_dict(), 4)
    bad = {**theirs, "encoder.down_blocks.0.resnets.0.time_emb_proj.weight": torch.zeros(1),
           "decoder.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"2 keys have no LDM name: \['encoder\.down_blocks\.0\.resnets\.0\.time_emb"):
        diffusers_to_ldm(bad)


@pytest.mark.parametrize("name", list(SPEC))
def test_diffusers_file_gives_identical_outputs(tmp_path, name):
    """A diffusers-layout .safetensors loads strictly and computes bit-identically."""
    ours = seeded_vae(name)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_weights(ldm_to_diffusers(ours.state_dict(), len(SPEC[name][0])), path)
    loaded = load_vae_weights(build_vae(name), path).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = ours.encode(x).mode()
        assert torch.equal(loaded.encode(x).moments, ours.encode(x).moments)
        assert torch.equal(loaded.decode(z), ours.decode(z))


# ---------------------------------------------------------------------------------------------------
# diffusers layout, from real diffusers.AutoencoderKL models (skipped without diffusers)
# ---------------------------------------------------------------------------------------------------


def diffusers_vae(name):
    diffusers = pytest.importorskip("diffusers")
    ch_mult, E, attn_levels = SPEC[name]
    L = len(ch_mult)
    down = tuple("AttnDownEncoderBlock2D" if i in attn_levels else "DownEncoderBlock2D" for i in range(L))
    up = tuple("AttnUpDecoderBlock2D" if i in attn_levels else "UpDecoderBlock2D" for i in reversed(range(L)))
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=down, up_block_types=up,
                                    block_out_channels=tuple(128 * m for m in ch_mult), layers_per_block=2,
                                    latent_channels=E, norm_num_groups=32, sample_size=256)
    with torch.no_grad():  # random non-trivial values everywhere (GroupNorm affine included)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.mark.parametrize("name", list(SPEC))
def test_real_diffusers_model_matches_hand_naming_and_computes_the_same(tmp_path, name):
    """Real diffusers keys equal the hand-written ones; same outputs."""
    theirs = diffusers_vae(name)
    hand = ldm_to_diffusers(meta_vae(name).state_dict(), len(SPEC[name][0]))
    assert {k: tuple(v.shape) for k, v in hand.items()} == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    save_weights(theirs.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    ours = load_vae_weights(build_vae(name), tmp_path / "diffusion_pytorch_model.safetensors").eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        dist = theirs.encode(x).latent_dist
        post = ours.encode(x)
        torch.testing.assert_close(post.mean, dist.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(post.logvar, dist.logvar, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(post.kl(), dist.kl(), atol=1e-3, rtol=1e-5)
        z = dist.mean
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=1e-4, rtol=1e-4)


def test_vae_config_overrides_and_errors():
    cfg = vae_config("f8d4", ch=32, ch_mult=[1, 2, 2, 2])
    assert cfg.ch_mult == (1, 2, 2, 2) and cfg.embed_dim == 4 and cfg.factor == 8
    with pytest.raises(ValueError, match="unknown VAE config key 'chans'"):
        vae_config("f8d4", chans=3)
    with pytest.raises(ValueError, match="unknown VAE 'f4d2'"):
        vae_config("f4d2")
