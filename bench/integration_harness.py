"""Benchmark builders for foreign DiT-family models patched by repae.kernels.integrations: a diffusers
DiTTransformer2DModel and a PixArtTransformer2DModel (random weights), unpatched or patched, eager or compiled.
Nothing here re-implements a model or a patch: the closures call diffusers' forward and integrations.patch;
tests/test_bench_builders.py runs these builders at tiny widths on CPU.

Providers:
- "eager": the diffusers model as it comes.
- "patched": the same after patch(model, backend="triton") (every transformer block's adaLN on our kernel).
- "compile", "patched_compile": the same two with every transformer block compiled (block.compile(fullgraph=True),
  what diffusers calls regional compilation, its compile_repeated_blocks). The 28 blocks share their compiled
  code: a case compiles two block graphs (the first block gets the patch embedding's output, bf16 or strided, the
  other 27 the residual stream; counted with TORCH_LOGS=recompiles on CPU) rather than the whole 28-layer model
  (minutes per graph), which keeps `pytest bench/bench_integrations.py` to a few minutes; the patch embedding, the
  conditioning embedders and the inline final norm run eager in both compiled providers alike, so the pair still
  compares like with like.
  The compile happens in the builder (two calls), so the timer sees the steady state.
Modes "fwd" (no_grad) and "fwd_bwd" (forward, then backward of out.float().square().mean() into every
parameter). Everything runs in train mode under bf16 autocast with fp32 weights, as training does. FLOPs are
counted by torch.utils.flop_counter on one call of the unpatched eager model before it is patched or compiled
(matmuls, convolutions and attention; the same for every provider).
"""

# B batch, C latent channels, S latent side, L text tokens, E text width

from __future__ import annotations

import importlib.util

import torch
from model_harness import _autocast, _closure, _randn
from timing import BenchFn

from repae.kernels.integrations import patch
from repae.model.flops import count_flops

INTEGRATION_PROVIDERS = ("eager", "patched", "compile", "patched_compile")
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def _build(kind: str, config: dict, device: str) -> torch.nn.Module:
    import diffusers

    cls = {"diffusers_dit": diffusers.DiTTransformer2DModel, "pixart": diffusers.PixArtTransformer2DModel}[kind]
    with torch.device(device):
        return cls(**config).train()


def _inputs(kind: str, config: dict, batch: int, extra: dict, device: str) -> dict:
    """The model's keyword inputs, drawn from a CPU generator: fp32 latents (B, C, S, S), integer timesteps in
    [0, 1000), and class labels (DiT) or T5-width caption features (B, L, E) (PixArt)."""
    g = torch.Generator().manual_seed(0)
    B, C, S = batch, config["in_channels"], config["sample_size"]
    inputs = {"hidden_states": _randn((B, C, S, S), g, device),
              "timestep": torch.randint(0, 1000, (B,), generator=g).to(device)}
    if kind == "diffusers_dit":
        inputs["class_labels"] = torch.randint(0, config["num_embeds_ada_norm"], (B,), generator=g).to(device)
    else:
        inputs["encoder_hidden_states"] = _randn((B, extra["text_tokens"], config["caption_channels"]), g, device)
    return inputs


def integration_case(provider: str, mode: str, kind: str, config: dict, batch: int, extra: dict,
                     device: str) -> tuple[BenchFn, int, str]:
    """(BenchFn to time, FLOPs of one call, the PatchReport as text or "" when unpatched)."""
    if provider not in INTEGRATION_PROVIDERS:
        raise ValueError(f"provider must be one of {INTEGRATION_PROVIDERS}, got {provider!r}")
    if not HAS_DIFFUSERS:
        raise ValueError("the integration benchmarks build diffusers models: install diffusers")
    model = _build(kind, config, device)
    inputs = _inputs(kind, config, batch, extra, device)

    def forward() -> list[torch.Tensor]:
        with _autocast(device):
            out = model(**inputs, return_dict=False)[0]  # (B, out_channels, S, S)
        return [out.float().square().mean()]

    flops = count_flops(_closure(forward, mode))
    model.zero_grad(set_to_none=True)
    report = str(patch(model, backend="triton")) if provider.startswith("patched") else ""
    if provider.endswith("compile"):
        torch._dynamo.reset()  # a fresh cache per case: each case compiles its own graphs, none is reused stale
        for block in model.transformer_blocks:
            block.compile(fullgraph=True)
    run = _closure(forward, mode)
    if provider.endswith("compile"):
        run()  # compile the forward (and the backward) here, not inside the timer
        run()
    return BenchFn(run, 0, [p for p in model.parameters() if p.requires_grad]), flops, report
