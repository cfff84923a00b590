"""train/export.py: a checkpoint of ours becomes the official layout, which loads back strictly (our
loader, weights_only) with the same weights, and the E2E-VAE files carry the EMA BN statistics. The run
export writes the same files as a released checkpoint's (tests/train/test_export_formats.py decodes them)."""

from __future__ import annotations

import json

import torch
from conftest import tiny_config
from test_export_formats import export_files, files_under
from test_step import make_inputs

from repae.model.release import load_released_checkpoint
from repae.model.vae import load_latents_stats


def test_export_round_trip(tmp_path, ds_world):
    from repae.train.export import main as export_main
    from repae.train.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path / "run"))
    trainer.run_step(make_inputs(trainer, seed=0))
    trainer.save_checkpoint()
    out = tmp_path / "export"
    assert export_main(["--run-dir", str(tmp_path / "run"), "--out", str(out)]) == 0
    ckpt = torch.load(out / "checkpoints" / "0000001.pt", weights_only=True)
    assert set(ckpt) == {"model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "args", "steps"}
    assert isinstance(ckpt["args"], dict) and ckpt["steps"] == 1
    run = load_released_checkpoint(out / "checkpoints" / "0000001.pt")
    for k, v in trainer.ema.state_dict().items():
        assert torch.equal(run.sit.state_dict()[k], v), k
    for k, v in trainer.models.vae.module.state_dict().items():
        assert torch.equal(run.vae.state_dict()[k], v), k
    bias, scale = load_latents_stats(out / "e2e-vae-latents-stats.pt")
    ema_bn = trainer.ema.module.bn
    assert torch.equal(bias, ema_bn.running_mean) and torch.equal(scale, ema_bn.running_var.rsqrt())
    assert files_under(out) == export_files(1)
    assert all(torch.equal(a, b) for a, b in zip(load_latents_stats(out / "e2e-vae-latents-stats.safetensors"),
                                                 (bias, scale)))
    config = json.loads((out / "e2e-vae-diffusers" / "config.json").read_text())
    assert torch.equal(torch.tensor(config["latents_mean"]), ema_bn.running_mean)
    assert torch.equal(torch.tensor(config["latents_std"]), ema_bn.running_var.sqrt())
    assert config["sample_size"] == 64 and config["block_out_channels"] == [32, 64, 64, 64]
    assert export_main(["--run-dir", str(tmp_path / "nothing")]) == 2
