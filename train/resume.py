"""What a resume does when the config differs from the checkpoint's.

- Another model (MODEL_KEYS: other parameter shapes or meaning) or engine layout (ENGINE_KEYS: DeepSpeed
  settings that change the optimizer's file layout) is refused, naming the key.
- New optimizer settings (train/engine.py OPTIM_KEYS, and grad_clip) are applied to the loaded optimizers and
  logged old -> new.
- Another world size resumes at ZeRO stage 0 or without DeepSpeed (the whole optimizer is on every rank and the
  step math does not depend on the world size) and is refused at ZeRO 1/2 (optimizer states partitioned per rank).
Every other difference is logged, one line each.
"""

from __future__ import annotations

from .checkpoint_io import CheckpointError
from .engine import OPTIM_KEYS

# sit.freeze_pos_embed changes which parameters the SiT optimizer holds.
MODEL_KEYS = ("sit.name", "sit.overrides", "sit.encoder_depth", "sit.projector_dim", "sit.num_classes", "sit.qk_norm",
              "sit.freeze_pos_embed", "vae.name", "vae.overrides", "encoder.enc_type", "data.resolution")
ENGINE_KEYS = {"deepspeed.zero_optimization.stage": 0, "deepspeed.bf16.enabled": False,
               "deepspeed.fp16.enabled": False}
"""DeepSpeed settings that change the optimizer's file layout, with the defaults DeepSpeed reads."""

_MISSING = "(not in the checkpoint's config)"


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def _has(d: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def check_resume(info, config: dict, world: int) -> list[str]:
    """Refuse what cannot resume (another model, engine layout, or world size at ZeRO 1/2), naming the key; return
    one line per other config difference (the optimizer ones are applied by apply_optimizer_settings)."""
    old, new = _flatten(info.config), _flatten(config)
    known = [m for m in MODEL_KEYS if _has(info.config, m)]  # a field newer than the checkpoint: the load decides
    for key in sorted(set(old) | set(new)):
        if any(key == m or key.startswith(m + ".") for m in known) and old.get(key) != new.get(key):
            raise CheckpointError(f"config key {key}={new.get(key)!r} differs from {old.get(key, _MISSING)!r} in "
                                  f"{info.path}: the checkpoint holds another model (resume with the same value, or "
                                  f"start a new logging.run_dir)")
    for key, default in ENGINE_KEYS.items():
        if old.get(key, default) != new.get(key, default):
            raise CheckpointError(f"config key {key}={new.get(key, default)!r} differs from {old.get(key, default)!r} "
                                  f"in {info.path}: DeepSpeed stores the optimizer in another layout (resume with "
                                  f"the same value)")
    for key, dp in info.partitioned.items():
        if dp != world:
            raise CheckpointError(f"{info.path} was written by {_ranks(dp)} with ZeRO stage "
                                  f"{old.get('deepspeed.zero_optimization.stage')}, which partitions the {key} "
                                  f"optimizer states per rank; this run has {_ranks(world)}: resume with "
                                  f"{_ranks(dp)} (ZeRO stage 0 checkpoints resume at any world size)")
    notes = [f"{k}: {old.get(k, _MISSING)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if old.get(k, _MISSING) != new.get(k, _MISSING) and not k.startswith("optim_")]
    if info.world_size != world:
        notes.append(f"world size: {info.world_size} -> {world} (the step's draws and data order are global; "
                     f"ranks without an rng_rank file keep their fresh torch RNG state)")
    return notes


def apply_optimizer_settings(engines: dict, sections: dict, old_config: dict) -> list[str]:
    """Set lr, betas, eps, weight_decay and grad_clip of the config on the loaded optimizers (loading restores the
    checkpoint's, ZeRO's clip value included); one line per value that changed, old -> new."""
    notes = []
    for key, engine in engines.items():
        section, old = sections[key], old_config.get(f"optim_{key}", {})
        engine.set_optimizer_settings(section)
        for name in (*OPTIM_KEYS, "grad_clip"):
            before, now = old.get(name, _MISSING), getattr(section, name)
            if (tuple(before) if isinstance(before, (list, tuple)) else before) != now:
                notes.append(f"optim_{key}.{name}: {before!r} -> {now!r} (applied to the loaded optimizer)")
    return notes
