"""model/release.py: a run in the official layout (args.json + checkpoints/<step>.pt holding model, ema, vae,
discriminator, opt*, an argparse.Namespace `args`, steps) builds and loads strictly."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from repae.model.release import build_from_args, load_released_checkpoint, read_run_args

# A tiny SiT given by the SiT constructor names (as args.json may hold), on the real f8d4 VAE.
ARGS = {"model": "SiT-B/2", "resolution": 64, "vae": "f8d4", "enc_type": "dinov2-vit-s", "depth": 2,
        "hidden_size": 144, "num_heads": 2, "encoder_depth": 1, "projector_dim": 64, "num_classes": 10,
        "cfg_prob": 0.1, "bn_momentum": 0.1, "qk_norm": False, "learning_rate": 1e-4, "batch_size": 256}


def write_run(tmp_path, *, args_in_ckpt: bool):
    torch.manual_seed(0)
    models = build_from_args(ARGS)
    ema = build_from_args(ARGS).sit.state_dict()
    run = tmp_path / "exps" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "args.json").write_text(json.dumps(ARGS))
    ckpt = {"model": models.sit.state_dict(), "ema": ema, "vae": models.vae.state_dict(),
            "discriminator": models.discriminator.state_dict(), "opt": {}, "opt_vae": {}, "opt_disc": {},
            "steps": 1234}
    if args_in_ckpt:
        ckpt["args"] = argparse.Namespace(**ARGS)
    path = run / "checkpoints" / "0001234.pt"
    torch.save(ckpt, path)
    return path, models, ema


@pytest.mark.parametrize("args_in_ckpt", [True, False])
def test_released_checkpoint_builds_and_loads_strictly(tmp_path, args_in_ckpt):
    path, models, ema = write_run(tmp_path, args_in_ckpt=args_in_ckpt)
    run = load_released_checkpoint(path)
    assert run.steps == 1234 and run.args["model"] == "SiT-B/2"
    assert run.sit.config.input_size == 8 and run.sit.config.z_dims == (384,) and run.sit.config.depth == 2
    for k, v in run.sit.state_dict().items():
        assert torch.equal(v, ema[k]), k
    for mine, theirs in ((run.vae, models.vae), (run.discriminator, models.discriminator)):
        for (k, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), k
    trained = load_released_checkpoint(path, sit_key="model")
    for (k, a), b in zip(trained.sit.state_dict().items(), models.sit.state_dict().values()):
        assert torch.equal(a, b), k


def test_read_run_args_sources_and_errors(tmp_path):
    path, _, _ = write_run(tmp_path, args_in_ckpt=True)
    assert read_run_args(path.parent.parent) == ARGS == read_run_args(path)
    with pytest.raises(FileNotFoundError, match="args.json"):
        read_run_args(tmp_path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        read_run_args(tmp_path / "bad.json")


def test_wrong_architecture_names_the_keys(tmp_path):
    path, _, _ = write_run(tmp_path, args_in_ckpt=True)
    with pytest.raises(ValueError, match=r"(?s)ema\].*missing: blocks\.2"):
        load_released_checkpoint(path, args={**ARGS, "depth": 3})
