"""The value checks of the run configuration: each raises one line naming the key.

Used by the config sections (train/config_sections.py) and the loader (train/config.py); the deepspeed section
is checked against the DeepSpeed engine settings the trainer passes through.
"""

from __future__ import annotations

import difflib
import math
import types
import typing


class ConfigKeyError(ValueError):
    """One bad config value, one line: `config key <key><detail>`. A section raises it with the key relative
    to itself (`betas`); _build re-raises it under the dotted path from the root (`optim_sit.betas`)."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"config key {key}{detail}")
        self.key, self.detail = key, detail

    def under(self, prefix: str) -> ConfigKeyError:
        return ConfigKeyError(prefix + self.key, self.detail)


def require(key: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise ConfigKeyError(key, f"={value!r} {rule}")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value) -> bool:
    """NaN and +-inf are not (JSON's NaN / Infinity parse to floats); an int always is (math.isfinite would
    overflow on a huge one)."""
    return is_number(value) and (isinstance(value, int) or math.isfinite(value))


def choice(key: str, value, choices) -> None:
    require(key, value, value in choices, f"must be one of {tuple(choices)}")


def positive(key: str, value) -> None:
    require(key, value, is_finite(value) and value > 0, "must be a finite number > 0")


def nonnegative(key: str, value) -> None:
    require(key, value, is_finite(value) and value >= 0, "must be a finite number >= 0")


def interval(key: str, value, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False,
              why: str = "") -> None:
    ok = is_finite(value) and (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    span = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    require(key, value, ok, f"must be in {span}{why}")


def optional_path(key: str, value) -> None:
    """An optional path: None, or a non-empty string."""
    require(key, value, value is None or (isinstance(value, str) and value.strip() != ""),
             "must be a non-empty path (or null)")


def int_at_least(key: str, value, lo: int) -> None:
    require(key, value, isinstance(value, int) and not isinstance(value, bool) and value >= lo,
             f"must be an integer >= {lo}")


def did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def known_key(key: str, name: str, known: list[str], rejected: dict[str, str], *, remove: str, unknown: str,
              listing: str) -> None:
    """`name` (at config key `key`) is not rejected (name -> why) and is one of `known`: one line otherwise, with a
    "did you mean" and the known names."""
    if name in rejected:
        raise ConfigKeyError(key, f" {rejected[name]}: {remove}")
    if name not in known:
        raise ConfigKeyError(key, f" {unknown}{did_you_mean(name, known)} ({listing}: {', '.join(known)})")


def check_overrides(owner: type, overrides: dict, reserved: dict[str, str]) -> None:
    """`overrides` holds fields of the model dataclass `owner` (SiTConfig, VAEConfig): known, not set
    elsewhere (`reserved`: field -> where it comes from), of the field's type, finite when numbers."""
    hints = typing.get_type_hints(owner)
    allowed = [k for k in hints if k not in reserved]
    for k, v in overrides.items():
        key = f"overrides.{k}"
        known_key(key, k, allowed, reserved, remove="remove it from overrides",
                  unknown=f"is not a {owner.__name__} field", listing="allowed")
        require(key, v, type_ok(v, hints[k]), f"has the wrong type (expected {hints[k]})")
        require(key, v, all(is_finite(x) for x in (v if isinstance(v, list) else [v]) if is_number(x)),
                 "must be finite")


def type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]
            return isinstance(value, (list, tuple)) and all(type_ok(v, args[0]) for v in value)
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(
            type_ok(v, a) for v, a in zip(value, args))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


# ---------------------------------------------------------------------------------------------------
# The deepspeed section: the DeepSpeed 0.19 engine settings the trainer passes through, each with its check
# (names and ranges from deepspeed/runtime/config.py, zero/config.py, precision_config.py)
# ---------------------------------------------------------------------------------------------------

_BOOL = (lambda v: isinstance(v, bool), "must be true or false")
_COUNT = (lambda v: is_finite(v) and v > 0 and (isinstance(v, int) or v.is_integer()), "must be a whole number > 0")
_INT_GE0 = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "must be an integer >= 0")
_POSITIVE = (lambda v: is_finite(v) and v > 0, "must be a finite number > 0")
_OBJECT = (lambda v: isinstance(v, dict), "must be an object")

_DS_ZERO = {
    "stage": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v in (0, 1, 2),
              "must be 0, 1 or 2 (ZeRO-3 partitions the parameters, which the EMA reads whole)"),
    "overlap_comm": _BOOL, "contiguous_gradients": _BOOL, "reduce_scatter": _BOOL, "allgather_partitions": _BOOL,
    "round_robin_gradients": _BOOL, "use_multi_rank_bucket_allreduce": _BOOL, "load_from_fp32_weights": _BOOL,
    "elastic_checkpoint": _BOOL, "ignore_unused_parameters": _BOOL,
    "reduce_bucket_size": _COUNT, "allgather_bucket_size": _COUNT,
}
_DS_BF16 = {"enabled": _BOOL, "immediate_grad_update": _BOOL, "check_grad_overflow": _BOOL,
            "bf16_master_weights_and_grads": _BOOL, "bf16_optimizer_states": _BOOL}
_DS_FP16 = {"enabled": _BOOL, "auto_cast": _BOOL, "consecutive_hysteresis": _BOOL,
            "fp16_master_weights_and_grads": _BOOL,
            "loss_scale": (lambda v: is_finite(v) and v >= 0, "must be a finite number >= 0 (0: dynamic scaling)"),
            "initial_scale_power": _INT_GE0, "loss_scale_window": _COUNT, "hysteresis": _COUNT,
            "min_loss_scale": _POSITIVE}
_DS_TOP = {
    "zero_optimization": _OBJECT, "bf16": _OBJECT, "fp16": _OBJECT, "steps_per_print": _COUNT,
    "wall_clock_breakdown": _BOOL, "memory_breakdown": _BOOL, "prescale_gradients": _BOOL,
    "gradient_predivide_factor": _POSITIVE, "disable_allgather": _BOOL, "dump_state": _BOOL,
    "communication_data_type": (lambda v: isinstance(v, str) and v.lower() in ("fp16", "bf16", "fp32"),
                                "must be fp16, bf16 or fp32"),
}
_DS_SUBSECTIONS = {"zero_optimization": _DS_ZERO, "bf16": _DS_BF16, "fp16": _DS_FP16}
# Keys DeepSpeed knows that this trainer owns or cannot run, with the reason (STYLE B7).
_BATCH = "is set by the trainer (from schedule.global_batch_size; DeepSpeed asserts train = micro * accum * world)"
_DS_REJECTED = {
    "train_batch_size": _BATCH, "train_micro_batch_size_per_gpu": _BATCH, "gradient_accumulation_steps": _BATCH,
    "optimizer": "is set by the trainer (torch AdamW built from optim_sit / optim_vae / optim_disc)",
    "scheduler": "is set by the trainer (a constant learning rate, optim_*.lr)",
    "gradient_clipping": "is set by the trainer (per engine, from optim_*.grad_clip)",
    "zero_allow_untested_optimizer": "is set by the trainer (its AdamW is a torch optimizer)",
    "torch_autocast": "is set by the trainer (schedule.precision picks the autocast dtype)",
    "bfloat16": "is DeepSpeed's old name: write bf16",
}
_ZERO3 = "is a ZeRO-3 setting (zero_optimization.stage must be 0, 1 or 2 here)"
_DS_ZERO_REJECTED = {
    "offload_optimizer": "needs DeepSpeed's CPU Adam (ZeRO-Offload); the trainer builds torch AdamW",
    "cpu_offload": "needs DeepSpeed's CPU Adam (ZeRO-Offload); the trainer builds torch AdamW",
    **{k: _ZERO3 for k in ("offload_param", "sub_group_size", "prefetch_bucket_size", "param_persistence_threshold",
                           "model_persistence_threshold", "max_live_parameters", "max_reuse_distance",
                           "gather_16bit_weights_on_model_save", "zero_hpz_partition_size", "zero_quantized_weights",
                           "zero_quantized_gradients", "stage3_prefetch_bucket_size",
                           "stage3_param_persistence_threshold", "stage3_max_live_parameters",
                           "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save")},
}


def _check_ds_table(key: str, node: dict, table: dict, rejected: dict[str, str]) -> None:
    for k, v in node.items():
        sub = f"{key}.{k}"
        known_key(sub, k, list(table), rejected, remove="remove it",
                  unknown="is not a DeepSpeed setting this trainer accepts", listing=f"accepted in {key}")
        if isinstance(v, str) and v.strip().lower() == "auto":
            raise ConfigKeyError(sub, "='auto': only the HF Trainer / Accelerate integrations fill that in, DeepSpeed "
                                      "itself does not: give the value, or leave the key out for DeepSpeed's default")
        ok, rule = table[k]
        require(sub, v, ok(v), rule)


def check_deepspeed(ds: dict) -> None:
    """Every key of the deepspeed section is an accepted engine setting with a valid value (one line naming it)."""
    _check_ds_table("deepspeed", ds, _DS_TOP, _DS_REJECTED)
    for name, table in _DS_SUBSECTIONS.items():
        if name in ds:
            _check_ds_table(f"deepspeed.{name}", ds[name], table,
                            _DS_ZERO_REJECTED if name == "zero_optimization" else {})
