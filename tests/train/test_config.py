"""train/config.py: the shipped configs load; unknown keys, wrong types, bad values, DeepSpeed keys the
trainer owns and missing paths are errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repae.train.config import TrainConfig, check_paths, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["sitxl_repae.json", "sitxl1_repae_f16d32.json", "tiny_cpu.json"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, TrainConfig)
    json.dumps(cfg.to_dict())  # the resolved config is JSON-serialisable (saved with each run)


def test_paper_recipe_defaults():
    cfg = load_config(CONFIGS / "sitxl_repae.json")
    assert (cfg.sit.name, cfg.vae.name, cfg.encoder.enc_type) == ("SiT-XL/2", "f8d4", "dinov2-vit-b")
    assert (cfg.loss.proj_coeff, cfg.loss.vae_align_proj_coeff, cfg.loss.vae.kl_weight) == (0.5, 1.5, 1e-6)
    assert cfg.loss.vae.lpips_double_rescale is True
    assert cfg.schedule.global_batch_size == 256 and cfg.optim_vae.betas == (0.9, 0.999)
    assert cfg.deepspeed["zero_optimization"]["stage"] == 2
    assert load_config(CONFIGS / "sitxl1_repae_f16d32.json").vae.name == "f16d32"


def test_dotted_overrides():
    cfg = load_config(CONFIGS / "tiny_cpu.json", ["loss.proj_coeff=0.25", "logging.run_dir=/tmp/x",
                                                  "optim_sit.betas=[0.8, 0.9]", "deepspeed.zero_optimization.stage=1"])
    assert cfg.loss.proj_coeff == 0.25 and cfg.logging.run_dir == "/tmp/x" and cfg.optim_sit.betas == (0.8, 0.9)
    assert cfg.deepspeed["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize("override,match", [
    ("loss.proj_coef=0.5", r"unknown config key loss\.proj_coef"),
    ("sitt.name=x", r"unknown config key sitt"),
    ("schedule.max_steps=ten", r"schedule\.max_steps='ten' has the wrong type"),
    ("schedule.precision=fp8", r"schedule\.precision='fp8' must be one of"),
    ("optim_vae.lr=0", r"optim\.lr=0\.0 must be > 0"),
    ("deepspeed.train_batch_size=64", r"deepspeed\.train_batch_size is set by the trainer"),
    ("deepspeed.zero_optimization.stage=3", r"stage=3 must be 0, 1 or 2"),
    ("loss.vae.lpips_double_rescale=1", r"lpips_double_rescale=1 has the wrong type"),
    ("loss.vae.kl_weight=-1.0", r"kl_weight"),
    ("noequals", r"must look like section\.key=value"),
])
def test_bad_keys_and_values_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(CONFIGS / "tiny_cpu.json", [override])


def test_missing_files_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_config(tmp_path / "bad.json")
    cfg = load_config(CONFIGS / "sitxl_repae.json", [f"data.root={tmp_path / 'imagenet'}"])
    with pytest.raises(FileNotFoundError, match=r"data\.root: .*imagenet does not exist"):
        check_paths(cfg)
    (tmp_path / "imagenet").mkdir()
    cfg = load_config(CONFIGS / "sitxl_repae.json", [f"data.root={tmp_path / 'imagenet'}"])
    with pytest.raises(FileNotFoundError, match=r"vae\.weights: pretrained/sdvae/sdvae-f8d4\.pt does not exist"):
        check_paths(cfg)
    cfg = config_from_dict({"data": {"source": "demo"}})
    with pytest.raises(ValueError, match="vae.weights is not set"):
        check_paths(cfg)


def test_fp16_needs_the_deepspeed_loss_scaler():
    with pytest.raises(ValueError, match=r"precision=fp16 needs loss scaling: set deepspeed\.fp16\.enabled=true"):
        load_config(CONFIGS / "tiny_cpu.json", ["schedule.precision=fp16"])
    cfg = load_config(CONFIGS / "tiny_cpu.json", ["schedule.precision=fp16", 'deepspeed.fp16={"enabled": true}'])
    assert cfg.deepspeed["fp16"]["enabled"] is True


def test_flops_estimate_on_meta():
    from repae.train.trainer import estimate_flops_per_image

    tiny = estimate_flops_per_image(load_config(CONFIGS / "tiny_cpu.json"))
    full = estimate_flops_per_image(load_config(CONFIGS / "sitxl_repae.json"))
    assert 0 < tiny < full
    # spec §9.2: SiT-XL/2 ~237 GFLOP/img forward, SD-VAE ~0.89 TFLOP/img forward -> ~3.5 TFLOP/img trained
    assert 3.0e12 < full < 4.5e12
