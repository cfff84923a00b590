"""SiT: configs and parameter counts, exact keys, init, parity with the original forward, fused vs eager.

Tolerances: ours (eager kernels) vs the transcribed original in fp32: 1e-5 absolute on activations and
losses (same ops, summation order may differ in BN and attention). Fused (triton) vs eager: the
three-way rule of tests/parity.py against a float64 oracle, with atol relative to each tensor's largest
magnitude (max|oracle|): fp32 1e-5, bf16 autocast 1e-2 (measured: the fused error is 0.5-1x the eager
one in fp32; in bf16 the rule's bound is used to at most ~30%).
"""

# B batch, T tokens, D hidden, C latent channels

from __future__ import annotations

import argparse
import copy
import logging

import pytest
import torch
from original_sit import OriginalSiT, mean_flat
from parity import assert_close_3way

from repae.kernels import repa_loss
from repae.model.sit import (
    SiT,
    SiT_models,
    SiTBlock,
    add_pending,
    build_sit,
    count_parameters,
    sit_config,
    sit_config_from_args,
)
from repae.model.weights import load_weights, save_weights

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=144, depth=3, num_heads=2, encoder_depth=2,
            z_dims=(32,), projector_dim=64, num_classes=10)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give the zero-initialised parameters (adaLN, final layer, biases) small random values, and the BN
    non-trivial statistics, so parity tests exercise every path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
        bn = model.bn
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    return model


def make_batch(cfg, B=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s, C = cfg.input_size, cfg.in_channels
    z = (torch.randn(B, C, s, s, generator=g) * 2 + 0.5).to(dtype)
    noise = torch.randn(B, C, s, s, generator=g).to(dtype)
    t = torch.rand(B, generator=g)
    y = torch.randint(0, cfg.num_classes, (B,), generator=g)
    drop = torch.tensor([True] + [False] * (B - 1))
    zs = [torch.randn(B, cfg.num_tokens, e, generator=g) for e in cfg.z_dims]
    return z, y, t, noise, drop, zs


# ---------------------------------------------------------------------------------------------------
# Configs, counts, keys
# ---------------------------------------------------------------------------------------------------

COUNTS = [("SiT-XL/2", {}, 683_242_512), ("SiT-B/2", {}, 137_845_008), ("SiT-L/2", {}, 465_955_600),
          ("SiT-XL/1", dict(input_size=16, in_channels=32), 683_279_392)]


@pytest.mark.parametrize("name,kw,expected", COUNTS)
def test_parameter_counts_match_spec(name, kw, expected):
    with torch.device("meta"):
        assert count_parameters(build_sit(name, **kw)) == expected


def expected_sit_keys(depth, D, C, p, T, mlp, z_dims, proj=2048, num_classes=1000, qk_norm=False, heads=16):
    """The state-dict keys and shapes of docs/METHOD.md#sit, in order, written out by hand."""
    keys = [("pos_embed", (1, T, D)), ("x_embedder.proj.weight", (D, C, p, p)), ("x_embedder.proj.bias", (D,)),
            ("t_embedder.mlp.0.weight", (D, 256)), ("t_embedder.mlp.0.bias", (D,)),
            ("t_embedder.mlp.2.weight", (D, D)), ("t_embedder.mlp.2.bias", (D,)),
            ("y_embedder.embedding_table.weight", (num_classes + 1, D))]
    for i in range(depth):
        b = f"blocks.{i}."
        keys += [(b + "attn.qkv.weight", (3 * D, D)), (b + "attn.qkv.bias", (3 * D,))]
        if qk_norm:
            keys += [(b + f"attn.{n}_norm.{w}", (D // heads,)) for n in "qk" for w in ("weight", "bias")]
        keys += [(b + "attn.proj.weight", (D, D)), (b + "attn.proj.bias", (D,)),
                 (b + "mlp.fc1.weight", (mlp, D)), (b + "mlp.fc1.bias", (mlp,)),
                 (b + "mlp.fc2.weight", (D, mlp)), (b + "mlp.fc2.bias", (D,)),
                 (b + "adaLN_modulation.1.weight", (6 * D, D)), (b + "adaLN_modulation.1.bias", (6 * D,))]
    for j, z in enumerate(z_dims):
        keys += [(f"projectors.{j}.0.weight", (proj, D)), (f"projectors.{j}.0.bias", (proj,)),
                 (f"projectors.{j}.2.weight", (proj, proj)), (f"projectors.{j}.2.bias", (proj,)),
                 (f"projectors.{j}.4.weight", (z, proj)), (f"projectors.{j}.4.bias", (z,))]
    keys += [("final_layer.linear.weight", (p * p * C, D)), ("final_layer.linear.bias", (p * p * C,)),
             ("final_layer.adaLN_modulation.1.weight", (2 * D, D)), ("final_layer.adaLN_modulation.1.bias", (2 * D,)),
             ("bn.running_mean", (C,)), ("bn.running_var", (C,)), ("bn.num_batches_tracked", ())]
    return keys


@pytest.mark.parametrize("name,kw,C,p,T", [("SiT-XL/2", {}, 4, 2, 256),
                                           ("SiT-XL/1", dict(input_size=16, in_channels=32), 32, 1, 256),
                                           ("SiT-B/2", dict(qk_norm=True, z_dims=(768, 1024)), 4, 2, 256)])
def test_state_dict_keys_and_shapes_match_spec(name, kw, C, p, T):
    with torch.device("meta"):
        model = build_sit(name, **kw)
    cfg = model.config
    want = expected_sit_keys(cfg.depth, cfg.hidden_size, C, p, T, int(cfg.hidden_size * 4), cfg.z_dims,
                             qk_norm=cfg.qk_norm, heads=cfg.num_heads)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == want


def test_every_registry_config_builds_including_sit_s():
    for name in SiT_models:
        cfg = sit_config(name)
        with torch.device("meta"):
            m = SiT(cfg)
        assert m.final_layer.linear.in_features == cfg.hidden_size, name  # SiT-S: decoder width follows hidden


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_and_strict_reload(tmp_path, suffix):
    model = randomize_(build_sit(**TINY, kernel_backend="eager"))
    path = tmp_path / f"sit{suffix}"
    save_weights(model.state_dict(), path)
    other = load_weights(build_sit(**TINY), path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_released_checkpoint_layout_loads_model_and_ema(tmp_path):
    """A checkpoint like the released ones (model, ema, args Namespace, steps) loads with weights_only."""
    model = randomize_(build_sit(**TINY))
    ckpt = {"model": model.state_dict(), "ema": model.state_dict(), "args": argparse.Namespace(model="SiT-B/2"),
            "steps": 7}
    torch.save(ckpt, tmp_path / "0000007.pt")
    for key in ("model", "ema"):
        load_weights(build_sit(**TINY), tmp_path / "0000007.pt", key=key)
    with pytest.raises(ValueError, match="no entry 'vae'"):
        load_weights(build_sit(**TINY), tmp_path / "0000007.pt", key="vae")


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    sd = build_sit(**TINY).state_dict()
    sd.pop("blocks.0.attn.qkv.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["final_layer.linear.bias"] = torch.zeros(3)
    save_weights(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        load_weights(build_sit(**TINY), tmp_path / "bad.pt")
    msg = str(err.value)
    assert "blocks.0.attn.qkv.bias" in msg and "extra.weight" in msg and "final_layer.linear.bias" in msg


# ---------------------------------------------------------------------------------------------------
# Building from a released run's args
# ---------------------------------------------------------------------------------------------------


def test_config_from_released_args_json():
    args = {"model": "SiT-XL/2", "resolution": 256, "vae": "f8d4", "enc_type": "dinov2-vit-b", "encoder_depth": 8,
            "cfg_prob": 0.1, "bn_momentum": 0.1, "qk_norm": False, "num_classes": 1000, "path_type": "linear",
            "learning_rate": 1e-4, "batch_size": 256, "output_dir": "exps"}
    assert sit_config_from_args(args) == sit_config("SiT-XL/2", input_size=32, in_channels=4)
    ns = argparse.Namespace(**{**args, "model": "SiT-XL/1", "vae": "f16d32", "enc_type": "dinov2-vit-b,dinov2-vit-l"})
    cfg = sit_config_from_args(ns)
    assert (cfg.input_size, cfg.in_channels, cfg.patch_size, cfg.z_dims) == (16, 32, 1, (768, 1024))
    explicit = sit_config_from_args({"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 144,
                                     "depth": 3, "num_heads": 2, "encoder_depth": 2, "z_dims": [32],
                                     "projector_dim": 64, "num_classes": 10, "class_dropout_prob": 0.1,
                                     "mlp_ratio": 4.0, "bn_momentum": 0.1, "qk_norm": False})
    assert explicit == sit_config(**TINY)


def test_bad_configs_name_the_key():
    with pytest.raises(ValueError, match="unknown SiT model 'SiT-XXL/2'"):
        sit_config("SiT-XXL/2")
    with pytest.raises(ValueError, match=r"unknown SiT config key\(s\) \['hiden_size'\]"):
        sit_config("SiT-B/2", hiden_size=3)
    with pytest.raises(ValueError, match="encoder_depth=9"):
        sit_config("SiT-B/2", depth=8, encoder_depth=9)
    with pytest.raises(ValueError, match="unknown vae 'f4d2'"):
        sit_config_from_args({"model": "SiT-B/2", "resolution": 256, "vae": "f4d2"})
    with pytest.raises(ValueError, match="z must be"):
        m = build_sit(**TINY)
        m(torch.zeros(2, 4, 16, 16), torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.zeros(2, 4, 16, 16))


# ---------------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------------


def test_blocks_are_identity_and_output_is_zero_at_init():
    torch.manual_seed(0)
    model = build_sit(**TINY, kernel_backend="eager")
    z, y, t, noise, drop, _ = make_batch(model.config)
    x = torch.randn(3, model.config.num_tokens, TINY["hidden_size"])
    c = torch.randn(3, TINY["hidden_size"])
    for block in model.blocks:
        assert torch.equal(add_pending(*block(x, c)), x)
    out = model(z, y, t, noise, drop_mask_B=drop)
    assert torch.equal(out.v_pred, torch.zeros_like(out.v_pred))
    w = model.x_embedder.proj.weight
    bound = (6 / (w.shape[0] + w[0].numel())) ** 0.5  # xavier on the [D, C*p*p] view
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert 0.015 < model.y_embedder.embedding_table.weight.std() < 0.025


def test_pos_embed_is_mae_2d_sincos():
    model = build_sit(**TINY)
    D, g = TINY["hidden_size"], TINY["input_size"] // TINY["patch_size"]
    pe = model.pos_embed[0].double()
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D / 4))
    for idx in (0, 5, g * g - 1):
        h, w = divmod(idx, g)  # tokens are row-major: h slow, w fast; the first half embeds w
        want = torch.cat([torch.sin(w * omega), torch.cos(w * omega), torch.sin(h * omega), torch.cos(h * omega)])
        torch.testing.assert_close(pe[idx], want, atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Parity with the original forward (docs/METHOD.md#sit)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_training_forward_equals_original(backend, path_type):
    cfg = dict(TINY, z_dims=(32, 48), path_type=path_type)
    ours = randomize_(build_sit(**cfg, kernel_backend=backend))
    orig = OriginalSiT(**{k: v for k, v in cfg.items()})
    orig.load_state_dict(ours.state_dict(), strict=True)
    z, y, t, noise, drop, zs = make_batch(ours.config)

    # SiT pass: train mode, batch statistics, label dropout by mask.
    ours.train(), orig.train()
    got = ours(z, y, t, noise, drop_mask_B=drop)
    want = orig(z, y, zs, t.view(-1, 1, 1, 1), noise, force_drop_ids=drop.int())
    tol = dict(atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got.v_pred, want["model_output"], **tol)
    torch.testing.assert_close(got.v_target, want["model_target"], **tol)
    for a, b in zip(got.zs_tilde, want["zs_tilde"]):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(mean_flat((got.v_pred - got.v_target) ** 2), want["denoising_loss"], **tol)
    torch.testing.assert_close(repa_loss(got.zs_tilde, zs, backend=backend), want["proj_loss"], **tol)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours.bn, name), getattr(orig.bn, name), atol=1e-6, rtol=1e-6)

    # Align pass: eval mode (running statistics, no dropout), stops at the projector; grad to z.
    ours.eval(), orig.eval()
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = ours(za, y, t, noise, align_only=True)
    want = orig(zb, y, zs, t.view(-1, 1, 1, 1), noise, align_only=True)
    assert got.v_pred is None
    loss_a, loss_b = repa_loss(got.zs_tilde, zs, backend=backend), want["proj_loss"]
    torch.testing.assert_close(loss_a, loss_b, **tol)
    loss_a.backward(), loss_b.backward()
    torch.testing.assert_close(za.grad, zb.grad, atol=1e-6, rtol=1e-4)


def test_label_dropout_in_train_mode_without_mask_drops_like_the_original():
    model = randomize_(build_sit(**dict(TINY, class_dropout_prob=0.5), kernel_backend="eager"))
    z, y, t, noise, _, _ = make_batch(model.config, B=64)
    model.train()
    torch.manual_seed(3)
    auto = model(z, y, t, noise, use_batch_stats=False).v_pred
    torch.manual_seed(3)
    mask = torch.rand(64) < 0.5
    explicit = model(z, y, t, noise, drop_mask_B=mask, use_batch_stats=False).v_pred
    assert 5 < mask.sum() < 59
    torch.testing.assert_close(auto, explicit, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no null class"):
        build_sit(**dict(TINY, class_dropout_prob=0.0))(z, y, t, noise, drop_mask_B=mask)


def test_inference_equals_training_forward_and_original():
    ours = randomize_(build_sit(**TINY, kernel_backend="eager")).eval()
    orig = OriginalSiT(**TINY).eval()
    orig.load_state_dict(ours.state_dict())
    z, y, t, noise, _, _ = make_batch(ours.config)
    out = ours(z, y, t, noise)
    x0 = (z - ours.bn.running_mean.view(1, -1, 1, 1)) / (ours.bn.running_var.view(1, -1, 1, 1) + 1e-4).sqrt()
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(ours.inference(x_t, t, y), out.v_pred, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours.inference(x_t, t, y), orig.inference(x_t, t, y), atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Fused kernels vs the eager path: outputs, projector features, every gradient
# ---------------------------------------------------------------------------------------------------


def _run_sit(model, inputs, *, autocast_dtype=None, seed=11):
    """Forward (train mode: batch-stat BN, explicit drop mask) + backward of random projections of every
    output; returns {name: tensor} with outputs, dz and every parameter gradient."""
    z, y, t, noise, drop, _ = inputs
    z = z.clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(z, y, t, noise, drop_mask_B=drop)
    g = torch.Generator().manual_seed(seed)
    outs = {"v_pred": out.v_pred, **{f"zs_tilde{j}": zt for j, zt in enumerate(out.zs_tilde)}}
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs.values())
    loss.backward()
    res = {k: v.detach() for k, v in outs.items()}
    res["dz"] = z.grad
    res.update({"d" + n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return res


def _three_models(cfg, seed=0):
    base = randomize_(build_sit(**cfg, kernel_backend="eager"), seed=seed)
    fused = build_sit(**cfg, kernel_backend="triton")
    fused.load_state_dict(base.state_dict())
    oracle = copy.deepcopy(base).double()
    oracle.bn.running_mean.data = oracle.bn.running_mean.float()  # BN statistics stay fp32 (kernel contract)
    oracle.bn.running_var.data = oracle.bn.running_var.float()
    return base.train(), fused.train(), oracle.train()


def _compare(got, eager, oracle, atol):
    assert set(got) == set(eager) == set(oracle)
    for name in got:
        scale = oracle[name].abs().max().item()
        assert_close_3way(got[name], eager[name], oracle[name], atol=atol * max(scale, 1e-3), name=name)


@pytest.mark.parametrize("depth,encoder_depth", [(2, 1), (4, 2)])
def test_fused_sit_matches_eager_fp32(depth, encoder_depth):
    cfg = dict(TINY, depth=depth, encoder_depth=encoder_depth, hidden_size=72 * 3, num_heads=3)
    eager_m, fused_m, oracle_m = _three_models(cfg)
    inputs = make_batch(sit_config(**cfg))
    oracle_in = tuple(x.double() if torch.is_tensor(x) and x.is_floating_point() and x.dim() == 4 else x
                      for x in inputs)
    _compare(_run_sit(fused_m, inputs), _run_sit(eager_m, inputs), _run_sit(oracle_m, oracle_in), atol=1e-5)


def test_fused_sit_matches_eager_bf16_autocast():
    cfg = dict(TINY, depth=3, encoder_depth=2, hidden_size=72 * 2, num_heads=2)
    eager_m, fused_m, oracle_m = _three_models(cfg)
    inputs = make_batch(sit_config(**cfg))
    oracle_in = tuple(x.double() if torch.is_tensor(x) and x.is_floating_point() and x.dim() == 4 else x
                      for x in inputs)
    got = _run_sit(fused_m, inputs, autocast_dtype=torch.bfloat16)
    eager = _run_sit(eager_m, inputs, autocast_dtype=torch.bfloat16)
    _compare(got, eager, _run_sit(oracle_m, oracle_in), atol=1e-2)


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_full_width_xl_block_fused_matches_eager(autocast_dtype):
    """One SiT-XL block (D=1152, 16 heads of 72) with a pending residual from a previous block."""
    D, B, T = 1152, 2, 8
    g = torch.Generator().manual_seed(0)
    blocks = {}
    for backend in ("eager", "triton"):
        torch.manual_seed(0)
        blocks[backend] = SiTBlock(D, 16, kernel_backend=backend)
    with torch.no_grad():
        for p in blocks["eager"].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    blocks["triton"].load_state_dict(blocks["eager"].state_dict())
    blocks["oracle"] = copy.deepcopy(blocks["eager"]).double()
    x, c = torch.randn(B, T, D, generator=g), torch.randn(B, D, generator=g)
    y_prev, gate_prev = torch.randn(B, T, D, generator=g), torch.randn(B, D, generator=g) * 0.1
    douts = [torch.randn(B, T, D, generator=g, dtype=torch.float64) for _ in range(2)]
    res = {}
    for name, blk in blocks.items():
        dt = torch.float64 if name == "oracle" else torch.float32
        leaves = [v.clone().to(dt).requires_grad_() for v in (x, c, y_prev, gate_prev)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_dtype is not None and name != "oracle"):
            x_out, (y_out, gate_out) = blk(leaves[0], leaves[1], (leaves[2], leaves[3]))
            out = add_pending(x_out, (y_out, gate_out))
        (out.double() * douts[0]).sum().add((x_out.double() * douts[1]).sum()).backward()
        res[name] = {"out": out.detach(), "x_out": x_out.detach(),
                     **{f"d{n}": v.grad for n, v in zip(("x", "c", "y_prev", "gate_prev"), leaves)},
                     **{"d" + n: p.grad for n, p in blk.named_parameters()}}
    _compare(res["triton"], res["eager"], res["oracle"], atol=1e-5 if autocast_dtype is None else 1e-2)


# ---------------------------------------------------------------------------------------------------
# Attention backends
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_backends_match_math(backend, qk_norm, caplog):
    from repae.model.attention import Attention

    torch.manual_seed(0)
    ref = Attention(144, 2, qk_norm=qk_norm, backend="math")
    other = Attention(144, 2, qk_norm=qk_norm, backend=backend)
    other.load_state_dict(ref.state_dict())
    x = torch.randn(2, 17, 144)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with caplog.at_level(logging.INFO, logger="repae.model"):
        out = other(xb)
    assert any("attention backend: sdpa" in r.getMessage() for r in caplog.records)
    want = ref(xa)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out.sum().backward(), want.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)


def test_attention_rejects_unknown_backend():
    from repae.model.attention import HAS_FLASH_ATTN, Attention

    with pytest.raises(ValueError, match="attention backend must be one of"):
        Attention(64, 2, backend="xformers")
    if not HAS_FLASH_ATTN:
        with pytest.raises(ValueError, match="flash-attn is not installed"):
            Attention(64, 2, backend="flash_attn")(torch.randn(1, 3, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "auto", "flash_attn"])
def test_attention_gpu_backends_match_math_xl_heads(backend):
    from repae.model.attention import HAS_FLASH_ATTN, Attention

    if backend == "flash_attn" and not HAS_FLASH_ATTN:
        pytest.skip("flash-attn not installed")
    torch.manual_seed(0)
    ref = Attention(1152, 16, backend="math").cuda()
    other = Attention(1152, 16, backend=backend).cuda()
    other.load_state_dict(ref.state_dict())
    x = torch.randn(8, 256, 1152, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, want = other(x), ref(x)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("use_batch_stats", [False, True])
def test_torch_compile_of_the_fused_sit_matches_uncompiled(use_batch_stats):
    """The fused kernels are torch.library ops under torch.compile: the whole SiT compiles as one graph
    (fullgraph=True raises on a graph break) and matches the uncompiled model."""
    torch._dynamo.reset()
    model = randomize_(build_sit(**TINY, kernel_backend="triton")).train()
    z, y, t, noise, drop, _ = make_batch(model.config)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    bn_state = {k: v.clone() for k, v in model.bn.state_dict().items()}
    want = model(za, y, t, noise, drop_mask_B=drop, use_batch_stats=use_batch_stats)
    bn_want = {k: v.clone() for k, v in model.bn.state_dict().items()}
    model.bn.load_state_dict(bn_state)
    got = torch.compile(model, fullgraph=True)(zb, y, t, noise, drop_mask_B=drop, use_batch_stats=use_batch_stats)
    for k, v in model.bn.state_dict().items():
        torch.testing.assert_close(v, bn_want[k], atol=0, rtol=0, msg=k)
    torch.testing.assert_close(got.v_pred, want.v_pred, atol=1e-5, rtol=1e-5)
    got.v_pred.square().sum().backward(), want.v_pred.square().sum().backward()
    torch.testing.assert_close(zb.grad, za.grad, atol=1e-5, rtol=1e-4)
