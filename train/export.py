"""Export a run's checkpoint in the official REPA-E layout, plus the E2E-VAE files
(docs/METHOD.md#checkpoint-layout-of-the-original).

    python -m repae.train.export --run-dir exps/sitxl-repae [--step 400000] [--out exps/sitxl-repae/export]

Writes into --out:
- `checkpoints/<step:07d>.pt`: {model, ema, vae, discriminator, opt, opt_vae, opt_disc, args (a plain
  dict, so `torch.load(weights_only=True)` works), steps}; `args.json` next to `checkpoints/`, so
  `repae.model.load_released_checkpoint` and the original generate.py read it.
- `e2e-vae.pt` (+ .safetensors), `e2e-vae-latents-stats.pt` taken from the EMA latent BN
  (latents_scale = running_var^-1/2, latents_bias = running_mean, [1, C, 1, 1]) and
  `e2e-vae-discriminator-ckpt.pt`; `sit-ema.safetensors`.
The optimizer entries are empty dicts: ZeRO keeps AdamW's state partitioned and flattened, which is not
torch's AdamW layout (resume from our own checkpoints instead). Reading goes through train/checkpoint.py
(the layout, validation, weights-only loads); this file only reads and writes files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from repae.model.vae import save_latents_stats
from repae.model.weights import save_weights

from . import checkpoint as ckpt


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


def export_run(run_dir: str, out: str, step: int | None = None) -> str:
    root = os.path.join(run_dir, ckpt.CKPT_DIR)
    path = ckpt.resolve(root, step)  # strictly inside root; no fallback: export what was asked for
    kinds = ckpt.kinds_on_disk(path)
    ckpt.validate(path, kinds)  # every file weights-only loadable (a pickled payload is refused, never run)
    state = ckpt.load_file(os.path.join(path, ckpt.TRAINER_FILE))
    steps, ema = state["step"], state["ema"]
    args = official_args(state["config"])
    weights = {key: ckpt.engine_weights(path, key, kind) for key, kind in kinds.items()}
    official = {"model": weights["sit"], "ema": ema, "vae": weights["vae"], "discriminator": weights["disc"],
                "opt": {}, "opt_vae": {}, "opt_disc": {}, "args": args, "steps": steps}
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
    save_weights(official, os.path.join(out, "checkpoints", f"{steps:07d}.pt"))
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(args, f, indent=2)
    save_weights(official["vae"], os.path.join(out, "e2e-vae.pt"))
    save_weights(official["vae"], os.path.join(out, "e2e-vae.safetensors"))
    save_weights(official["discriminator"], os.path.join(out, "e2e-vae-discriminator-ckpt.pt"))
    save_weights(ema, os.path.join(out, "sit-ema.safetensors"))
    save_latents_stats(os.path.join(out, "e2e-vae-latents-stats.pt"), ema["bn.running_mean"],
                       ema["bn.running_var"].rsqrt())
    return os.path.join(out, "checkpoints", f"{steps:07d}.pt")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="export a repae run in the official REPA-E checkpoint layout")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    p.add_argument("--out", default=None, help="default: <run-dir>/export")
    a = p.parse_args(argv)
    try:
        path = export_run(a.run_dir, a.out or os.path.join(a.run_dir, "export"), a.step)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
