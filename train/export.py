"""Export a run's checkpoint, or a released REPA-E checkpoint file, in the official REPA-E layout plus the E2E-VAE
and SiT files (docs/METHOD.md#checkpoint-layout-of-the-original, #exported-files).

    python -m repae.train.export --run-dir exps/sitxl-repae [--step 400000] [--out exps/sitxl-repae/export]
    python -m repae.train.export --checkpoint pretrained/sit-repae/checkpoints/0400000.pt --out export
    ... --formats official,diffusers            # default: official,safetensors,diffusers

Writes into --out (default <run-dir>/export, or export/ next to the checkpoints/ folder of --checkpoint):
- always `args.json` (the run's arguments: the SiT's and VAE's shapes), as the original writes it.
- official: `checkpoints/<step:07d>.pt` {model, ema, vae, discriminator, opt, opt_vae, opt_disc, args (a plain
  dict, so `torch.load(weights_only=True)` works), steps}, which `repae.model.load_released_checkpoint` and the
  original generate.py read; `e2e-vae.pt`, `e2e-vae-latents-stats.pt` and `e2e-vae-discriminator-ckpt.pt` as the
  original's save_vae_weights.py writes them.
- safetensors: `e2e-vae.safetensors` + `e2e-vae-latents-stats.safetensors`, `sit-ema.safetensors` (the EMA SiT).
- diffusers: `e2e-vae-diffusers/` {config.json, diffusion_pytorch_model.safetensors}, for
  `diffusers.AutoencoderKL.from_pretrained`; config.json carries latents_mean / latents_std (model/vae.py
  diffusers_config says how to normalise with them).
Latent statistics come from the EMA latent BN: latents_bias = latents_mean = running_mean, latents_scale =
running_var^-1/2 ([1, C, 1, 1] files), latents_std = running_var^1/2 (config.json).
A run's optimizer entries are empty dicts: ZeRO keeps AdamW's state partitioned and flattened, which is not
torch's AdamW layout (resume from our own checkpoints instead); a released checkpoint's are copied as they are.
Our run is read through train/checkpoint.py (layout, validation, weights-only loads), a checkpoint file through
model/weights.py (weights-only, the original's argparse.Namespace allowed); this file only reads and writes files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from repae.model.release import read_run_args
from repae.model.vae import diffusers_config, ldm_to_diffusers, save_latents_stats, vae_config_from_state_dict
from repae.model.weights import read_weight_file, save_weights

from . import checkpoint as ckpt

FORMATS = ("official", "safetensors", "diffusers")
OFFICIAL_KEYS = ("model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "args", "steps")
DIFFUSERS_DIR = "e2e-vae-diffusers"
BN_KEYS = ("bn.running_mean", "bn.running_var")  # the latent BN inside the EMA SiT's state dict


def official_args(config: dict) -> dict:
    """REPA-E's argument names for our config, plus the SiT constructor names our builders read."""
    sit, vae, sched = config["sit"], config["vae"], config["schedule"]
    args = {"model": sit["name"], "vae": vae["name"], "resolution": config["data"]["resolution"],
            "enc_type": config["encoder"]["enc_type"], "encoder_depth": sit["encoder_depth"],
            "projector_dim": sit["projector_dim"], "cfg_prob": sit["class_dropout_prob"],
            "num_classes": sit["num_classes"], "bn_momentum": sit["bn_momentum"], "qk_norm": sit["qk_norm"],
            "path_type": sit["path_type"], "proj_coeff": config["loss"]["proj_coeff"],
            "vae_align_proj_coeff": config["loss"]["vae_align_proj_coeff"], "batch_size": sched["global_batch_size"],
            "learning_rate": config["optim_sit"]["lr"], "vae_learning_rate": config["optim_vae"]["lr"],
            "disc_learning_rate": config["optim_disc"]["lr"], "seed": sched["seed"],
            "mixed_precision": sched["precision"], "weighting": sched["weighting"], "prediction": "v"}
    args.update(sit.get("overrides", {}))
    args["repae_config"] = config
    return args


# ---------------------------------------------------------------------------------------------------
# Sources: both give the official checkpoint dict
# ---------------------------------------------------------------------------------------------------


def official_from_run(run_dir: str, step: int | None = None) -> dict:
    """The official checkpoint dict of one of our run's checkpoints (the latest when step is None)."""
    root = os.path.join(run_dir, ckpt.CKPT_DIR)
    path = ckpt.resolve(root, step)  # strictly inside root; no fallback: export what was asked for
    kinds = ckpt.kinds_on_disk(path)
    ckpt.validate(path, kinds)  # every file weights-only loadable (a pickled payload is refused, never run)
    state = ckpt.load_file(os.path.join(path, ckpt.TRAINER_FILE))
    weights = {key: ckpt.engine_weights(path, key, kind) for key, kind in kinds.items()}
    return {"model": weights["sit"], "ema": state["ema"], "vae": weights["vae"], "discriminator": weights["disc"],
            "opt": {}, "opt_vae": {}, "opt_disc": {}, "args": official_args(state["config"]), "steps": state["step"]}


def official_from_file(path: str) -> dict:
    """The official checkpoint dict of a released-layout file (the original's, or one of our exports): its
    entries as they are, `args` as a plain dict (the file's own, else the args.json beside checkpoints/)."""
    obj = read_weight_file(path, what="checkpoint")
    missing = [k for k in ("ema", "vae", "steps") if k not in obj]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing} (it holds {sorted(map(str, obj))}): export needs a "
                         f"REPA-E run checkpoint with its E2E-VAE")
    if "args" in obj:
        args = obj["args"] if isinstance(obj["args"], dict) else vars(obj["args"])  # dict or argparse.Namespace
    else:
        args = read_run_args(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "args.json"))
    return {**{k: obj[k] for k in OFFICIAL_KEYS if k in obj}, "args": dict(args), "steps": int(obj["steps"])}


# ---------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------


def _write_json(obj: dict, path: str) -> None:
    """JSON to path + ".tmp", then renamed (as save_weights writes)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, sort_keys=path.endswith("config.json"), default=str)
        f.write("\n")
    os.replace(path + ".tmp", path)


def write_diffusers_folder(vae: dict, running_mean: torch.Tensor, running_var: torch.Tensor, folder: str, *,
                           sample_size: int | None = None) -> list[str]:
    """An LDM-layout VAE state dict as a diffusers AutoencoderKL folder: config.json (latents_mean = running_mean,
    latents_std = sqrt(running_var), both exact fp32 values as JSON floats) + diffusion_pytorch_model.safetensors."""
    cfg = vae_config_from_state_dict(vae)  # the shape from the tensors (attention placement included)
    config = diffusers_config(cfg, running_mean.double().tolist(), running_var.double().sqrt().tolist(),
                              sample_size=sample_size)
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, "diffusion_pytorch_model.safetensors"), os.path.join(folder, "config.json")]
    save_weights(ldm_to_diffusers(vae), paths[0])
    _write_json(config, paths[1])
    return paths


def write_export(official: dict, out: str, formats: tuple[str, ...] = FORMATS) -> list[str]:
    """Write the files of `formats` (module docstring) from an official checkpoint dict; returns their paths."""
    ema, vae, steps = official["ema"], official["vae"], official["steps"]
    if not all(k in ema for k in BN_KEYS):
        raise ValueError(f"the checkpoint's ema has no latent BN ({', '.join(BN_KEYS)}): no latent statistics")
    running_mean, running_var = (ema[k].float() for k in BN_KEYS)
    os.makedirs(out, exist_ok=True)
    written = [os.path.join(out, "args.json")]
    _write_json(official["args"], written[0])

    def put(obj: dict, name: str) -> None:
        written.append(os.path.join(out, name))
        save_weights(obj, written[-1])

    def put_stats(name: str) -> None:
        written.append(os.path.join(out, name))
        save_latents_stats(written[-1], running_mean, running_var.rsqrt())

    if "official" in formats:
        os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
        put(official, os.path.join("checkpoints", f"{steps:07d}.pt"))
        put(vae, "e2e-vae.pt")
        put_stats("e2e-vae-latents-stats.pt")
        if "discriminator" in official:
            put(official["discriminator"], "e2e-vae-discriminator-ckpt.pt")
    if "safetensors" in formats:
        put(vae, "e2e-vae.safetensors")
        put_stats("e2e-vae-latents-stats.safetensors")
        put(ema, "sit-ema.safetensors")
    if "diffusers" in formats:
        written += write_diffusers_folder(vae, running_mean, running_var, os.path.join(out, DIFFUSERS_DIR),
                                          sample_size=official["args"].get("resolution"))
    return written


def export_run(run_dir: str, out: str, step: int | None = None, formats: tuple[str, ...] = FORMATS) -> list[str]:
    """Export one of our run's checkpoints (the latest when step is None); returns the paths written."""
    return write_export(official_from_run(run_dir, step), out, formats)


def export_checkpoint(path: str, out: str, formats: tuple[str, ...] = FORMATS) -> list[str]:
    """Export a released-layout checkpoint file; returns the paths written."""
    return write_export(official_from_file(path), out, formats)


# ---------------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------------


def _formats(text: str) -> tuple[str, ...]:
    """--formats: a comma-separated subset of FORMATS."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown format(s) {bad or text!r}; choose from {', '.join(FORMATS)}")
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="export a repae run or a released REPA-E checkpoint: the official "
                                            "layout, safetensors and a diffusers AutoencoderKL folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="one of our run directories")
    src.add_argument("--checkpoint", help="a released-layout checkpoints/<step>.pt file")
    p.add_argument("--step", type=int, default=None, help="with --run-dir; default: the latest checkpoint")
    p.add_argument("--out", default=None, help="default: <run-dir>/export, or export/ beside checkpoints/")
    p.add_argument("--formats", type=_formats, default=FORMATS, help=f"comma-separated, default {','.join(FORMATS)}")
    a = p.parse_args(argv)
    try:
        if a.run_dir is not None:
            out = a.out or os.path.join(a.run_dir, "export")
            paths = export_run(a.run_dir, out, a.step, a.formats)
        else:
            if a.step is not None:
                raise ValueError("--step is for --run-dir; a --checkpoint file is one step")
            out = a.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(a.checkpoint))), "export")
            paths = export_checkpoint(a.checkpoint, out, a.formats)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote into {out}: " + ", ".join(os.path.relpath(path, out) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
