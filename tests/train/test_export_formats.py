"""train/export.py on a released-layout REPA-E checkpoint (`--checkpoint`, written here as the original writes it:
the official keys, `args` an argparse.Namespace): the same files as a run export, and every format decodes the
same images.

Decoding x (normalised latents) the way generate.py does, z = x / rsqrt(running_var) + running_mean with the EMA
latent BN, is the reference:
- e2e-vae.pt + e2e-vae-latents-stats.pt and e2e-vae.safetensors + e2e-vae-latents-stats.safetensors (our loaders,
  z = x / latents_scale + latents_bias): bitwise equal.
- e2e-vae-diffusers/ through our loader (train/evaluate_vae_io.load_vae): the same weights, bitwise equal decodes;
  diffusers.AutoencoderKL.from_pretrained(folder) with z = x * latents_std + latents_mean from its config: equal to
  ATOL / RTOL (fp32: the two denormalisations and the two attention implementations round differently).
Tiny models (SiT 2 blocks of width 144, VAE width 32); about 5 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch

from repae.model.release import build_from_args, load_released_checkpoint
from repae.model.vae import build_vae, load_latents_stats, load_vae_weights, vae_config
from repae.model.weights import load_weights, save_weights
from repae.train.evaluate_vae_io import load_vae
from repae.train.export import main as export_main

ATOL, RTOL = 2e-5, 1e-5  # diffusers vs ours, decoded images of max |x| ~2, fp32 on CPU (measured: 6e-6)
STEPS = 1234
TINY_VAE = {"ch": 32, "ch_mult": [1, 2, 2, 2]}  # configs/tiny_cpu.json's VAE; the tiny SiT by constructor names
ARGS = {"model": "SiT-B/2", "resolution": 64, "vae": "f8d4", "enc_type": "dinov2-vit-s", "depth": 2,
        "hidden_size": 144, "num_heads": 2, "encoder_depth": 1, "projector_dim": 64, "num_classes": 10,
        "cfg_prob": 0.1, "bn_momentum": 0.1, "qk_norm": False, "batch_size": 256,
        "repae_config": {"vae": {"overrides": TINY_VAE}}}


def export_files(steps: int) -> set[str]:
    """Every file an export with all formats writes, relative to --out."""
    return {"args.json", f"checkpoints/{steps:07d}.pt", "e2e-vae.pt", "e2e-vae-latents-stats.pt",
            "e2e-vae-discriminator-ckpt.pt", "e2e-vae.safetensors", "e2e-vae-latents-stats.safetensors",
            "sit-ema.safetensors", "e2e-vae-diffusers/config.json",
            "e2e-vae-diffusers/diffusion_pytorch_model.safetensors"}


def files_under(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A released-layout checkpoint with non-trivial VAE weights and EMA BN statistics, exported once."""
    root = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    models = build_from_args(ARGS)
    with torch.no_grad():
        for p in models.vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ema = models.sit.state_dict()
    ema["bn.running_mean"] = torch.randn(4) * 0.5
    ema["bn.running_var"] = torch.rand(4) * 3 + 0.2
    # an AdamW state dict in torch's layout (copied as it is; torch.optim itself would import torch._dynamo, 2 s)
    opt_disc = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.randn(3), "exp_avg_sq": torch.rand(3)}},
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "params": [0]}]}
    ckpt = {"model": models.sit.state_dict(), "ema": ema, "vae": models.vae.state_dict(),
            "discriminator": models.discriminator.state_dict(), "opt": {}, "opt_vae": {}, "opt_disc": opt_disc,
            "args": argparse.Namespace(**ARGS), "steps": STEPS}
    path = root / "run" / "checkpoints" / f"{STEPS:07d}.pt"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    assert export_main(["--checkpoint", str(path)]) == 0  # default --out: export/ beside checkpoints/
    return {"path": path, "out": root / "run" / "export", "ckpt": ckpt, "vae": models.vae.eval()}


def reference_images(released, x_BChw):
    """generate.py's decode: z = x / rsqrt(running_var) + running_mean (the EMA BN, no eps), then the VAE."""
    ema = released["ckpt"]["ema"]
    z = x_BChw / ema["bn.running_var"].rsqrt().view(1, -1, 1, 1) + ema["bn.running_mean"].view(1, -1, 1, 1)
    return released["vae"].decode(z), z


def test_released_checkpoint_exports_the_same_files_as_a_run(released):
    out, ckpt = released["out"], released["ckpt"]
    assert files_under(out) == export_files(STEPS)
    again = torch.load(out / "checkpoints" / f"{STEPS:07d}.pt", weights_only=True)  # args is a plain dict now
    assert again["args"] == ARGS == json.loads((out / "args.json").read_text()) and again["steps"] == STEPS
    assert again["opt_disc"]["state"][0]["exp_avg"].equal(ckpt["opt_disc"]["state"][0]["exp_avg"])
    run = load_released_checkpoint(out / "checkpoints" / f"{STEPS:07d}.pt")
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in run.sit.state_dict().items())
    sit = load_weights(build_from_args(ARGS).sit, out / "sit-ema.safetensors")  # strict
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in sit.state_dict().items())
    for ext in ("pt", "safetensors"):
        bias, scale = load_latents_stats(out / f"e2e-vae-latents-stats.{ext}")
        assert torch.equal(bias, ckpt["ema"]["bn.running_mean"])
        assert torch.equal(scale, ckpt["ema"]["bn.running_var"].rsqrt())


@torch.no_grad()
def test_pt_safetensors_and_diffusers_folder_decode_the_same_images(released):
    out = released["out"]
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    want, z_ref = reference_images(released, x)
    for ext in ("pt", "safetensors"):
        vae = load_vae_weights(build_vae(vae_config("f8d4", **TINY_VAE)), out / f"e2e-vae.{ext}").eval()
        bias, scale = load_latents_stats(out / f"e2e-vae-latents-stats.{ext}")
        assert torch.equal(vae.decode(x / scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)), want), ext
    vae, source = load_vae(str(out / "e2e-vae-diffusers"))  # evaluate_vae's reader of diffusers folders
    assert source["kind"] == "weights file (diffusers layout)" and torch.equal(vae.decode(z_ref), want)
    config = json.loads((out / "e2e-vae-diffusers" / "config.json").read_text())
    mean, std = (torch.tensor(config[k]).view(1, -1, 1, 1) for k in ("latents_mean", "latents_std"))
    torch.testing.assert_close(vae.decode(x * std + mean), want, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_diffusers_from_pretrained_loads_cleanly_and_decodes_the_same(released):
    from repae.model.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    diffusers = pytest.importorskip("diffusers")
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers")  # diffusers' loggers do not propagate to the root logger
    logger.addHandler(handler)
    try:
        model, info = diffusers.AutoencoderKL.from_pretrained(released["out"] / "e2e-vae-diffusers",
                                                              output_loading_info=True, low_cpu_mem_usage=False)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []  # no unexpected config attributes, no missing weights
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    ema = released["ckpt"]["ema"]
    assert model.config.scaling_factor == 1.0 and model.config.shift_factor is None
    mean, std = torch.tensor(model.config.latents_mean), torch.tensor(model.config.latents_std)
    assert torch.equal(mean, ema["bn.running_mean"]) and torch.equal(std, ema["bn.running_var"].sqrt())
    std64 = torch.tensor(model.config.latents_std, dtype=torch.float64)  # the JSON holds sqrt in fp64
    assert torch.equal(std64, ema["bn.running_var"].double().sqrt())
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    want, _ = reference_images(released, x)
    # a diffusers user: z = z_norm * latents_std / scaling_factor + latents_mean (the SDXL pipelines' formula)
    z = x * std.view(1, -1, 1, 1) / model.config.scaling_factor + mean.view(1, -1, 1, 1)
    torch.testing.assert_close(model.decode(z).sample, want, atol=ATOL, rtol=RTOL)


def test_formats_option_and_bad_input(tmp_path, released, capsys):
    out = tmp_path / "only-diffusers"
    assert export_main(["--checkpoint", str(released["path"]), "--out", str(out), "--formats", "diffusers"]) == 0
    assert files_under(out) == {"args.json", "e2e-vae-diffusers/config.json",
                                "e2e-vae-diffusers/diffusion_pytorch_model.safetensors"}
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(released["path"]), "--formats", "onnx"])
    no_vae = tmp_path / "no-vae.pt"
    save_weights({k: v for k, v in released["ckpt"].items() if k != "vae"}, no_vae)
    assert export_main(["--checkpoint", str(no_vae), "--out", str(tmp_path / "x")]) == 2
    assert "lacks ['vae']" in capsys.readouterr().err
    assert export_main(["--checkpoint", str(released["path"]), "--step", "3"]) == 2
