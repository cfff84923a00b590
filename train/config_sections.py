"""The sections of the run configuration (train/config.py): typed fields with docstrings, each checked in
`__post_init__` with one line naming the key. Defaults are REPA-E's (docs/METHOD.md#the-papers-recipe).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from repae.model.attention import ATTN_BACKENDS
from repae.model.losses import VAELossConfig
from repae.model.sit import PATH_TYPES, SiT_models, SiTConfig
from repae.model.vae import VAE_CONFIGS, VAEConfig, vae_config

from .config_rules import (
    ConfigKeyError,
    check_overrides,
    choice,
    int_at_least,
    interval,
    is_finite,
    nonnegative,
    optional_path,
    positive,
    require,
)

PRECISIONS = ("bf16", "fp16", "fp32")
WEIGHTINGS = ("uniform", "lognormal")
DATA_SOURCES = ("auto", "dali", "folder", "h5", "demo", "synthetic")
SAMPLERS = ("ode", "sde")
STAGE_ENGINES = {"repae": ("sit", "vae", "disc"), "ldm": ("sit",)}
"""stage -> the models it trains, each in its own engine with its optimizer section optim_<name>: REPA-E trains
the SiT, the VAE and the discriminator end to end; the LDM-only stage the SiT alone, on a frozen VAE's latents."""
ENCODER_PATCH_GRID = 16
"""Image pixels per DINOv2 token side (224 px in, 14-px patches, per 256 px): the SiT grid must match it."""


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
        choice("name", self.name, SiT_models)
        for key in ("encoder_depth", "projector_dim", "num_classes"):
            int_at_least(key, getattr(self, key), 1)
        # PARITY: REPA-E accepts 0; here the step always passes a label-drop mask, which needs the null class
        # (a SiT with class_dropout_prob=0 has none and stops at the first step), and so do the CFG previews.
        interval("class_dropout_prob", self.class_dropout_prob, 0, 1, lo_open=True, hi_open=True,
                  why=" (the label-drop mask and the CFG previews need the null class)")
        interval("bn_momentum", self.bn_momentum, 0, 1, lo_open=True,
                  why=" (running = (1 - m) * running + m * batch: m < 0 or m > 1 extrapolates)")
        choice("path_type", self.path_type, PATH_TYPES)
        choice("attn_backend", self.attn_backend, ATTN_BACKENDS)
        derived = {"input_size": "data.resolution / the VAE factor", "in_channels": "the VAE (vae.name / "
                   "vae.overrides.embed_dim)", "z_dims": "encoder.enc_type", "kernel_backend": "kernel_backend"}
        own = {f.name: f"sit.{f.name}" for f in dataclasses.fields(self) if f.name not in ("name", "overrides")}
        check_overrides(SiTConfig, self.overrides, {k: f"is set by {v}" for k, v in {**derived, **own}.items()})
        depth = self.overrides.get("depth", SiT_models[self.name]["depth"])
        require("encoder_depth", self.encoder_depth, self.encoder_depth <= depth,
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
        choice("name", self.name, VAE_CONFIGS)
        check_overrides(VAEConfig, self.overrides, {"in_channels": "is fixed by the data (RGB images, 3 channels)"})
        try:
            vae_config(self.name, **self.overrides)  # the VAEConfig checks (ch_mult, GroupNorm widths, ...)
        except ValueError as err:
            raise ConfigKeyError("overrides", f": {err}") from None
        for key in ("weights", "latents_stats", "discriminator_weights"):
            optional_path(key, getattr(self, key))


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
    feature_cache: str | None = None
    """A feature cache folder (`python -m repae.train.feature_cache`): the step reads its targets there instead
    of running the encoders; checked against the encoders (still built and loaded for that check, then dropped),
    the config and the dataset at start (train/feature_cache.py)."""

    def __post_init__(self):
        from repae.model.encoders import parse_enc_type  # PERF: here, not at the top: it imports timm (~2 s)

        try:
            parse_enc_type(self.enc_type)
        except (ValueError, NotImplementedError) as err:
            raise ConfigKeyError("enc_type", f": {err}") from None
        optional_path("weights", self.weights)
        optional_path("weights_dir", self.weights_dir)
        optional_path("feature_cache", self.feature_cache)


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
        nonnegative("proj_coeff", self.proj_coeff)
        nonnegative("vae_align_proj_coeff", self.vae_align_proj_coeff)
        optional_path("lpips_weights", self.lpips_weights)


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
        positive("lr", self.lr)
        require("betas", self.betas, len(self.betas) == 2 and all(is_finite(b) and 0 <= b < 1 for b in self.betas),
                 "must be two numbers in [0, 1) (Adam's moment decays; 1 never forgets the first gradient)")
        positive("eps", self.eps)
        nonnegative("weight_decay", self.weight_decay)
        require("grad_clip", self.grad_clip, is_finite(self.grad_clip) and self.grad_clip >= 0,
                 "must be a finite number >= 0 (the max global L2 norm; 0 disables clipping)")


@dataclass(frozen=True, kw_only=True)
class DataSection:
    """Training images: uint8 RGB crops and int64 labels."""

    source: str = "auto"
    """Where the images come from (train/sources.py; the choice and its reason are logged once):
    auto: dali when a GPU and NVIDIA DALI are present, h5 when `root` is an .h5 file, else folder;
    dali: a class-folder tree (or `file_list`) decoded on the GPU by DALI (the `dali` extra);
    folder: a class-folder tree (or `file_list`) decoded by PIL in worker processes (the exact reference crop);
    h5: the `images.h5` the original's preprocessing writes (or `python -m repae.train.dataset_tool prepare`);
    demo: the real photographs shipped in train/assets/demo_photos (copied into the run directory);
    synthetic: a small generated set written into the run directory (tests)."""
    root: str | None = None
    """The class-folder tree (folder, dali) or the images.h5 file (h5)."""
    file_list: str | None = None
    """A list of `relpath<TAB>label` lines under `root` (what `dataset_tool check` writes as its clean list);
    null: the clean list beside the tree when one exists, else the tree scanned as it is."""
    resolution: int = 256
    """Crop side in pixels."""
    num_workers: int = 4
    """Decoding workers per rank (folder, h5), reader threads (dali)."""
    prefetch: int = 2
    """Batches decoded ahead per rank (DALI's prefetch queue depth; the folder and h5 loaders' prefetch factor)."""
    max_bad_images: int = 100
    """Unreadable image files (truncated, corrupt, empty, not an image) one rank may skip, each replaced by the
    next readable file in sorted order and logged once with its name; one more stops the run (0: stop at the first)."""
    latent_cache: str | None = None
    """A latent cache folder (`python -m repae.train.latent_cache`): the VAE posterior (mean, std) of every image,
    which the LDM-only run samples from instead of running the VAE; checked against the VAE, its latent
    statistics, the config and the dataset at start (train/latent_cache.py)."""

    def __post_init__(self):
        choice("source", self.source, DATA_SOURCES)
        optional_path("root", self.root)
        optional_path("file_list", self.file_list)
        optional_path("latent_cache", self.latent_cache)
        int_at_least("resolution", self.resolution, 1)
        require("resolution", self.resolution, self.resolution % ENCODER_PATCH_GRID == 0,
                 f"must be a multiple of {ENCODER_PATCH_GRID} (DINOv2 sees 224 * resolution / 256 px in 14-px patches)")
        int_at_least("num_workers", self.num_workers, 0)
        int_at_least("prefetch", self.prefetch, 1)
        int_at_least("max_bad_images", self.max_bad_images, 0)


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
        int_at_least("max_steps", self.max_steps, 1)
        int_at_least("global_batch_size", self.global_batch_size, 1)
        require("seed", self.seed, isinstance(self.seed, int) and 0 <= self.seed < 2**32,
                 "must be an integer in [0, 2**32) (numpy seeds the demo set with it)")
        interval("ema_decay", self.ema_decay, 0, 1, why=" (ema = decay * ema + (1 - decay) * param, every step)")
        choice("precision", self.precision, PRECISIONS)
        choice("weighting", self.weighting, WEIGHTINGS)


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
        require("run_dir", self.run_dir, isinstance(self.run_dir, str) and self.run_dir.strip() != "",
                 "must be a non-empty path (checkpoints, logs and samples go there)")
        for key in ("log_every", "ckpt_every", "keep_last", "nan_patience", "num_samples", "sample_steps"):
            int_at_least(key, getattr(self, key), 1)
        int_at_least("sample_every", self.sample_every, 0)
        require("cfg_scale", self.cfg_scale, is_finite(self.cfg_scale) and self.cfg_scale >= 1,
                 "must be a finite number >= 1 (1: no guidance; the sampler treats anything below 1 as 1)")


@dataclass(frozen=True, kw_only=True)
class EvalSection:
    """Online FID while training (train/online_eval.py): off unless fid_every > 0."""

    fid_every: int = 0
    """Steps between online FIDs (0: never). Each one samples num_samples images with the EMA model, shared over
    the ranks, and logs eval/fid and eval/seconds (tensorboard, log.jsonl); the training itself is unchanged."""
    num_samples: int = 10_000
    """Samples per evaluation, the same set each time (class-balanced labels and per-sample noise from seed). An
    FID of 10k samples reads higher than the 50k-sample FID papers report: compare runs with each other."""
    sampler: str = "ode"
    """ode (Euler, Heun with heun=true) or sde (Euler-Maruyama), as train/generate.py --mode."""
    heun: bool = False
    """Heun's second-order ODE steps (ode only)."""
    steps: int = 50
    """Sampler steps. Default Euler ODE 50 without guidance: 50 SiT forwards a sample, about 8x fewer than the
    paper's SDE 250 with CFG on [0, 0.65] (~410): a check that finishes in minutes, whose trend is what counts."""
    cfg_scale: float = 1.0
    """Classifier-free guidance (1: none, one forward per step; > 1 doubles the batch inside the interval)."""
    guidance_low: float = 0.0
    """Guidance interval: CFG applies for t in [guidance_low, guidance_high]."""
    guidance_high: float = 1.0
    """Upper end of the guidance interval."""
    seed: int = 0
    """Seed of the labels and the noise (train/generate.py's rule: sample i's noise depends on (seed, i) only)."""
    batch_size: int = 32
    """Samples per chunk on one rank (one generation batch, one Inception batch), on top of the training's memory."""
    ref: str | None = None
    """An ADM reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz): its stored mu, sigma when present, else
    the statistics of its images arr_0 (their Inception features cached beside it, or in run_dir/eval)."""
    inception_weights: str | None = None
    """The FID Inception file; None: weights-inception-2015-12-05-6726825d.pth looked up in $REPAE_WEIGHTS_DIR and
    the torch hub cache (as `python -m repae.train.evaluate`). Checked when the run starts."""
    inception_allow_random: bool = False
    """Use a randomly initialised Inception (tests only: eval/fid is then a number without meaning)."""

    def __post_init__(self):
        int_at_least("fid_every", self.fid_every, 0)
        int_at_least("num_samples", self.num_samples, 2)  # a covariance needs two samples
        choice("sampler", self.sampler, SAMPLERS)
        require("heun", self.heun, not self.heun or self.sampler == "ode", "is an ODE option (eval.sampler=ode)")
        int_at_least("steps", self.steps, 1)
        require("cfg_scale", self.cfg_scale, is_finite(self.cfg_scale) and self.cfg_scale >= 1,
                 "must be a finite number >= 1 (1: no guidance)")
        interval("guidance_low", self.guidance_low, 0, 1)
        interval("guidance_high", self.guidance_high, 0, 1)
        require("guidance_high", self.guidance_high, self.guidance_high >= self.guidance_low,
                 f"must be >= eval.guidance_low={self.guidance_low}")
        int_at_least("seed", self.seed, 0)
        int_at_least("batch_size", self.batch_size, 1)
        optional_path("ref", self.ref)
        optional_path("inception_weights", self.inception_weights)
        if self.fid_every > 0 and self.ref is None:
            raise ConfigKeyError("ref", f" is not set: eval.fid_every={self.fid_every} needs an ADM reference batch "
                                        f".npz (mu, sigma or images arr_0)")
