"""The run configuration: one typed tree, one JSON file per run, dotted overrides from the command line.

    cfg = load_config("configs/sitxl_repae.json", ["loss.proj_coeff=0.5", "schedule.max_steps=1000"])
    cfg.sit.name, cfg.loss.vae_align_proj_coeff, cfg.deepspeed["zero_optimization"]["stage"]

A config file holds one object per section below plus `deepspeed` (engine settings only: ZeRO stage,
bf16/fp16, communication; no batch keys, no optimizer, no scheduler: the trainer injects the batch
sizes and builds AdamW itself). Unknown keys, wrong types and bad values are ValueErrors that name the
key (`sit.hiden_size`), one line each, at load time: every number has a range (NaN and +-inf never
pass), `deepspeed` keys are checked against the settings the trainer passes through (with a "did you
mean" for a misspelling), and the model shapes the sections combine into must build. Paths are checked
by `check_paths` when the run starts. Defaults are REPA-E's
(docs/METHOD.md#the-papers-recipe). This file holds no training logic.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field

from repae.model.attention import ATTN_BACKENDS
from repae.model.losses import VAELossConfig
from repae.model.sit import BACKENDS as KERNEL_BACKENDS  # repae.kernels.BACKENDS (train/ reaches kernels via model/)
from repae.model.sit import PATH_TYPES, SiT_models, SiTConfig, sit_config
from repae.model.vae import VAE_CONFIGS, VAEConfig, vae_config

PRECISIONS = ("bf16", "fp16", "fp32")
WEIGHTINGS = ("uniform", "lognormal")
DATA_SOURCES = ("folder", "demo")
ENCODER_PATCH_GRID = 16
"""Image pixels per DINOv2 token side (224 px in, 14-px patches, per 256 px): the SiT grid must match it."""


# ---------------------------------------------------------------------------------------------------
# Value checks: each raises one line naming the key
# ---------------------------------------------------------------------------------------------------


class ConfigKeyError(ValueError):
    """One bad config value, one line: `config key <key><detail>`. A section raises it with the key relative
    to itself (`betas`); _build re-raises it under the dotted path from the root (`optim_sit.betas`)."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"config key {key}{detail}")
        self.key, self.detail = key, detail

    def under(self, prefix: str) -> ConfigKeyError:
        return ConfigKeyError(prefix + self.key, self.detail)


def _require(key: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise ConfigKeyError(key, f"={value!r} {rule}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    """NaN and +-inf are not (JSON's NaN / Infinity parse to floats); an int always is (math.isfinite would
    overflow on a huge one)."""
    return _is_number(value) and (isinstance(value, int) or math.isfinite(value))


def _choice(key: str, value, choices) -> None:
    _require(key, value, value in choices, f"must be one of {tuple(choices)}")


def _positive(key: str, value) -> None:
    _require(key, value, _is_finite(value) and value > 0, "must be a finite number > 0")


def _nonnegative(key: str, value) -> None:
    _require(key, value, _is_finite(value) and value >= 0, "must be a finite number >= 0")


def _interval(key: str, value, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False,
              why: str = "") -> None:
    ok = _is_finite(value) and (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    span = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    _require(key, value, ok, f"must be in {span}{why}")


def _path(key: str, value) -> None:
    """An optional path: None, or a non-empty string."""
    _require(key, value, value is None or (isinstance(value, str) and value.strip() != ""),
             "must be a non-empty path (or null)")


def _int_at_least(key: str, value, lo: int) -> None:
    _require(key, value, isinstance(value, int) and not isinstance(value, bool) and value >= lo,
             f"must be an integer >= {lo}")


def _did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_overrides(owner: type, overrides: dict, reserved: dict[str, str]) -> None:
    """`overrides` holds fields of the model dataclass `owner` (SiTConfig, VAEConfig): known, not set
    elsewhere (`reserved`: field -> where it comes from), of the field's type, finite when numbers."""
    hints = typing.get_type_hints(owner)
    allowed = [k for k in hints if k not in reserved]
    for k, v in overrides.items():
        key = f"overrides.{k}"
        if k in reserved:
            raise ConfigKeyError(key, f" {reserved[k]}: remove it from overrides")
        if k not in hints:
            raise ConfigKeyError(key, f" is not a {owner.__name__} field{_did_you_mean(k, allowed)} "
                                      f"(allowed: {', '.join(allowed)})")
        _require(key, v, _type_ok(v, hints[k]), f"has the wrong type (expected {hints[k]})")
        _require(key, v, all(_is_finite(x) for x in (v if isinstance(v, list) else [v]) if _is_number(x)),
                 "must be finite")


@dataclass(frozen=True, kw_only=True)
class SiTSection:
    """The diffusion transformer (model/sit.py)."""

    name: str = "SiT-XL/2"
    """Registry name: SiT-{S,B,L,XL}/{1,2,4,8}."""
    overrides: dict = field(default_factory=dict)
    """Further SiTConfig fields (depth, hidden_size, num_heads, ...) for non-registry sizes (tiny configs)."""
    encoder_depth: int = 8
    """Block (1-indexed) whose output the projector aligns to the encoder features."""
    projector_dim: int = 2048
    """Projector MLP width."""
    class_dropout_prob: float = 0.1
    """Label dropout of the SiT pass (REPA-E --cfg-prob)."""
    num_classes: int = 1000
    """Class count (labels 0..num_classes-1; the null class is num_classes)."""
    bn_momentum: float = 0.1
    """Latent BatchNorm momentum."""
    qk_norm: bool = False
    """LayerNorm on q, k (off in REPA-E)."""
    path_type: str = "linear"
    """Interpolant: linear or cosine."""
    attn_backend: str = "auto"
    """Attention backend (model/attention.py)."""
    freeze_pos_embed: bool = False
    """Keep the sin-cos positional embedding fixed. False (default) trains it, as the original does: its loop's
    requires_grad(model, True) re-enables the frozen parameter before every SiT update (docs/METHOD.md)."""

    def __post_init__(self):
        _choice("name", self.name, SiT_models)
        for key in ("encoder_depth", "projector_dim", "num_classes"):
            _int_at_least(key, getattr(self, key), 1)
        # PARITY: REPA-E accepts 0; here the step always passes a label-drop mask, which needs the null class
        # (a SiT with class_dropout_prob=0 has none and stops at the first step), and so do the CFG previews.
        _interval("class_dropout_prob", self.class_dropout_prob, 0, 1, lo_open=True, hi_open=True,
                  why=" (the label-drop mask and the CFG previews need the null class)")
        _interval("bn_momentum", self.bn_momentum, 0, 1, lo_open=True,
                  why=" (running = (1 - m) * running + m * batch: m < 0 or m > 1 extrapolates)")
        _choice("path_type", self.path_type, PATH_TYPES)
        _choice("attn_backend", self.attn_backend, ATTN_BACKENDS)
        derived = {"input_size": "data.resolution / the VAE factor", "in_channels": "the VAE (vae.name / "
                   "vae.overrides.embed_dim)", "z_dims": "encoder.enc_type", "kernel_backend": "kernel_backend"}
        own = {f.name: f"sit.{f.name}" for f in dataclasses.fields(self) if f.name not in ("name", "overrides")}
        _check_overrides(SiTConfig, self.overrides, {k: f"is set by {v}" for k, v in {**derived, **own}.items()})
        depth = self.overrides.get("depth", SiT_models[self.name]["depth"])
        _require("encoder_depth", self.encoder_depth, self.encoder_depth <= depth,
                 f"must be <= the SiT depth {depth} (sit.name / sit.overrides.depth)")


@dataclass(frozen=True, kw_only=True)
class VAESection:
    """The VAE being trained end to end, and the discriminator's starting weights."""

    name: str = "f8d4"
    """f8d4 (SD-VAE) or f16d32 (IN-VAE / VA-VAE)."""
    overrides: dict = field(default_factory=dict)
    """Further VAEConfig fields (ch, ch_mult, ...) for tiny configs."""
    weights: str | None = None
    """Starting VAE weights (LDM or diffusers .pt/.safetensors). None: random init (needs allow_random)."""
    latents_stats: str | None = None
    """`-latents-stats.pt` that initialises the latent BN; None: next to `weights` (its -latents-stats twin)."""
    discriminator_weights: str | None = None
    """Starting PatchGAN weights (REPA-E's `*-discriminator-ckpt.pt`); None: the taming init."""
    allow_random: bool = False
    """Allow starting from a random VAE (tiny/demo configs; the paper starts from a pretrained VAE)."""

    def __post_init__(self):
        _choice("name", self.name, VAE_CONFIGS)
        _check_overrides(VAEConfig, self.overrides, {"in_channels": "is fixed by the data (RGB images, 3 channels)"})
        try:
            vae_config(self.name, **self.overrides)  # the VAEConfig checks (ch_mult, GroupNorm widths, ...)
        except ValueError as err:
            raise ConfigKeyError("overrides", f": {err}") from None
        for key in ("weights", "latents_stats", "discriminator_weights"):
            _path(key, getattr(self, key))


@dataclass(frozen=True, kw_only=True)
class EncoderSection:
    """The frozen representation encoder(s) of the REPA loss."""

    enc_type: str = "dinov2-vit-b"
    """REPA-E enc_type, comma-separated for several."""
    weights: str | None = None
    """Weight file; None: looked up by name in weights_dir, $REPAE_WEIGHTS_DIR, the torch hub cache."""
    weights_dir: str | None = None
    """Folder to look in first."""
    allow_random: bool = False
    """When no weight file is found, use a randomly initialised encoder (tiny/demo configs only)."""

    def __post_init__(self):
        from repae.model.encoders import parse_enc_type  # PERF: here, not at the top: it imports timm (~2 s)

        try:
            parse_enc_type(self.enc_type)
        except (ValueError, NotImplementedError) as err:
            raise ConfigKeyError("enc_type", f": {err}") from None
        _path("weights", self.weights)
        _path("weights_dir", self.weights_dir)


@dataclass(frozen=True, kw_only=True)
class LossSection:
    """Loss weights (docs/METHOD.md#loss-weights-and-optimizers) and the LPIPS / discriminator options."""

    proj_coeff: float = 0.5
    """REPA loss weight in the SiT loss."""
    vae_align_proj_coeff: float = 1.5
    """Alignment loss weight in the VAE loss (the end-to-end signal)."""
    vae: VAELossConfig = field(default_factory=VAELossConfig)
    """The VAE generator / discriminator loss weights and lpips_double_rescale (model/losses.py)."""
    lpips_weights: str | None = None
    """VGG16 trunk file (torchvision vgg16-397923af.pth); None: looked up by name."""
    lpips_allow_random: bool = False
    """When the VGG16 file is not found, use a random trunk (tiny/demo configs only)."""
    sync_discriminator_bn: bool = False
    """All-reduce the discriminator's BatchNorm statistics across ranks (REPA-E: off, per-GPU BN)."""

    def __post_init__(self):
        _nonnegative("proj_coeff", self.proj_coeff)
        _nonnegative("vae_align_proj_coeff", self.vae_align_proj_coeff)
        _path("lpips_weights", self.lpips_weights)


@dataclass(frozen=True, kw_only=True)
class OptimSection:
    """AdamW for one model (docs/METHOD.md#loss-weights-and-optimizers: all three the same)."""

    lr: float = 1e-4
    """Constant learning rate (no warmup, no schedule)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam eps."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    grad_clip: float = 1.0
    """Global L2 gradient clipping per model (0 disables)."""

    def __post_init__(self):
        _positive("lr", self.lr)
        _require("betas", self.betas, len(self.betas) == 2 and all(_is_finite(b) and 0 <= b < 1 for b in self.betas),
                 "must be two numbers in [0, 1) (Adam's moment decays; 1 never forgets the first gradient)")
        _positive("eps", self.eps)
        _nonnegative("weight_decay", self.weight_decay)
        _require("grad_clip", self.grad_clip, _is_finite(self.grad_clip) and self.grad_clip >= 0,
                 "must be a finite number >= 0 (the max global L2 norm; 0 disables clipping)")


@dataclass(frozen=True, kw_only=True)
class DataSection:
    """Training images: uint8 RGB crops and int64 labels."""

    source: str = "folder"
    """folder: class folders under `root`; demo: a small synthetic set written into the run directory."""
    root: str | None = None
    """Image folder (class sub-folders) for source=folder."""
    resolution: int = 256
    """Crop side in pixels."""
    num_workers: int = 4
    """Decoding workers per rank."""
    max_bad_images: int = 100
    """Unreadable image files (truncated, corrupt, empty, not an image) one rank may skip, each replaced by the
    next readable file in sorted order and logged once with its name; one more stops the run (0: stop at the first)."""

    def __post_init__(self):
        _choice("source", self.source, DATA_SOURCES)
        _path("root", self.root)
        _int_at_least("resolution", self.resolution, 1)
        _require("resolution", self.resolution, self.resolution % ENCODER_PATCH_GRID == 0,
                 f"must be a multiple of {ENCODER_PATCH_GRID} (DINOv2 sees 224 * resolution / 256 px in 14-px patches)")
        _int_at_least("num_workers", self.num_workers, 0)
        _int_at_least("max_bad_images", self.max_bad_images, 0)


@dataclass(frozen=True, kw_only=True)
class ScheduleSection:
    """Steps, batch, seed, EMA, precision, timestep sampling."""

    max_steps: int = 400_000
    """Optimizer steps of the run."""
    global_batch_size: int = 256
    """Images per step across all ranks (per-rank batch = global / world size)."""
    seed: int = 0
    """Seed of weights, data order, t, noise and label dropout (the run does not depend on the world size)."""
    ema_decay: float = 0.9999
    """EMA decay per step (parameters and latent-BN buffers)."""
    precision: str = "bf16"
    """Autocast dtype of the forward passes (parameters, BN, losses stay fp32): bf16, fp16 or fp32."""
    weighting: str = "uniform"
    """Timestep sampling: uniform t ~ U[0, 1), or lognormal (logit-normal)."""
    tf32: bool = True
    """TF32 for fp32 matmuls and convolutions (CUDA only): on in the original (its fp32 parts: LPIPS, the VAE
    and GAN losses, the discriminator). False keeps them IEEE fp32."""

    def __post_init__(self):
        _int_at_least("max_steps", self.max_steps, 1)
        _int_at_least("global_batch_size", self.global_batch_size, 1)
        _require("seed", self.seed, isinstance(self.seed, int) and 0 <= self.seed < 2**32,
                 "must be an integer in [0, 2**32) (numpy seeds the demo set with it)")
        _interval("ema_decay", self.ema_decay, 0, 1, why=" (ema = decay * ema + (1 - decay) * param, every step)")
        _choice("precision", self.precision, PRECISIONS)
        _choice("weighting", self.weighting, WEIGHTINGS)


@dataclass(frozen=True, kw_only=True)
class LoggingSection:
    """Run directory, cadences, previews, failure handling."""

    run_dir: str = "exps/repae"
    """Checkpoints, tensorboard logs, sample grids, the resolved config."""
    log_every: int = 100
    """Steps between progress/tensorboard updates (one all-reduce each)."""
    ckpt_every: int = 50_000
    """Steps between checkpoints."""
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted after a complete write)."""
    sample_every: int = 10_000
    """Steps between EMA sample grids (0: never)."""
    num_samples: int = 16
    """Images in a sample grid."""
    sample_steps: int = 50
    """Euler ODE steps of the preview sampler."""
    cfg_scale: float = 4.0
    """Classifier-free guidance of the previews."""
    tensorboard: bool = True
    """Write tensorboard scalars (skipped with a warning when tensorboard is not installed)."""
    nan_patience: int = 10
    """Consecutive non-finite losses of one model that stop the run."""

    def __post_init__(self):
        _require("run_dir", self.run_dir, isinstance(self.run_dir, str) and self.run_dir.strip() != "",
                 "must be a non-empty path (checkpoints, logs and samples go there)")
        for key in ("log_every", "ckpt_every", "keep_last", "nan_patience", "num_samples", "sample_steps"):
            _int_at_least(key, getattr(self, key), 1)
        _int_at_least("sample_every", self.sample_every, 0)
        _require("cfg_scale", self.cfg_scale, _is_finite(self.cfg_scale) and self.cfg_scale >= 1,
                 "must be a finite number >= 1 (1: no guidance; the sampler treats anything below 1 as 1)")


# ---------------------------------------------------------------------------------------------------
# The deepspeed section: the DeepSpeed 0.19 engine settings the trainer passes through, each with its check
# (names and ranges from deepspeed/runtime/config.py, zero/config.py, precision_config.py)
# ---------------------------------------------------------------------------------------------------

_BOOL = (lambda v: isinstance(v, bool), "must be true or false")
_COUNT = (lambda v: _is_finite(v) and v > 0 and (isinstance(v, int) or v.is_integer()), "must be a whole number > 0")
_INT_GE0 = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "must be an integer >= 0")
_POSITIVE = (lambda v: _is_finite(v) and v > 0, "must be a finite number > 0")
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
            "loss_scale": (lambda v: _is_finite(v) and v >= 0, "must be a finite number >= 0 (0: dynamic scaling)"),
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
        if k in rejected:
            raise ConfigKeyError(sub, f" {rejected[k]}: remove it")
        if k not in table:
            raise ConfigKeyError(sub, f" is not a DeepSpeed setting this trainer accepts{_did_you_mean(k, table)} "
                                      f"(accepted in {key}: {', '.join(table)})")
        if isinstance(v, str) and v.strip().lower() == "auto":
            raise ConfigKeyError(sub, "='auto': only the HF Trainer / Accelerate integrations fill that in, DeepSpeed "
                                      "itself does not: give the value, or leave the key out for DeepSpeed's default")
        ok, rule = table[k]
        _require(sub, v, ok(v), rule)


def _check_deepspeed(ds: dict) -> None:
    """Every key of the deepspeed section is an accepted engine setting with a valid value (one line naming it)."""
    _check_ds_table("deepspeed", ds, _DS_TOP, _DS_REJECTED)
    for name, table in _DS_SUBSECTIONS.items():
        if name in ds:
            _check_ds_table(f"deepspeed.{name}", ds[name], table,
                            _DS_ZERO_REJECTED if name == "zero_optimization" else {})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A whole run."""

    sit: SiTSection = field(default_factory=SiTSection)
    vae: VAESection = field(default_factory=VAESection)
    encoder: EncoderSection = field(default_factory=EncoderSection)
    loss: LossSection = field(default_factory=LossSection)
    optim_sit: OptimSection = field(default_factory=OptimSection)
    optim_vae: OptimSection = field(default_factory=OptimSection)
    optim_disc: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    kernel_backend: str = "auto"
    """repae.kernels backend: auto, triton or eager."""
    deepspeed: dict = field(default_factory=lambda: {"zero_optimization": {"stage": 2}})
    """DeepSpeed engine settings shared by the three engines (ZeRO stage, bf16/fp16 modes, comms)."""

    def __post_init__(self):
        _choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        _check_deepspeed(self.deepspeed)
        fp16_engine = self.deepspeed.get("fp16", {}).get("enabled", False)
        if fp16_engine and self.deepspeed.get("bf16", {}).get("enabled", False):
            raise ConfigKeyError("deepspeed.fp16.enabled", "=True and deepspeed.bf16.enabled=True: enable one of them")
        if self.schedule.precision == "fp16" and not fp16_engine:
            raise ValueError("config key schedule.precision=fp16 needs loss scaling: set deepspeed.fp16.enabled=true "
                             "(DeepSpeed's fp16 mode: fp32 master weights, one dynamic loss scaler per engine), or "
                             "use bf16")
        self._check_model_shapes()

    def _check_model_shapes(self) -> None:
        """The cross-section shape rules the trainer's builders rely on, checked here so a bad combination is one
        line at load time: the SiT token grid must match the encoder's, and the SiTConfig must build."""
        from repae.model.encoders import parse_enc_type

        vae = vae_config(self.vae.name, **self.vae.overrides)  # valid: VAESection checked it
        patch = self.sit.overrides.get("patch_size", SiT_models[self.sit.name]["patch_size"])
        if vae.factor * patch != ENCODER_PATCH_GRID:
            key = "sit.overrides.patch_size" if "patch_size" in self.sit.overrides else "sit.name"
            raise ConfigKeyError(key, f": patch {patch} on the {vae.factor}x latents of vae.name={self.vae.name!r} "
                                      f"gives a grid of resolution / {vae.factor * patch} tokens a side, the encoder "
                                      f"(DINOv2) resolution / {ENCODER_PATCH_GRID}: the REPA loss needs them equal")
        z_dims = tuple(spec.embed_dim for spec in parse_enc_type(self.encoder.enc_type))
        s = self.sit
        try:  # the fields of the trainer's build_sit_from_config
            sit_config(s.name, input_size=self.data.resolution // vae.factor, in_channels=vae.embed_dim,
                       encoder_depth=s.encoder_depth, projector_dim=s.projector_dim,
                       class_dropout_prob=s.class_dropout_prob, num_classes=s.num_classes, bn_momentum=s.bn_momentum,
                       qk_norm=s.qk_norm, path_type=s.path_type, attn_backend=s.attn_backend, z_dims=z_dims,
                       kernel_backend=self.kernel_backend, **s.overrides)
        except ValueError as err:
            raise ConfigKeyError("sit.name / sit.overrides", f": {err}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# Loading: JSON -> typed tree, with key and type checks
# ---------------------------------------------------------------------------------------------------


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]
            return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(
            _type_ok(v, a) for v, a in zip(value, args))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ValueError(f"config key {prefix.rstrip('.') or '<root>'} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]}{_did_you_mean(unknown[0], names)} (known in "
                         f"{prefix.rstrip('.') or 'the root'}: {', '.join(names)})")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
            continue
        if not _type_ok(value, tp):
            raise ValueError(f"config key {prefix}{key}={value!r} has the wrong type (expected {tp})")
        if typing.get_origin(tp) is tuple:
            value = tuple(value)
        if tp is float:
            value = float(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigKeyError as err:  # a section names its own field: prefix the path to the section
        raise err.under(prefix) from None
    except ValueError as err:  # a model-side dataclass (VAELossConfig) says `VAELossConfig.kl_weight ...`
        text, head = str(err), f"{cls.__name__}."
        if text.startswith(head):
            raise ValueError(f"config key {prefix}{text[len(head):]}") from None
        raise


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string (a path, a name)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `section.key=value` (value as JSON, else a string) to the raw dict, in place."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} must look like section.key=value")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {assignment!r}: {p} is not a section")
    node[parts[-1]] = _parse_value(text)


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """TrainConfig from a raw dict plus dotted overrides (ValueError naming any bad key)."""
    data = json.loads(json.dumps(data))  # a deep copy that only holds JSON types
    for a in overrides:
        apply_override(data, a)
    return _build(TrainConfig, data, "")


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a run JSON (FileNotFoundError / ValueError naming the file) and apply overrides."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from err
    return config_from_dict(data, overrides)


def check_paths(cfg: TrainConfig) -> None:
    """Every path the run will read must exist: FileNotFoundError naming the config key and the path."""
    paths = [("data.root", cfg.data.root if cfg.data.source == "folder" else None), ("vae.weights", cfg.vae.weights),
             ("vae.latents_stats", cfg.vae.latents_stats), ("vae.discriminator_weights", cfg.vae.discriminator_weights),
             ("encoder.weights", cfg.encoder.weights), ("encoder.weights_dir", cfg.encoder.weights_dir),
             ("loss.lpips_weights", cfg.loss.lpips_weights)]
    if cfg.data.source == "folder" and cfg.data.root is None:
        raise ValueError("config key data.root must be set for data.source=folder (an image folder with class "
                         "sub-folders)")
    for key, p in paths:
        if p is not None and not os.path.exists(p):
            raise FileNotFoundError(f"config key {key}: {p} does not exist")
    if cfg.vae.weights is None and not cfg.vae.allow_random:
        raise ValueError("config key vae.weights is not set: REPA-E starts from a pretrained VAE (set it, or set "
                         "vae.allow_random=true for a demo)")
