"""The REPA-E trainer: the loop that ties the step to its data, draws, checkpoints and reports; the same loop
runs the LDM-only stage (config stage=ldm: the SiT alone on a frozen VAE's latents, train/step.py ldm_step).

    trainer = Trainer(cfg)        # after deepspeed.init_distributed (main.py does it)
    trainer.fit()                 # resumes from run_dir/checkpoints/latest when it exists

Where things are: the models and engines are built by train/build.py (one engine per trained model, each with
its own AdamW and, in DeepSpeed's fp16 mode, its own loss scaler; train/engine.py), the step's random draws by
train/draws.py (global batch from one generator, this rank's slice: the run does not depend on the world size),
checkpoints by train/checkpoint.py (a checkpoint holds the engines, the EMA, the draw generator and every rank's
RNG state, the data position and the step, written atomically), reports by train/metrics.py, stop requests by
train/preemption.py. This file holds the NaN policy, the order of things in a step and what a checkpoint holds.
"""

from __future__ import annotations

import json
import os

import torch

from . import checkpoint as ckpt
from .build import build, flops_per_image
from .config import TrainConfig, check_paths
from .config_sections import STAGE_ENGINES
from .distributed import all_max, log0, on_rank0, rank, world_size
from .draws import StepRandom
from .feature_cache import FeatureCache
from .latent_cache import LatentCache
from .metrics import Metrics, engine_values
from .online_eval import OnlineFID
from .preemption import StopRequest, describe
from .resume import apply_optimizer_settings, check_resume
from .step import STEPS, StepInputs, StepSettings


class RunStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite losses); the message names the model and step."""


class Trainer:
    """Builds everything from a TrainConfig; `fit()` trains to schedule.max_steps (resuming if possible)."""

    def __init__(self, cfg: TrainConfig, *, use_deepspeed: bool = True):
        check_paths(cfg)
        self.cfg = cfg
        self.rank, self.world = rank(), world_size()
        if cfg.schedule.global_batch_size % self.world:
            raise ValueError(f"schedule.global_batch_size={cfg.schedule.global_batch_size} is not divisible by the "
                             f"world size {self.world}")
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.online_fid = OnlineFID.for_run(cfg, rank=self.rank, world=self.world, device=self.device)
        """eval.fid_every > 0: its reference and Inception files are checked here, before anything is built."""
        self.run_dir = cfg.logging.run_dir
        self.ckpt_root = os.path.join(self.run_dir, ckpt.CKPT_DIR)
        if self.rank == 0:  # before anything is written: a partial checkpoint may be what filled the disk
            for name in ckpt.remove_stale_temps(self.ckpt_root):
                log0(f"removed {os.path.join(self.ckpt_root, name)}, left by an interrupted checkpoint write")
        self.step = 0
        self.engine_names = STAGE_ENGINES[cfg.stage]
        self.nan_counts = {k: 0 for k in self.engine_names}
        self.nan_total = {k: 0 for k in self.engine_names}
        self.history: dict[str, list] = {}
        self._stop = StopRequest(self.rank)  # SIGTERM/SIGINT and the launcher watch, installed by fit()
        self.stopped_by: str | None = None
        """Why fit() stopped before schedule.max_steps (e.g. 'SIGTERM'), after its checkpoint; None otherwise."""
        configs = cfg.model_configs()
        self._flops_per_image = flops_per_image(cfg) if torch.cuda.is_available() else None

        self.models = build(cfg, self.world, self.device, use_deepspeed=use_deepspeed)
        self.engines = {name: getattr(self.models, name) for name in self.engine_names}
        self.feature_cache = None
        """encoder.feature_cache, checked against the encoders (here) and the dataset (at first data use)."""
        if cfg.encoder.feature_cache is not None:
            self.feature_cache = FeatureCache.for_run(cfg, self.models.encoders)
            self.models.encoders = []  # the step reads the cached targets: the encoders are never run
        self.latent_cache = None
        """data.latent_cache (stage=ldm): checked against the VAE and its statistics (here) and the dataset (at first
        data use); without it the step encodes each batch with the frozen VAE."""
        if cfg.data.latent_cache is not None:
            self.latent_cache = LatentCache.for_run(cfg, self.models.vae, *self.models.latents_stats)
        self.ema = self.models.ema
        self.settings = StepSettings(vae_loss=cfg.loss.vae, proj_coeff=cfg.loss.proj_coeff,
                                     vae_align_proj_coeff=cfg.loss.vae_align_proj_coeff,
                                     ema_decay=cfg.schedule.ema_decay, precision=cfg.schedule.precision,
                                     kernel_backend=cfg.kernel_backend)
        latent = (configs.sit.in_channels, configs.sit.input_size, configs.sit.input_size)
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
        from .sources import build_source

        source, line = build_source(self.cfg, rank=self.rank, world=self.world, device=self.device,
                                    run_dir=self.run_dir)
        log0(line)
        for cache in (self.feature_cache, self.latent_cache):
            if cache is not None:
                cache.check_source(source)
        return source

    # -----------------------------------------------------------------------------------------------
    # One step with this rank's data and draws
    # -----------------------------------------------------------------------------------------------

    def next_inputs(self) -> StepInputs:
        images, labels = self.data.next_batch()
        if self.step == 0:
            self.save_data_preview(images)
        draws = self.random.draw(self.rank, self.world, self.device)
        targets = (None if self.feature_cache is None
                   else self.feature_cache.targets(self.data.last_indices, self.device))
        moments = (None if self.latent_cache is None
                   else self.latent_cache.moments(self.data.last_indices, self.device))
        return StepInputs(images=images.to(self.device), labels=labels.to(self.device), targets=targets,
                          moments=moments, **draws)

    def run_step(self, inputs: StepInputs | None = None, mark=None) -> dict[str, torch.Tensor]:
        inputs = inputs if inputs is not None else self.next_inputs()
        logs = STEPS[self.cfg.stage](self.models, inputs, self.settings, step=self.step, mark=mark)
        self.step += 1
        for name in self.engine_names:
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
        info = on_rank0(lambda: ckpt.select(self.ckpt_root, kinds), self.device, ckpt.CheckpointError)
        if info is None:
            return None
        for line in info.notes:
            log0(line)
        return info.path

    def load_checkpoint(self, path: str) -> None:
        """Restore everything `save_checkpoint` wrote; the run continues as if it had never stopped. The folder is
        validated first; a config change is refused (model, engine layout, ZeRO 1/2 world size) or applied
        (optimizer settings), see train/resume.py."""
        kinds = ckpt.engine_kinds(self.engines)
        info = on_rank0(lambda: ckpt.validate(path, kinds), self.device, ckpt.CheckpointError)
        for line in check_resume(info, self.cfg.to_dict(), self.world):
            log0(f"config change on resume: {line}")
        ckpt.load_engines(path, self.engines, self.device)
        sections = {k: getattr(self.cfg, f"optim_{k}") for k in self.engines}
        for line in apply_optimizer_settings(self.engines, sections, info.config):
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

    def save_data_preview(self, images: torch.Tensor) -> str | None:
        """The first training batch (rank 0's slice, as the step sees it) as samples/data.png (rank 0)."""
        if self.rank != 0 or self.cfg.logging.sample_every <= 0:
            return None
        from .visual import save_image_grid

        path = os.path.join(self.run_dir, "samples", "data.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return save_image_grid(images.detach().float().cpu() / 127.5 - 1, path)

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
        images = self.models.vae_module.decode(ema.bn.denormalize(latents.float()))
        path = os.path.join(self.run_dir, "samples", f"step{self.step:07d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_image_grid(images.float().cpu(), path)
        return path

    # -----------------------------------------------------------------------------------------------
    # The loop
    # -----------------------------------------------------------------------------------------------

    def _should_stop(self) -> str | None:
        """Why every rank stops after this step ('SIGTERM', 'SIGINT', 'the launcher exiting'), else None. The
        ranks' stop codes are all-reduced (MAX) so that all stop at the same step for the same reason: one tiny
        all-reduce per step when W > 1."""
        code = all_max(self._stop.poll(), self.device)
        return describe(code) if code else None

    def _extra_values(self) -> dict[str, float]:
        """What a log row holds beside the step logs: engines' grad norms and loss scales, the latent BN's running
        statistics, the non-finite counts, and the distinct unreadable files rank 0 has skipped."""
        bn = self.models.sit.module.bn
        values = engine_values(self.engines)
        values["bn/running_mean_avg"] = float(bn.running_mean.mean())
        values["bn/running_var_avg"] = float(bn.running_var.mean())
        values.update({f"{k}/nonfinite_total": self.nan_total[k] for k in self.engine_names})
        if self._data is not None:  # each file is logged once by its rank
            values["data/bad_images"] = self._data.num_bad_images
        return values

    def _after_step(self, metrics: Metrics) -> bool:
        """Logs, samples, checkpoints and stop requests after a step; True when the loop must end."""
        cfg, last = self.cfg, self.step == self.cfg.schedule.max_steps
        if self.step % cfg.logging.log_every == 0 or last:
            metrics.write(self.step, self._extra_values())
        if cfg.logging.sample_every > 0 and (self.step % cfg.logging.sample_every == 0 or self.step == 1):
            self.save_samples()
        if self.step % cfg.logging.ckpt_every == 0 or last:
            self.save_checkpoint()
        if self.online_fid is not None and self.step % cfg.eval.fid_every == 0:  # after the checkpoint: minutes
            self.online_fid.run(self.step, self.ema.module, self.models.vae_module, metrics)
        if (reason := self._should_stop()) is None:
            return False
        if not last:  # at max_steps the run is complete (and saved above)
            if self.step % cfg.logging.ckpt_every:
                self.save_checkpoint()
            self.stopped_by = reason
            log0(f"stopped by {reason} at step {self.step}; resume with the same command")
        return True

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
        self._stop.install()  # SIGTERM/SIGINT (and the launcher exiting) stop the run after the current step
        metrics = Metrics(cfg, rank=self.rank, world=self.world, device=self.device, history=self.history,
                          flops_per_image=self._flops_per_image)
        metrics.open(self.step, resumed=resumed)
        try:
            while self.step < cfg.schedule.max_steps:
                metrics.add(self.run_step())
                if self._after_step(metrics):
                    break
        finally:
            if self.stopped_by is None:  # after a stop they stay: a repeat while the process exits is absorbed
                self._stop.uninstall()
            metrics.close()
