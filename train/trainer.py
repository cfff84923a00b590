"""The REPA-E trainer: models, three DeepSpeed engines, data, random draws, checkpoints, logging.

    trainer = Trainer(cfg)        # after deepspeed.init_distributed (main.py does it)
    trainer.fit()                 # resumes from run_dir/checkpoints/latest when it exists

One engine per trained model (SiT, VAE, discriminator), each with its own AdamW and, in DeepSpeed's
fp16 mode, its own loss scaler. The run does not depend on the world size: every random draw of a
step (t, flow noise, label-drop mask, posterior noise) is drawn for the GLOBAL batch from one seeded
generator and each rank takes its slice; the data source shards global batches the same way; the
latent BN statistics are all-reduced (SyncBN). A checkpoint holds the engines (weights, optimizers,
scalers), the EMA, the generator and RNG states of every rank, the data position and the step; it
is written into a temporary folder and only then renamed and pointed to by `latest`.
This file holds no step math (train/step.py) and no config parsing (train/config.py).
"""

# B batch, C latent channels, h latent side

from __future__ import annotations

import json
import math
import os
import time
import warnings

import torch
import torch.distributed as dist

from repae.kernels import allreduce_stats_hook
from repae.model.discriminator import build_discriminator
from repae.model.encoders import DINOv2Encoder, parse_enc_type
from repae.model.flops import count_flops, peak_bf16_tflops
from repae.model.losses import LeCamEMA
from repae.model.lpips import LPIPS
from repae.model.sit import SiT, sit_config
from repae.model.vae import VAEConfig, build_vae, latents_stats_path, load_latents_stats, load_vae_weights, vae_config

from . import checkpoint as ckpt
from .config import TrainConfig, check_paths
from .ema import EMA
from .preemption import StopRequest, describe
from .step import PlainEngine, StepInputs, StepModels, StepSettings, train_step
from .sync_bn import sync_batchnorm_

ENGINES = ("sit", "vae", "disc")


def estimate_flops_per_image(cfg: TrainConfig) -> float:
    """Training FLOPs per image of the SiT and the VAE (matmuls, convs, attention; counted on the meta
    device): SiT pass 3x forward, align pass ~2x forward of the blocks up to the projector, VAE 3x forward.
    DINOv2, LPIPS and the discriminator are left out, so the MFU built on it is a lower bound."""
    from dataclasses import replace

    cfg = replace(cfg, kernel_backend="eager")  # the Triton kernels do not run on meta tensors
    with torch.device("meta"):
        sit, vae = build_sit_from_config(cfg), build_vae(build_vae_config(cfg))
        c, R = sit.config, cfg.data.resolution
        z = torch.zeros(1, c.in_channels, c.input_size, c.input_size)
        sit_f = count_flops(lambda: sit(z, torch.zeros(1, dtype=torch.long), torch.zeros(1), z,
                                        use_batch_stats=False))
        vae_f = count_flops(lambda: vae(torch.zeros(1, 3, R, R), sample_posterior=False))
    return 3 * sit_f + 2 * sit_f * c.encoder_depth / c.depth + 3 * vae_f


def json_line(row: dict) -> str:
    """Strict JSON (RFC 8259 has no NaN/Infinity): a non-finite float is written as null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean, allow_nan=False)


def truncate_log(path: str, step: int) -> None:
    """Drop the rows of log.jsonl after `step` (and a line cut short by a kill), atomically."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(json_line(row) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class RunStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite losses); the message names the model and step."""


def log0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[repae] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------


def build_sit_from_config(cfg: TrainConfig) -> SiT:
    s, latent = cfg.sit, build_vae_config(cfg)
    z_dims = tuple(spec.embed_dim for spec in parse_enc_type(cfg.encoder.enc_type))
    fields = dict(input_size=cfg.data.resolution // latent.factor, in_channels=latent.embed_dim,
                  encoder_depth=s.encoder_depth, projector_dim=s.projector_dim, class_dropout_prob=s.class_dropout_prob,
                  num_classes=s.num_classes, bn_momentum=s.bn_momentum, qk_norm=s.qk_norm, path_type=s.path_type,
                  attn_backend=s.attn_backend, z_dims=z_dims, kernel_backend=cfg.kernel_backend)
    fields.update(s.overrides)
    return SiT(sit_config(s.name, **fields))


def build_vae_config(cfg: TrainConfig) -> VAEConfig:
    try:
        return vae_config(cfg.vae.name, **cfg.vae.overrides)
    except ValueError as err:
        raise ValueError(f"config key vae.name / vae.overrides: {err}") from err


def build_encoders(cfg: TrainConfig) -> list[DINOv2Encoder]:
    """The frozen encoders; with encoder.allow_random, a missing weight file gives a random one (said loudly)."""
    encoders = []
    for spec in parse_enc_type(cfg.encoder.enc_type):
        try:
            enc = DINOv2Encoder(spec.enc_type, cfg.data.resolution, weights=cfg.encoder.weights,
                                weights_dir=cfg.encoder.weights_dir)
        except FileNotFoundError as err:
            if not cfg.encoder.allow_random:
                raise
            log0(f"NOTE: {err} encoder.allow_random is set: using a RANDOMLY INITIALISED {spec.enc_type} (demo only)")
            enc = DINOv2Encoder(spec.enc_type, cfg.data.resolution, pretrained=False)
        encoders.append(enc)
    return encoders


def build_lpips(cfg: TrainConfig) -> LPIPS:
    try:
        return LPIPS(cfg.loss.vae.lpips_double_rescale, vgg_weights=cfg.loss.lpips_weights)
    except FileNotFoundError as err:
        if not cfg.loss.lpips_allow_random:
            raise
        log0(f"NOTE: {err} loss.lpips_allow_random is set: LPIPS uses a RANDOM VGG16 trunk (demo only)")
        return LPIPS(cfg.loss.vae.lpips_double_rescale, pretrained=False)


def ds_config(cfg: TrainConfig, world_size: int, grad_clip: float) -> dict:
    """The shared DeepSpeed section plus what the trainer owns: batch sizes, clipping."""
    G = cfg.schedule.global_batch_size
    return {**json.loads(json.dumps(cfg.deepspeed)), "train_batch_size": G,
            "train_micro_batch_size_per_gpu": G // world_size,
            "gradient_accumulation_steps": 1, "gradient_clipping": grad_clip, "zero_allow_untested_optimizer": True,
            "steps_per_print": cfg.deepspeed.get("steps_per_print", 10**9)}


def make_optimizer(params, optim, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"  # PERF: fused AdamW on GPU (same update up to rounding); foreach on CPU
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                             fused=fused or None)


# ---------------------------------------------------------------------------------------------------
# Random draws of a step: global batch from one generator, each rank takes its slice
# ---------------------------------------------------------------------------------------------------


class StepRandom:
    """t, flow noise, label-drop mask and posterior noise for the global batch (world-size independent)."""

    def __init__(self, seed: int, global_batch: int, latent_shape: tuple[int, int, int], drop_prob: float,
                 weighting: str, path_type: str):
        self.gen = torch.Generator().manual_seed(seed + 0x5EED)
        self.G, self.latent_shape, self.drop_prob = global_batch, latent_shape, drop_prob
        self.weighting, self.path_type = weighting, path_type

    def draw(self, rank: int, world_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        G, g = self.G, self.gen
        if self.weighting == "uniform":
            t = torch.rand(G, generator=g)
        else:  # lognormal: s = exp(randn); linear t = s / (1 + s), cosine (2/pi) atan(s)
            s = torch.randn(G, generator=g).exp()
            t = s / (1 + s) if self.path_type == "linear" else 2 / math.pi * torch.atan(s)
        noise = torch.randn((G, *self.latent_shape), generator=g)
        drop = torch.rand(G, generator=g) < self.drop_prob
        post = torch.randn((G, *self.latent_shape), generator=g)
        b = G // world_size
        sl = slice(rank * b, (rank + 1) * b)
        return {k: v[sl].to(device) for k, v in (("t", t), ("noise", noise), ("drop_mask", drop),
                                                   ("posterior_noise", post))}

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, d: dict) -> None:
        self.gen.set_state(d["gen"])


# ---------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------


class Trainer:
    """Builds everything from a TrainConfig; `fit()` trains to schedule.max_steps (resuming if possible)."""

    def __init__(self, cfg: TrainConfig, *, use_deepspeed: bool = True):
        check_paths(cfg)
        self.cfg = cfg
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if cfg.schedule.global_batch_size % self.world:
            raise ValueError(f"schedule.global_batch_size={cfg.schedule.global_batch_size} is not divisible by the "
                             f"world size {self.world}")
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.run_dir = cfg.logging.run_dir
        self.ckpt_root = os.path.join(self.run_dir, ckpt.CKPT_DIR)
        if self.rank == 0:  # before anything is written: a partial checkpoint may be what filled the disk
            for name in ckpt.remove_stale_temps(self.ckpt_root):
                log0(f"removed {os.path.join(self.ckpt_root, name)}, left by an interrupted checkpoint write")
        self.step = 0
        self.nan_counts = {k: 0 for k in ENGINES}
        self.nan_total = {k: 0 for k in ENGINES}
        self.history: dict[str, list] = {}
        self._stop = StopRequest(self.rank)  # SIGTERM/SIGINT and the launcher watch, installed by fit()
        self.stopped_by: str | None = None
        """Why fit() stopped before schedule.max_steps (e.g. 'SIGTERM'), after its checkpoint; None otherwise."""
        self._flops_per_image = estimate_flops_per_image(cfg) if torch.cuda.is_available() else None

        # The original turns TF32 on for matmuls and cuDNN (its fp32 parts: LPIPS, VAE/GAN losses, discriminator).
        torch.backends.cuda.matmul.allow_tf32 = cfg.schedule.tf32
        torch.backends.cudnn.allow_tf32 = cfg.schedule.tf32
        torch.manual_seed(cfg.schedule.seed)  # identical initial weights on every rank
        encoders = [e.to(self.device) for e in build_encoders(cfg)]
        sit = build_sit_from_config(cfg)
        vae = build_vae(build_vae_config(cfg))
        if cfg.vae.weights is not None:
            load_vae_weights(vae, cfg.vae.weights)
            stats = cfg.vae.latents_stats or latents_stats_path(cfg.vae.weights)
            if os.path.exists(stats):
                bias, scale = load_latents_stats(stats)
                sit.init_bn(latents_scale=scale, latents_bias=bias)
            else:
                log0(f"NOTE: no latents-stats file {stats}: the latent BN starts at mean 0, var 1")
        disc = build_discriminator(cfg.vae.discriminator_weights)
        if cfg.loss.sync_discriminator_bn and self.world > 1:
            sync_batchnorm_(disc)
        sit, vae, disc = sit.to(self.device), vae.to(self.device), disc.to(self.device)
        # PARITY: the original builds pos_embed frozen but its requires_grad(model, True) before each SiT update
        # trains it (gradient, clip norm, AdamW, EMA). Under DDP it then never all-reduces that gradient (frozen
        # when DDP was built), so its ranks drift apart; here it is reduced like every other gradient.
        sit.pos_embed.requires_grad_(not cfg.sit.freeze_pos_embed)
        if self.world > 1:
            sit.bn.stats_hook = allreduce_stats_hook()
        self.ema = EMA(sit)  # after the BN statistics are set (the original copies at step 0, decay 0)
        lpips = build_lpips(cfg).to(self.device)

        engines = {}
        for name, module, optim in (("sit", sit, cfg.optim_sit), ("vae", vae, cfg.optim_vae),
                                    ("disc", disc, cfg.optim_disc)):
            params = [p for p in module.parameters() if p.requires_grad]
            opt = make_optimizer(params, optim, self.device)
            if use_deepspeed:
                import deepspeed

                engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt,
                                                       config=ds_config(cfg, self.world, optim.grad_clip))
            else:
                engine = PlainEngine(module, opt, optim.grad_clip)
            engines[name] = engine
        self.engines = engines
        for engine in engines.values():
            engine.module.train()
        # DeepSpeed's bf16/fp16 modes cast the module; the latent BN statistics must stay fp32 (kernel contract).
        sit.bn.float()
        # The LeCam EMAs exist only while the term is on (the original registers its buffers only then).
        lecam = (LeCamEMA(cfg.loss.vae.lecam_ema_decay).to(self.device) if cfg.loss.vae.lecam_regularization_weight > 0
                 else None)
        self.models = StepModels(sit=engines["sit"], vae=engines["vae"], disc=engines["disc"], lpips=lpips,
                                 encoders=encoders, ema=self.ema, lecam=lecam)
        self.settings = StepSettings(vae_loss=cfg.loss.vae, proj_coeff=cfg.loss.proj_coeff,
                                     vae_align_proj_coeff=cfg.loss.vae_align_proj_coeff,
                                     ema_decay=cfg.schedule.ema_decay, precision=cfg.schedule.precision,
                                     kernel_backend=cfg.kernel_backend)
        latent = (sit.in_channels, sit.config.input_size, sit.config.input_size)
        self.random = StepRandom(cfg.schedule.seed, cfg.schedule.global_batch_size, latent,
                                 cfg.sit.class_dropout_prob, cfg.schedule.weighting, cfg.sit.path_type)
        self._data = None  # built on first use (tests that pass their own inputs never read images)
        self.sample_noise = torch.randn((cfg.logging.num_samples, *latent), generator=torch.Generator().manual_seed(
            cfg.schedule.seed + 1))
        self.sample_labels = torch.arange(cfg.logging.num_samples) % cfg.sit.num_classes

    @property
    def data(self):
        if self._data is None:
            self._data = self._data_source()
        return self._data

    def _data_source(self):
        from .data import ImageFolderSource, write_demo_dataset

        cfg = self.cfg
        root = cfg.data.root
        if cfg.data.source == "demo":
            root = os.path.join(self.run_dir, "demo_data")
            if self.rank == 0 and not os.path.isdir(root):
                write_demo_dataset(root, num_images=max(64, 2 * cfg.schedule.global_batch_size),
                                   num_classes=min(4, cfg.sit.num_classes), resolution=cfg.data.resolution,
                                   seed=cfg.schedule.seed)
            if dist.is_initialized():
                dist.barrier()
        source = ImageFolderSource(root, cfg.data.resolution, global_batch_size=cfg.schedule.global_batch_size,
                                   rank=self.rank, world_size=self.world, seed=cfg.schedule.seed,
                                   num_workers=cfg.data.num_workers, max_bad_images=cfg.data.max_bad_images)
        source.check_labels(cfg.sit.num_classes)  # before any step: label num_classes would be the null class
        return source

    # -----------------------------------------------------------------------------------------------
    # One step with this rank's data and draws
    # -----------------------------------------------------------------------------------------------

    def next_inputs(self) -> StepInputs:
        images, labels = self.data.next_batch()
        draws = self.random.draw(self.rank, self.world, self.device)
        return StepInputs(images=images.to(self.device), labels=labels.to(self.device), **draws)

    def run_step(self, inputs: StepInputs | None = None, mark=None) -> dict[str, torch.Tensor]:
        inputs = inputs if inputs is not None else self.next_inputs()
        logs = train_step(self.models, inputs, self.settings, step=self.step, mark=mark)
        self.step += 1
        for name in ENGINES:
            if float(logs[f"{name}/skipped"]):
                self.nan_counts[name] += 1
                self.nan_total[name] += 1
                log0(f"non-finite {name} loss at step {self.step}: update skipped "
                     f"({self.nan_counts[name]} in a row, {self.nan_total[name]} in total)")
                if self.nan_counts[name] >= self.cfg.logging.nan_patience:
                    raise RunStopped(f"{self.nan_counts[name]} consecutive non-finite {name} losses up to step "
                                     f"{self.step}: stopping (logging.nan_patience={self.cfg.logging.nan_patience})")
            else:
                self.nan_counts[name] = 0
        return logs

    # -----------------------------------------------------------------------------------------------
    # Checkpoints
    # -----------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> str:
        """Write checkpoints/step<step> atomically, then prune (train/checkpoint.py: layout, full disk, pruning)."""
        state = None
        if self.rank == 0:
            finite = ckpt.all_finite([e.module for e in self.engines.values()] + [self.ema.module])
            state = {"step": self.step, "ema": self.ema.state_dict(), "random": self.random.state_dict(),
                     "data": self.data.state_dict(), "nan_counts": self.nan_counts, "nan_total": self.nan_total,
                     "history": self.history, "config": self.cfg.to_dict(), "world_size": self.world,
                     "finite": finite}
        path = ckpt.save(self.ckpt_root, self.step, self.engines, state, rank=self.rank,
                         keep_last=self.cfg.logging.keep_last, device=self.device, log=log0)
        log0(f"checkpoint {path}" + ("" if state is None or state["finite"] else " (holds NON-FINITE values)"))
        return path

    def latest_checkpoint(self) -> str | None:
        """The checkpoint to resume: what `latest` names once validated, else the newest complete older one (a line
        says what was broken); None when there is none. CheckpointError (one line) when none is usable."""
        kinds = ckpt.engine_kinds(self.engines)
        info = ckpt.on_rank0(lambda: ckpt.select(self.ckpt_root, kinds), self.device)
        if info is None:
            return None
        for line in info.notes:
            log0(line)
        return info.path

    def load_checkpoint(self, path: str) -> None:
        """Restore everything `save_checkpoint` wrote; the run continues as if it had never stopped. The folder is
        validated first; a config change is refused (model, engine layout, ZeRO 1/2 world size) or applied
        (optimizer settings), see train/checkpoint.py."""
        kinds = ckpt.engine_kinds(self.engines)
        info = ckpt.on_rank0(lambda: ckpt.validate(path, kinds), self.device)
        for line in ckpt.check_resume(info, self.cfg.to_dict(), self.world):
            log0(f"config change on resume: {line}")
        ckpt.load_engines(path, self.engines, self.device)
        sections = {k: getattr(self.cfg, f"optim_{k}") for k in self.engines}
        for line in ckpt.apply_optimizer_settings(self.engines, sections, info.config):
            log0(f"config change on resume: {line}")
        self.models.sit.module.bn.float()
        state, rng = ckpt.load_state(path, self.rank)
        self.step = state["step"]
        self.ema.load_state_dict(state["ema"])
        self.random.load_state_dict(state["random"])
        self.data.load_state_dict(state["data"])
        self.nan_counts, self.nan_total, self.history = state["nan_counts"], state["nan_total"], state["history"]
        if rng is not None:  # None: a rank the writing run did not have (another world size at ZeRO stage 0)
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        log0(f"resumed from {path} at step {self.step}")

    # -----------------------------------------------------------------------------------------------
    # Previews
    # -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def save_samples(self) -> str | None:
        """EMA samples (Euler ODE, CFG) decoded with the EMA BN statistics, as a PNG grid (rank 0)."""
        if self.rank != 0 or self.cfg.logging.sample_every <= 0:
            return None
        from repae.model.samplers import euler_sampler

        from .visual import save_image_grid

        ema = self.ema.module
        x = self.sample_noise.to(self.device)
        y = self.sample_labels.to(self.device)
        latents = euler_sampler(ema.inference, x, y, num_steps=self.cfg.logging.sample_steps,
                                cfg_scale=self.cfg.logging.cfg_scale, null_class=self.cfg.sit.num_classes)
        images = self.models.vae.module.decode(ema.bn.denormalize(latents.float()))
        path = os.path.join(self.run_dir, "samples", f"step{self.step:07d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_image_grid(images.float().cpu(), path)
        return path

    # -----------------------------------------------------------------------------------------------
    # The loop
    # -----------------------------------------------------------------------------------------------

    def _install_signal_handlers(self):
        """SIGTERM/SIGINT (and the launcher exiting) stop the run after the current step; train/preemption.py."""
        self._stop.install()

    def _should_stop(self) -> str | None:
        """Why every rank stops after this step ('SIGTERM', 'SIGINT', 'the launcher exiting'), else None. The
        ranks' stop codes are all-reduced (MAX) so that all stop at the same step for the same reason: one tiny
        all-reduce per step when W > 1."""
        code = self._stop.poll()
        if dist.is_initialized() and self.world > 1:
            t = torch.tensor([float(code)], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            code = int(t.item())
        return describe(code) if code else None

    def _log(self, sums: dict[str, torch.Tensor], count: int, t0: float, writer, bar) -> None:
        keys = sorted(sums)
        vec = torch.stack([sums[k] for k in keys]).float().to(self.device) / max(count, 1)
        if dist.is_initialized():
            dist.all_reduce(vec)
            vec /= self.world
        values = dict(zip(keys, vec.tolist()))
        values["log/window_steps"] = count  # the first window after a (re)start may be shorter than log_every
        elapsed = time.time() - t0
        values["perf/img_per_s"] = count * self.cfg.schedule.global_batch_size / max(elapsed, 1e-9)
        if self._flops_per_image is not None:
            tflops = self._flops_per_image * values["perf/img_per_s"] / self.world / 1e12
            values["perf/tflops_per_gpu_est"] = tflops
            peak = peak_bf16_tflops(torch.cuda.get_device_name())
            if peak is not None:
                values["perf/mfu_est"] = tflops / peak
        for name, engine in self.engines.items():
            norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
            if norm is not None:
                values[f"{name}/grad_norm"] = float(norm)
            scaler = getattr(getattr(engine, "optimizer", None), "cur_scale", None)
            if scaler is not None:
                values[f"{name}/loss_scale"] = float(scaler)
        bn = self.models.sit.module.bn
        values["bn/running_mean_avg"] = float(bn.running_mean.mean())
        values["bn/running_var_avg"] = float(bn.running_var.mean())
        for k in ENGINES:
            values[f"{k}/nonfinite_total"] = self.nan_total[k]
        if self._data is not None:  # distinct unreadable files rank 0 has skipped (each logged once by its rank)
            values["data/bad_images"] = self._data.num_bad_images
        if self.rank != 0:
            return
        from .visual import save_loss_plot

        for k, v in values.items():
            self.history.setdefault(k, []).append((self.step, v))
            if writer is not None:
                writer.add_scalar(k, v, self.step)
        if bar is not None:
            bar.set_postfix({"img/s": f"{values['perf/img_per_s']:.1f}", "sit": f"{values['sit/loss']:.4f}",
                             "vae": f"{values['vae/loss']:.4f}", "d": f"{values['disc/discriminator_loss']:.3f}"})
        save_loss_plot({k: v for k, v in self.history.items() if k.endswith("loss")},
                       os.path.join(self.run_dir, "losses.png"))
        with open(os.path.join(self.run_dir, "log.jsonl"), "a") as f:
            f.write(json_line({"step": self.step, **values}) + "\n")

    def fit(self, *, resume: bool = True) -> None:
        cfg = self.cfg
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=2)
        resumed = False
        if resume and (path := self.latest_checkpoint()) is not None:
            self.load_checkpoint(path)
            resumed = True
            if self.rank == 0:  # the steps after the checkpoint are trained (and logged) again
                truncate_log(os.path.join(self.run_dir, "log.jsonl"), self.step)
        self._install_signal_handlers()
        writer = None
        if self.rank == 0 and cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: tensorboard drops the events of the steps after the checkpoint when resuming
                writer = SummaryWriter(os.path.join(self.run_dir, "tb"), purge_step=self.step + 1 if resumed else None)
            except ImportError:
                warnings.warn("tensorboard is not installed: no tensorboard logs (pip install tensorboard)",
                              stacklevel=1)
        bar = None
        if self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=cfg.schedule.max_steps, initial=self.step, desc="repae", unit="step", dynamic_ncols=True)
        sums: dict[str, torch.Tensor] = {}
        count, t0 = 0, time.time()
        try:
            while self.step < cfg.schedule.max_steps:
                logs = self.run_step()
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0) + v.detach().float().to(self.device)  # no host sync
                count += 1
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.logging.log_every == 0 or self.step == cfg.schedule.max_steps:
                    self._log(sums, count, t0, writer, bar)
                    sums, count, t0 = {}, 0, time.time()
                if cfg.logging.sample_every > 0 and (self.step % cfg.logging.sample_every == 0 or self.step == 1):
                    self.save_samples()
                if self.step % cfg.logging.ckpt_every == 0 or self.step == cfg.schedule.max_steps:
                    self.save_checkpoint()
                if (reason := self._should_stop()) is not None:
                    if self.step < cfg.schedule.max_steps:  # at max_steps the run is complete (and saved above)
                        if self.step % cfg.logging.ckpt_every:
                            self.save_checkpoint()
                        self.stopped_by = reason
                        log0(f"stopped by {reason} at step {self.step}; resume with the same command")
                    break
        finally:
            if self.stopped_by is None:  # after a stop they stay: a repeat while the process exits is absorbed
                self._stop.uninstall()
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
