"""Build and load the models of a released REPA-E run: args.json + checkpoints/<step>.pt
(docs/METHOD.md#checkpoint-layout-of-the-original).

    run = load_released_checkpoint("exps/sit-xl-repae/checkpoints/0400000.pt")   # SiT from `ema`
    run.sit, run.vae, run.discriminator, run.args, run.steps

    models = build_from_args(json.load(open("exps/sit-xl-repae/args.json")))     # random weights

The official layout: `model`, `ema` (SiT), `vae`, `discriminator`, `opt`, `opt_vae`, `opt_disc`, `args`
(an argparse.Namespace), `steps`; `args.json` sits next to the `checkpoints/` folder. Every load is
strict (a mismatch names the keys). This file only maps run arguments to our builders and loads;
it holds no model code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from torch import nn

from .discriminator import build_discriminator
from .sit import SiT, build_sit, sit_config_from_args
from .vae import build_vae, vae_config
from .weights import load_state_dict_checked, read_weight_file, state_dict_from

DEFAULT_VAE = "f8d4"


@dataclass
class ReleasedModels:
    """The models of one run (weights random unless loaded), its arguments and step count."""

    sit: SiT
    vae: nn.Module
    discriminator: nn.Module
    args: dict
    steps: int | None = None


def read_run_args(path: str | os.PathLike) -> dict:
    """A run's arguments as a dict, from args.json, a run directory holding it, or a checkpoint's `args`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "args.json")
    if path.endswith(".json"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"run arguments not found: {path}")
        with open(path) as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from err
    obj = read_weight_file(path, what="checkpoint")
    if "args" not in obj:
        raise ValueError(f"checkpoint {path} holds no `args`; pass the run's args.json")
    return _args_dict(obj["args"])


def _args_dict(args) -> dict:
    """A checkpoint's `args`: a plain dict (our exports) or the original's argparse.Namespace."""
    return dict(args) if isinstance(args, dict) else dict(vars(args))


def build_from_args(args: dict) -> ReleasedModels:
    """SiT, VAE and discriminator shaped as the run's arguments say (REPA-E names: model, vae, resolution,
    enc_type, encoder_depth, cfg_prob, bn_momentum, qk_norm, ...), with fresh weights."""
    # Runs exported by repae carry their whole config: a non-registry (tiny) VAE is rebuilt from it.
    overrides = args.get("repae_config", {}).get("vae", {}).get("overrides", {})
    vae_cfg = vae_config(args.get("vae", DEFAULT_VAE), **overrides)
    return ReleasedModels(sit=build_sit(sit_config_from_args(args)), vae=build_vae(vae_cfg),
                          discriminator=build_discriminator(), args=dict(args))


def load_released_checkpoint(path: str | os.PathLike, *, args: dict | str | os.PathLike | None = None,
                             sit_key: str = "ema") -> ReleasedModels:
    """Build from the run's arguments and load every model present in the checkpoint, strictly.

    args: a dict, an args.json path, or None (the checkpoint's own `args`, else ../args.json next to the
    checkpoints folder). sit_key: "ema" (what generate.py samples with) or "model" (the trained weights).
    The VAE and discriminator stay freshly initialised when the checkpoint has no `vae` / `discriminator`.
    """
    path = os.fspath(path)
    obj = read_weight_file(path, what="checkpoint")
    if args is None:
        if "args" in obj:
            args = _args_dict(obj["args"])
        else:
            args = read_run_args(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "args.json"))
    elif not isinstance(args, dict):
        args = read_run_args(args)
    models = build_from_args(args)
    models.steps = obj.get("steps")
    load_state_dict_checked(models.sit, state_dict_from(obj, sit_key, source=path), source=f"{path}[{sit_key}]")
    for key, module in (("vae", models.vae), ("discriminator", models.discriminator)):
        if key in obj:
            load_state_dict_checked(module, state_dict_from(obj, key, source=path), source=f"{path}[{key}]")
    return models
