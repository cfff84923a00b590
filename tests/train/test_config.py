"""train/config.py: the shipped configs load; unknown keys, wrong types, bad values, DeepSpeed keys the
trainer owns and missing paths are errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repae.train.config import TrainConfig, check_paths, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["sitxl_repae.json", "sitxl1_repae_f16d32.json", "tiny_cpu.json",
                                  "sitxl1_ldm_e2e_vavae.json", "tiny_ldm_cpu.json"])
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
    ("optim_vae.lr=0", r"optim_vae\.lr=0\.0 must be a finite number > 0"),
    ("deepspeed.train_batch_size=64", r"deepspeed\.train_batch_size is set by the trainer"),
    ("deepspeed.zero_optimization.stage=3", r"stage=3 must be 0, 1 or 2"),
    ("loss.vae.lpips_double_rescale=1", r"lpips_double_rescale=1 has the wrong type"),
    ("loss.vae.kl_weight=-1.0", r"kl_weight"),
    ("noequals", r"must look like section\.key=value"),
])
def test_bad_keys_and_values_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(CONFIGS / "tiny_cpu.json", [override])


# Every value is checked at load time, one line naming the dotted key.
@pytest.mark.parametrize("override,key", [
    ("optim_sit.lr=NaN", "optim_sit.lr"),
    ("loss.proj_coeff=Infinity", "loss.proj_coeff"),
    ("logging.cfg_scale=-Infinity", "logging.cfg_scale"),
    ("loss.vae.kl_weight=NaN", "loss.vae.kl_weight"),
    ("sit.bn_momentum=-0.1", "sit.bn_momentum"),
    ("sit.bn_momentum=1.5", "sit.bn_momentum"),
    ("sit.bn_momentum=NaN", "sit.bn_momentum"),
    ("sit.class_dropout_prob=1.0", "sit.class_dropout_prob"),
    ("optim_sit.betas=[0.9, 1.0]", "optim_sit.betas"),
    ("optim_vae.betas=[-0.1, 0.999]", "optim_vae.betas"),
    ("optim_disc.betas=[NaN, 0.999]", "optim_disc.betas"),
    ("optim_sit.eps=0", "optim_sit.eps"),
    ("optim_vae.weight_decay=-0.01", "optim_vae.weight_decay"),
    ("optim_sit.grad_clip=NaN", "optim_sit.grad_clip"),
    ("optim_disc.grad_clip=-1", "optim_disc.grad_clip"),
    ("schedule.ema_decay=1.5", "schedule.ema_decay"),
    ("schedule.seed=-1", "schedule.seed"),
    ("schedule.global_batch_size=0", "schedule.global_batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.resolution=100", "data.resolution"),
    ("data.root=", "data.root"),
    ("logging.run_dir=", "logging.run_dir"),
    ("logging.run_dir=  ", "logging.run_dir"),
    ("logging.sample_every=-1", "logging.sample_every"),
    ("logging.num_samples=0", "logging.num_samples"),
    ("logging.sample_steps=0", "logging.sample_steps"),
    ("logging.log_every=0", "logging.log_every"),
    ("sit.name=SiT-Q/2", "sit.name"),
    ("sit.name=SiT-S/4", "sit.name"),  # 32-px tokens on f8 latents: not DINOv2's 16-px grid
    ("sit.encoder_depth=5", "sit.encoder_depth"),  # the tiny SiT has 4 blocks
    ("sit.overrides.depht=3", "sit.overrides.depht"),
    ("sit.overrides.bn_momentum=0.5", "sit.overrides.bn_momentum"),
    ("sit.overrides.mlp_ratio=NaN", "sit.overrides.mlp_ratio"),
    ("vae.name=f4d8", "vae.name"),
    ("vae.overrides.ch=30", "vae.overrides"),
    ("encoder.enc_type=dinov2-vit-q", "encoder.enc_type"),
    ('deepspeed.zero_optimisation={"stage": 2}', "deepspeed.zero_optimisation"),
    ("deepspeed.zero_optimization.stag=2", "deepspeed.zero_optimization.stag"),
    ("deepspeed.zero_optimization.stage=4", "deepspeed.zero_optimization.stage"),
    ("deepspeed.zero_optimization.stage=true", "deepspeed.zero_optimization.stage"),
    ("deepspeed.zero_optimization.overlap_comm=auto", "deepspeed.zero_optimization.overlap_comm"),
    ("deepspeed.zero_optimization.reduce_bucket_size=-5", "deepspeed.zero_optimization.reduce_bucket_size"),
    ('deepspeed.zero_optimization.offload_optimizer={"device": "cpu"}',
     "deepspeed.zero_optimization.offload_optimizer"),
    ("deepspeed.train_micro_batch_size_per_gpu=auto", "deepspeed.train_micro_batch_size_per_gpu"),
    ('deepspeed.scheduler={"type": "WarmupLR"}', "deepspeed.scheduler"),
    ("deepspeed.gradient_clipping=1.0", "deepspeed.gradient_clipping"),
    ('deepspeed.bf16={"enabled": "auto"}', "deepspeed.bf16.enabled"),
    ('deepspeed.fp16={"enabeld": true}', "deepspeed.fp16.enabeld"),
    ("deepspeed.steps_per_print=0", "deepspeed.steps_per_print"),
])
def test_every_config_gap_is_one_line_naming_the_key(override, key):
    with pytest.raises(ValueError) as err:
        load_config(CONFIGS / "tiny_cpu.json", [override])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"config key {key}"), message


def test_misspellings_suggest_the_right_key():
    with pytest.raises(ValueError, match=r"deepspeed\.zero_optimisation .*did you mean 'zero_optimization'"):
        load_config(CONFIGS / "tiny_cpu.json", ['deepspeed.zero_optimisation={"stage": 2}'])
    with pytest.raises(ValueError, match=r"deepspeed\.zero_optimization\.overlap_com .*did you mean 'overlap_comm'"):
        load_config(CONFIGS / "tiny_cpu.json", ["deepspeed.zero_optimization.overlap_com=true"])
    with pytest.raises(ValueError, match=r"unknown config key loss\.proj_coef \(did you mean 'proj_coeff'\?\)"):
        load_config(CONFIGS / "tiny_cpu.json", ["loss.proj_coef=0.5"])


def test_valid_edge_values_load():
    cfg = load_config(CONFIGS / "tiny_cpu.json", [
        "sit.bn_momentum=1.0", "optim_sit.betas=[0.0, 0.0]", "optim_sit.grad_clip=0", "optim_vae.weight_decay=0",
        "schedule.ema_decay=1", "logging.sample_every=0", "logging.cfg_scale=1",
        "deepspeed.zero_optimization.stage=0", "deepspeed.zero_optimization.reduce_bucket_size=5e8",
        'deepspeed.bf16={"enabled": true}', "deepspeed.communication_data_type=fp32"])
    assert cfg.optim_sit.grad_clip == 0.0 and cfg.schedule.ema_decay == 1.0


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
    from repae.train.build import flops_per_image

    tiny = flops_per_image(load_config(CONFIGS / "tiny_cpu.json"))
    full = flops_per_image(load_config(CONFIGS / "sitxl_repae.json"))
    assert 0 < tiny < full
    # docs/METHOD.md#compute-per-image: VAE 2.66 + SiT 0.71 + align pass 0.14 = ~3.5 TFLOP per trained image (the
    # estimate leaves DINOv2, LPIPS and the discriminator out)
    assert 3.0e12 < full < 4.5e12
