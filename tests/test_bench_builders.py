"""The benchmark builders of bench/harness.py run (not timed) at small shapes on any machine, so the
benchmark plumbing is known to work before a run on a GPU spends its minutes on it."""

import pytest
import torch
from harness import CASE_BUILDERS, MODES
from parity import DEVICE

SMALL = {
    "adaln": ((2, 4, 24), torch.bfloat16, torch.float32, torch.bfloat16),
    "repa_loss": ((2, 4, 24), torch.bfloat16, torch.float32),
    "latent_bn": ((2, 4, 4, 4), torch.float32),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["triton", "eager"])
@pytest.mark.parametrize("op", list(SMALL))
def test_bench_builder_runs(op, provider, mode):
    bench = CASE_BUILDERS[op](provider, mode, *SMALL[op], device=DEVICE)
    bench.fn()
    bench.fn()
    assert bench.nbytes > 0
    if mode == "fwd_bwd":
        assert all(t.grad is not None for t in bench.grad_to_none if t.requires_grad)


SMALL_MODELS = {
    "sit_block": ({"hidden_size": 144, "num_heads": 2, "tokens": 16}, 2),
    "sit": ({"model": "SiT-S/2", "overrides": dict(input_size=8, depth=2, encoder_depth=1, hidden_size=144,
                                                   num_heads=2, z_dims=(32,), projector_dim=64)}, 2),
    "vae": ({"vae": "f8d4", "resolution": 32}, 1),
}
SMALL_MODELS["sit_loss"] = SMALL_MODELS["sit"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["fused", "eager"])
@pytest.mark.parametrize("kind", list(SMALL_MODELS))
def test_model_bench_builder_runs(kind, provider, mode):
    from model_harness import model_case

    width, batch = SMALL_MODELS[kind]
    bench, flops = model_case(provider, mode, kind, width, batch, device=DEVICE)
    bench.fn()
    assert flops > 0
    if mode == "fwd_bwd":
        assert all(t.grad is not None for t in bench.grad_to_none)


def test_original_sit_loss_builder_matches_ours(monkeypatch):
    """The original transcription and our SiT give the same loss gradients on the same weights and inputs (fp32:
    autocast off), so the loss-pass benchmark compares like with like."""
    import contextlib

    import model_harness
    from model_harness import _sit_loss

    monkeypatch.setattr(model_harness, "_autocast", lambda device: contextlib.nullcontext())

    width, batch = SMALL_MODELS["sit_loss"]
    grads = {}
    for provider in ("eager", "original"):
        torch.manual_seed(0)  # the same initial weights for both
        fn, params = _sit_loss(provider, "fwd_bwd", width, batch, device=DEVICE)
        fn()
        grads[provider] = [p.grad for p in params if p.requires_grad]
    assert len(grads["eager"]) == len(grads["original"]) > 10
    for a, b in zip(grads["eager"], grads["original"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sampling_bench_builders_run(monkeypatch):
    """The builders of bench/sampling_harness.py on the small SiT at batch 2 (one ODE step, two SDE steps per call),
    a small f8d4-layout decoder and 2 Inception images, and the step counts of the paper's grids. Every part runs on
    the eager provider; the fused one once (the Triton interpreter costs ~0.5 s per SiT call, and the fused SiT is
    tested in tests/model), the bf16 one once with REPAE_KERNELS=eager (its autocast plumbing)."""
    import sampling_harness as sh

    width = dict(SMALL_MODELS["sit"][0], vae="f8d4", vae_overrides=dict(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    parts = {"fused": ["ode_out"], "eager": [f"{m}_{w}" for m in ("ode", "sde") for w in ("in", "out")],
             "fused_bf16": ["sde_in"]}
    for provider in sh.SAMPLING_PROVIDERS:
        cases = sh.sampler_cases(provider, width, 2, device=DEVICE, cfg_scale=2.2)
        assert {k: steps for k, (_, steps) in cases.items()} == {k: sh.STEPS_PER_CALL[k[:3]] for k in parts["eager"]}
        with monkeypatch.context() as m:
            if provider == "fused_bf16":
                m.setenv("REPAE_KERNELS", "eager")
            for part in parts[provider]:
                cases[part][0].fn()
    sh.decode_case(width, 2, device=DEVICE).fn()
    sh.inception_case(2, 32, device=DEVICE).fn()
    guidance = dict(cfg_scale=2.2, guidance_low=0.0, guidance_high=0.65)  # the repae-sdvae preset
    assert sh.step_counts("ode", num_steps=50, **guidance) == (32, 18)
    assert sh.step_counts("sde", num_steps=250, **guidance) == (159, 91)
    assert sh.step_counts("sde", num_steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0) == (0, 250)


SMALL_INTEGRATIONS = {  # (kind, diffusers arguments, batch, extra inputs): one layer, 2 heads x 8
    "diffusers_dit": ("diffusers_dit", dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                            num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10), 2, {}),
    "pixart": ("pixart", dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                              cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=2,
                              use_additional_conditions=False), 2, {"text_tokens": 5}),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["eager", "patched"])
@pytest.mark.parametrize("name", list(SMALL_INTEGRATIONS))
def test_integration_bench_builder_runs(name, provider, mode):
    """bench/integration_harness.py on one-layer diffusers models (the compiled providers only add block.compile,
    which tests/kernels/test_integrations.py covers): the patch lands, FLOPs are counted, gradients reach every
    parameter."""
    pytest.importorskip("diffusers")
    from integration_harness import integration_case

    bench, flops, report = integration_case(provider, mode, *SMALL_INTEGRATIONS[name], device=DEVICE)
    bench.fn()
    assert flops > 0
    assert ("1 modules patched" in report) == (provider == "patched"), report
    if mode == "fwd_bwd":
        assert all(t.grad is not None for t in bench.grad_to_none)


def test_train_step_floor_fields_and_report(monkeypatch, tmp_path):
    """bench_train_step's floor fields (a GPU GPU_SPECS lacks gives nulls and the reason; a known one the planner's
    phases and their sum), its printed lines, and report.py's train-step tables for a row with the floor, an older
    row without it and a row whose floor is null. The planner itself is stubbed: tests/plan checks its numbers."""
    import json

    from bench_train_step import floor_fields, phase_lines
    from report import report

    import repae.plan.report

    predicted = {"dinov2": 4.0, "vae_forward": 50.0, "ema": 2.5}
    monkeypatch.setattr(repae.plan.report, "predicted_phase_ms", lambda cfg, gpu, *, batch, backend: predicted)
    unknown = floor_fields(None, "Some Future GPU", "triton")
    assert unknown["predicted_ms"] is None and unknown["floor_ms"] is None and "GPU_SPECS" in unknown["floor_note"]
    known = floor_fields(None, "NVIDIA H100 80GB HBM3", "triton")
    assert known == {"floor_gpu": "H100 SXM 80GB", "predicted_ms": predicted, "floor_ms": 56.5, "floor_note": None}

    split = {"dinov2": 8.0, "vae_forward": 100.0}
    lines = phase_lines(split, known["predicted_ms"])
    assert any(line.split() == ["dinov2", "8.00", "4.00", "2.00"] for line in lines), lines
    assert any(line.split() == ["ema", "-", "2.50", "-"] for line in lines), lines
    assert phase_lines(split, None)[1].split() == ["dinov2", "8.00", "-", "-"]

    base = dict(op="train_step", case="sitxl2_f8d4_b32", mode="step", ms=[226.0] * 3, img_per_s=141.6,
                peak_mem_gib=50.0, engines="plain", gpu="NVIDIA H100 80GB HBM3", torch="2", triton="3", git_sha="0",
                date_utc="2026-01-01T00:00:00Z", split_ms=split)
    rows = [dict(base, provider="eager"), dict(base, provider="triton", **known),
            dict(base, case="other_gpu", provider="triton", **unknown)]
    (tmp_path / "train_step.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = report(tmp_path)
    assert "| sitxl2_f8d4_b32 | triton | plain | 226.0 | 141.6 | 50.0 | H100 SXM 80GB | 56.5 | 4.00 |" in text
    assert "| sitxl2_f8d4_b32 | eager | plain | 226.0 | 141.6 | 50.0 | - | - | - |" in text
    assert "| dinov2 | 8.0 / - | 8.0 / - | 8.0 / 4.0 (2.0x) |" in text  # rows sorted by case, then kernels
    assert "no floor, 'Some Future GPU' matches no row" in text
