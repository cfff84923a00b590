"""The run configuration: one typed tree, one JSON file per run, dotted overrides from the command line.

    cfg = load_config("configs/sitxl_repae.json", ["loss.proj_coeff=0.5", "schedule.max_steps=1000"])
    cfg.sit.name, cfg.loss.vae_align_proj_coeff, cfg.deepspeed["zero_optimization"]["stage"]

A config file holds one object per section below plus `deepspeed` (engine settings only: ZeRO stage,
bf16/fp16, communication; no batch keys, no optimizer, no scheduler: the trainer injects the batch
sizes and builds AdamW itself). Unknown keys, wrong types and bad values are ValueErrors that name the
key (`sit.hiden_size`); paths are checked by `check_paths` when the run starts. Defaults are REPA-E's
(spec §8). This file holds no training logic.
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
from repae.model.sit import SiT_models, SiTConfig, sit_config
from repae.model.vae import VAE_CONFIGS, VAEConfig, vae_config

PRECISIONS = ("bf16", "fp16", "fp32")
WEIGHTINGS = ("uniform", "lognormal")
PATH_TYPES = ("linear", "cosine")
DATA_SOURCES = ("folder", "demo")
KERNEL_BACKENDS = ("auto", "triton", "eager")
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


def _did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


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

    def __post_init__(self):
        _choice("sit.path_type", self.path_type, PATH_TYPES)


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


@dataclass(frozen=True, kw_only=True)
class LossSection:
    """Loss weights (spec §1.3, §4.1) and the LPIPS / discriminator options."""

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


@dataclass(frozen=True, kw_only=True)
class OptimSection:
    """AdamW for one model (spec §8: all three the same)."""

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
        _positive("optim.lr", self.lr)


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
        _choice("data.source", self.source, DATA_SOURCES)
        _positive("data.resolution", self.resolution)
        if self.max_bad_images < 0:
            raise ValueError(f"config key data.max_bad_images={self.max_bad_images!r} must be >= 0")


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
        _choice("schedule.precision", self.precision, PRECISIONS)
        _choice("schedule.weighting", self.weighting, WEIGHTINGS)
        _positive("schedule.max_steps", self.max_steps)
        _positive("schedule.global_batch_size", self.global_batch_size)


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
        for key in ("log_every", "ckpt_every", "keep_last", "nan_patience"):
            _positive(f"logging.{key}", getattr(self, key))


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
        bad = [k for k in _DS_FORBIDDEN if k in self.deepspeed]
        if bad:
            raise ValueError(f"config key deepspeed.{bad[0]} is set by the trainer (batch sizes from "
                             f"schedule.global_batch_size, AdamW and clipping from optim_*): remove it")
        fp16_engine = bool(self.deepspeed.get("fp16", {}).get("enabled", False))
        if self.schedule.precision == "fp16" and not fp16_engine:
            raise ValueError("config key schedule.precision=fp16 needs loss scaling: set deepspeed.fp16.enabled=true "
                             "(DeepSpeed's fp16 mode: fp32 master weights, one dynamic loss scaler per engine), or "
                             "use bf16")
        stage = self.deepspeed.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2):
            raise ValueError(f"config key deepspeed.zero_optimization.stage={stage!r} must be 0, 1 or 2")

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
        raise ValueError(f"unknown config key {prefix}{unknown[0]} (known in {prefix.rstrip('.') or 'the root'}: "
                         f"{', '.join(names)})")
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
    return cls(**kwargs)


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
