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
import json
import os
import typing
from dataclasses import dataclass, field

from repae.model.sit import BACKENDS as KERNEL_BACKENDS  # repae.kernels.BACKENDS (train/ reaches kernels via model/)
from repae.model.sit import SiT_models, SiTConfig, sit_config
from repae.model.vae import VAEConfig, latents_stats_path, vae_config

from .config_rules import ConfigKeyError, check_deepspeed, choice, did_you_mean, type_ok
from .config_sections import (
    ENCODER_PATCH_GRID,
    STAGE_ENGINES,
    DataSection,
    EncoderSection,
    EvalSection,
    LoggingSection,
    LossSection,
    OptimSection,
    ScheduleSection,
    SiTSection,
    VAESection,
)


@dataclass(frozen=True)
class ModelConfigs:
    """What TrainConfig.model_configs derives: the configs the SiT and the VAE are built from."""

    sit: SiTConfig
    vae: VAEConfig


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A whole run."""

    stage: str = "repae"
    """repae: the SiT, VAE and discriminator trained end to end (docs/METHOD.md#the-training-step); ldm: the
    LDM-only stage, the SiT alone on the latents of a frozen VAE (docs/METHOD.md#the-ldm-only-stage): no
    discriminator, LPIPS or VAE optimizer, the latent BN fixed to the VAE's statistics (vae.latents_stats)."""
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
    eval: EvalSection = field(default_factory=EvalSection)
    kernel_backend: str = "auto"
    """repae.kernels backend: auto, triton or eager."""
    deepspeed: dict = field(default_factory=lambda: {"zero_optimization": {"stage": 2}})
    """DeepSpeed engine settings shared by the three engines (ZeRO stage, bf16/fp16 modes, comms)."""

    def __post_init__(self):
        choice("stage", self.stage, STAGE_ENGINES)
        if self.stage != "ldm" and self.data.latent_cache is not None:
            raise ConfigKeyError("data.latent_cache", f" is read by the LDM-only stage only (stage=ldm, here "
                                                      f"stage={self.stage})")
        choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        check_deepspeed(self.deepspeed)
        fp16_engine = self.deepspeed.get("fp16", {}).get("enabled", False)
        if fp16_engine and self.deepspeed.get("bf16", {}).get("enabled", False):
            raise ConfigKeyError("deepspeed.fp16.enabled", "=True and deepspeed.bf16.enabled=True: enable one of them")
        if self.schedule.precision == "fp16" and not fp16_engine:
            raise ValueError("config key schedule.precision=fp16 needs loss scaling: set deepspeed.fp16.enabled=true "
                             "(DeepSpeed's fp16 mode: fp32 master weights, one dynamic loss scaler per engine), or "
                             "use bf16")
        self._check_model_shapes()

    def _check_model_shapes(self) -> None:
        """The cross-section shape rules the builders rely on, checked here so a bad combination is one line at
        load time: the SiT token grid must match the encoder's, and the SiTConfig must build."""
        vae = vae_config(self.vae.name, **self.vae.overrides)  # valid: VAESection checked it
        patch = self.sit.overrides.get("patch_size", SiT_models[self.sit.name]["patch_size"])
        if vae.factor * patch != ENCODER_PATCH_GRID:
            key = "sit.overrides.patch_size" if "patch_size" in self.sit.overrides else "sit.name"
            raise ConfigKeyError(key, f": patch {patch} on the {vae.factor}x latents of vae.name={self.vae.name!r} "
                                      f"gives a grid of resolution / {vae.factor * patch} tokens a side, the encoder "
                                      f"(DINOv2) resolution / {ENCODER_PATCH_GRID}: the REPA loss needs them equal")
        self.model_configs()

    def model_configs(self) -> ModelConfigs:
        """The SiT and VAE configs of the run, the one place that derives them: the latent grid and channels follow
        the VAE and data.resolution, the projector widths follow the encoders; sit.overrides win."""
        from repae.model.encoders import parse_enc_type  # PERF: here, not at the top: it imports timm (~2 s)

        try:
            vae = vae_config(self.vae.name, **self.vae.overrides)
        except ValueError as err:
            raise ConfigKeyError("vae.name / vae.overrides", f": {err}") from None
        s = self.sit
        z_dims = tuple(spec.embed_dim for spec in parse_enc_type(self.encoder.enc_type))
        try:
            sit = sit_config(s.name, **{**dict(
                input_size=self.data.resolution // vae.factor, in_channels=vae.embed_dim,
                encoder_depth=s.encoder_depth, projector_dim=s.projector_dim, class_dropout_prob=s.class_dropout_prob,
                num_classes=s.num_classes, bn_momentum=s.bn_momentum, qk_norm=s.qk_norm, path_type=s.path_type,
                attn_backend=s.attn_backend, z_dims=z_dims, kernel_backend=self.kernel_backend), **s.overrides})
        except ValueError as err:
            raise ConfigKeyError("sit.name / sit.overrides", f": {err}") from None
        return ModelConfigs(sit=sit, vae=vae)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# Loading: JSON -> typed tree, with key and type checks
# ---------------------------------------------------------------------------------------------------


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ValueError(f"config key {prefix.rstrip('.') or '<root>'} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]}{did_you_mean(unknown[0], names)} (known in "
                         f"{prefix.rstrip('.') or 'the root'}: {', '.join(names)})")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
            continue
        if not type_ok(value, tp):
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
    reads_root = cfg.data.source not in ("demo", "synthetic")
    paths = [("data.root", cfg.data.root if reads_root else None), ("data.file_list", cfg.data.file_list),
             ("data.latent_cache", cfg.data.latent_cache),
             ("vae.weights", cfg.vae.weights), ("vae.latents_stats", cfg.vae.latents_stats),
             ("vae.discriminator_weights", cfg.vae.discriminator_weights), ("encoder.weights", cfg.encoder.weights),
             ("encoder.weights_dir", cfg.encoder.weights_dir), ("encoder.feature_cache", cfg.encoder.feature_cache),
             ("loss.lpips_weights", cfg.loss.lpips_weights)]
    if cfg.eval.fid_every > 0:  # read by the online FID only (train/online_eval.py checks their contents)
        paths += [("eval.ref", cfg.eval.ref), ("eval.inception_weights", cfg.eval.inception_weights)]
    if reads_root and cfg.data.root is None:
        raise ValueError(f"config key data.root must be set for data.source={cfg.data.source} (an image folder with "
                         f"class sub-folders, or an images.h5 file)")
    for key, p in paths:
        if p is not None and not os.path.exists(p):
            raise FileNotFoundError(f"config key {key}: {p} does not exist")
    if cfg.vae.weights is None and not cfg.vae.allow_random:
        why = "the LDM-only stage runs a frozen VAE" if cfg.stage == "ldm" else "REPA-E starts from a pretrained VAE"
        raise ValueError(f"config key vae.weights is not set: {why} (set it, or set vae.allow_random=true for a demo)")
    stats = cfg.vae.latents_stats or (latents_stats_path(cfg.vae.weights) if cfg.vae.weights else None)
    if cfg.stage == "ldm" and stats is not None and not os.path.exists(stats):
        raise FileNotFoundError(f"config key vae.latents_stats: {stats} does not exist; stage=ldm fixes the latent BN "
                                f"to the VAE's statistics (set vae.latents_stats; python -m repae.train.export writes "
                                f"e2e-vae-latents-stats.pt beside e2e-vae.pt)")
