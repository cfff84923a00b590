"""Benchmark builders for whole models: one SiT-XL block, the whole SiT-XL/2 (with and without losses), the VAE.

Providers: "fused" (our SiT: Triton adaLN + latent BN), "eager" (the same SiT on the eager kernel
backend; for the VAE plain PyTorch), "compile" (torch.compile of the eager model), "fused_compile"
(torch.compile of the fused model: one graph, the Triton launches as repae:: torch.library ops), and for the
loss pass "original" / "original_compile" (the test transcription of the original SiT). Modes "fwd" and
"fwd_bwd" as in bench/harness.py. Everything runs under bf16 autocast with fp32 parameters and fp32
residual stream, as training does. FLOPs are counted by torch.utils.flop_counter on the meta device
(matmuls, convs and attention; elementwise work is not counted), so TFLOP/s and MFU need no hand formula.
tests/test_bench_builders.py runs these builders at small sizes on CPU.
"""

# B batch, T tokens, D hidden, N encoder tokens, E encoder width, C latent channels, H, W latent side, R image side

from __future__ import annotations

from collections.abc import Callable

import torch
from timing import BenchFn

import repae.model  # noqa: F401  (torchvision guard)
from repae.model.flops import count_flops
from repae.model.sit import SiTBlock, add_pending, build_sit
from repae.train.step import autocast

MODEL_PROVIDERS = ("fused", "eager", "compile", "fused_compile", "original", "original_compile")


def _autocast(device: str):
    return autocast(torch.device(device), "bf16")


def _randn(shape, g: torch.Generator, device: str, **kw) -> torch.Tensor:
    """Inputs are drawn on the CPU generator (same numbers on every device), then moved."""
    return torch.randn(shape, generator=g, device="cpu").to(device, **kw)


def _closure(forward: Callable[[], list[torch.Tensor]], mode: str) -> Callable[[], None]:
    """fwd: forward under no_grad; fwd_bwd: forward + backward of fixed random output gradients (1 for a loss)."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                forward()
        return run
    douts = [torch.randn_like(o) if o.ndim else torch.ones_like(o) for o in forward()]  # a loss: loss.backward()

    def run():
        torch.autograd.backward(forward(), douts)

    return run


def _sit_block(provider: str, mode: str, width: dict, batch: int, device: str):
    D, H, T = width["hidden_size"], width["num_heads"], width["tokens"]
    backend = "triton" if provider.startswith("fused") else "eager"
    with torch.device(device):
        block = SiTBlock(D, H, kernel_backend=backend, attn_backend="auto")
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(0)
    x = _randn((batch, T, D), g, device).requires_grad_(mode == "fwd_bwd")
    c = _randn((batch, D), g, device).requires_grad_(mode == "fwd_bwd")
    y = _randn((batch, T, D), g, device, dtype=torch.bfloat16)
    gate = _randn((batch, D), g, device, dtype=torch.bfloat16)
    fn = torch.compile(block) if provider.endswith("compile") else block

    def forward():
        with _autocast(device):
            x_out, pending = fn(x, c, (y, gate))
            return [add_pending(x_out, pending)]

    return _closure(forward, mode), [x, c, *block.parameters()]


def _build_sit(provider: str, width: dict, device: str):
    """Our SiT in train mode, on the Triton kernels for the fused providers, else on the eager ones."""
    backend = "triton" if provider.startswith("fused") else "eager"
    with torch.device(device):
        return build_sit(width["model"], **width.get("overrides", {}), kernel_backend=backend).train()


def _sit_inputs(cfg, batch: int, g: torch.Generator, device: str) -> tuple[torch.Tensor, ...]:
    """One SiT batch drawn from g in this order: latents and noise (B, C, H, W), t, labels, label-drop mask (B,)."""
    B, C, H, W = batch, cfg.in_channels, cfg.input_size, cfg.input_size
    z_BCHW, noise_BCHW = _randn((B, C, H, W), g, device), _randn((B, C, H, W), g, device)
    t_B = torch.rand(B, generator=g).to(device)
    y_B = torch.randint(0, cfg.num_classes, (B,), generator=g).to(device)
    drop_B = (torch.rand(B, generator=g) < cfg.class_dropout_prob).to(device)
    return z_BCHW, noise_BCHW, t_B, y_B, drop_B


def _sit(provider: str, mode: str, width: dict, batch: int, device: str):
    model = _build_sit(provider, width, device)
    z_BCHW, noise_BCHW, t_B, y_B, drop_B = _sit_inputs(model.config, batch, torch.Generator().manual_seed(0), device)
    fn = torch.compile(model) if provider.endswith("compile") else model

    def forward():
        with _autocast(device):
            out = fn(z_BCHW, y_B, t_B, noise_BCHW, drop_mask_B=drop_B)
            return [out.v_pred, *out.zs_tilde]

    return _closure(forward, mode), list(model.parameters())


def _sit_loss(provider: str, mode: str, width: dict, batch: int, device: str):
    """The SiT pass of a REPA-E step: forward, denoising + 0.5 * REPA loss against frozen encoder features.
    "original*" runs the test transcription of the original SiT (nn.LayerNorm + modulate, nn.BatchNorm2d, the
    per-sample Python loop of its projection loss) on the same weights."""
    from repae.model.losses import denoising_loss, projection_loss

    original = provider.startswith("original")
    model = _build_sit(provider, width, device)
    cfg = model.config
    if original:
        from original_sit import OriginalSiT

        with torch.device(device):
            orig = OriginalSiT(input_size=cfg.input_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                               hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads,
                               encoder_depth=cfg.encoder_depth, z_dims=cfg.z_dims, projector_dim=cfg.projector_dim)
        orig.load_state_dict(model.state_dict())
        model = orig.train()
    g = torch.Generator().manual_seed(0)
    z_BCHW, noise_BCHW, t_B, y_B, drop_B = _sit_inputs(cfg, batch, g, device)
    N = (cfg.input_size // cfg.patch_size) ** 2  # encoder tokens, one per SiT token
    zs_BNE = [_randn((batch, N, E), g, device) for E in cfg.z_dims]  # frozen encoder features, one per z_dim
    fn = torch.compile(model) if provider.endswith("compile") else model

    def forward():
        with _autocast(device):
            if original:
                out = fn(z_BCHW, y_B, zs_BNE, t_B.view(-1, 1, 1, 1), noise_BCHW, force_drop_ids=drop_B.long())
                return [out["denoising_loss"].mean() + 0.5 * out["proj_loss"]]
            out = fn(z_BCHW, y_B, t_B, noise_BCHW, drop_mask_B=drop_B)
            return [denoising_loss(out.v_pred, out.v_target) + 0.5 * projection_loss(out.zs_tilde, zs_BNE)]

    return _closure(forward, mode), list(model.parameters())


def _vae(provider: str, mode: str, width: dict, batch: int, device: str):
    from repae.model.vae import build_vae

    with torch.device(device):
        vae = build_vae(width["vae"]).train()
    R = width["resolution"]
    x = (torch.rand(batch, 3, R, R, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    fn = torch.compile(vae) if provider == "compile" else vae

    def forward():
        with _autocast(device):
            posterior, z, recon = fn(x)
            return [z, recon]

    return _closure(forward, mode), list(vae.parameters())


_KINDS = {"sit_block": _sit_block, "sit": _sit, "sit_loss": _sit_loss, "vae": _vae}


def model_case(provider: str, mode: str, kind: str, width: dict, batch: int, device: str) -> tuple[BenchFn, int]:
    """(BenchFn to time, FLOPs of one call). The VAE has no fused provider (it has no fused kernels yet)."""
    if provider not in MODEL_PROVIDERS:
        raise ValueError(f"provider must be one of {MODEL_PROVIDERS}, got {provider!r}")
    if provider.startswith("original") and kind != "sit_loss":
        raise ValueError(f"provider {provider!r} exists only for the sit_loss kind")
    fn, leaves = _KINDS[kind](provider, mode, width, batch, device)
    on_meta, _ = _KINDS[kind]("eager", mode, width, batch, "meta")  # FLOPs counted on meta tensors
    flops = count_flops(on_meta)
    return BenchFn(fn, 0, [t for t in leaves if t.requires_grad]), flops
