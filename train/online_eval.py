"""Online FID while training, off unless eval.fid_every > 0: a run's sample quality, visible without stopping it.

    online = OnlineFID.for_run(cfg, rank=r, world=w, device=d)  # None when off; checks eval.ref and the Inception
    online.run(step, ema_sit, vae, metrics)                      # every rank, every eval.fid_every steps

One evaluation, on every rank:
1. the EMA SiT samples this rank's share of eval.num_samples images, decoded with the EMA latent BN statistics
   (as the trainer's sample grids), with train/generate.py's rules: sample i has label labels[i] of the
   class-balanced list seeded eval.seed and noise from (eval.seed, i); chunks of eval.batch_size consecutive
   indices are dealt round-robin over the ranks, so every evaluation sees the same set at any world size;
2. each chunk goes through the Inception as it is made (pool_3, F = 2048 features);
3. the ranks reduce n, sum f and sum f f^T in float64 (train/evaluate_metrics.py's FID on the whole set, up to
   the order of float64 additions);
4. rank 0: mu = s / n, sigma = (S - n mu mu^T) / (n - 1), the Frechet distance to the reference statistics,
   logged as eval/fid and eval/seconds (train/metrics.py: tensorboard, log.jsonl, one line on stdout).
The training does not see it: the global RNG states are forked and restored, every module's train/eval mode is
put back, the weights are only read. Holds no sampler, network or distance of its own (train/generate.py,
train/evaluate_inception.py, train/evaluate_metrics.py): only the split over the ranks and its reduction.
"""

# n samples, F Inception pool width (2048)

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .distributed import log0
from .evaluate_inception import INCEPTION_FILE, INCEPTION_URL, build_inception, cached_features, npz_keys
from .generate import Settings, chunk_range, global_labels, num_chunks, sample_chunk
from .generate_io import SamplingModels

POOL_WIDTH = 2048
"""F: Inception pool_3 features per image."""


def inception_file(cfg) -> str | None:
    """The Inception weights the evaluations will load (None: random, eval.inception_allow_random), after checking
    what the run will read: one-line errors naming the key and the file, at start rather than hours later."""
    section = cfg.eval
    for package in ("torch_fidelity", "scipy"):
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"config key eval.fid_every={section.fid_every} needs {package}: pip install "
                             f"'repae[eval]'")
    try:
        keys = set(npz_keys(section.ref))
    except (OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"config key eval.ref: {section.ref} is not a readable .npz ({err})") from None
    if "arr_0" not in keys and not {"mu", "sigma"} <= keys:
        raise ValueError(f"config key eval.ref: {section.ref} holds neither mu, sigma nor images arr_0 (it has "
                         f"{', '.join(sorted(keys)) or 'nothing'})")
    if section.inception_allow_random:
        log0("eval.inception_allow_random: a RANDOMLY INITIALISED Inception, eval/fid means nothing (tests only)")
        return None
    if section.inception_weights is not None:
        return section.inception_weights  # its existence: config.check_paths
    from repae.model.weights import find_weight_file

    try:
        return find_weight_file(INCEPTION_FILE, None, what="the FID Inception weights",
                                hint=f"It is published at {INCEPTION_URL}; or set eval.inception_weights.")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"config key eval.inception_weights: {err}") from None


def settings(cfg, step: int) -> Settings:
    """The sampler settings of train/generate.py that eval.* sets (labels always class-balanced)."""
    e = cfg.eval
    return Settings(ckpt="", step=step, mode=e.sampler, num_steps=e.steps, heun=e.heun, cfg_scale=e.cfg_scale,
                    guidance_low=e.guidance_low, guidance_high=e.guidance_high, label_sampling="equal",
                    num_classes=cfg.sit.num_classes, seed=e.seed, num_samples=e.num_samples,
                    batch_size=e.batch_size, png=False, tf32=cfg.schedule.tf32)


def rank_chunks(s: Settings, rank: int, world: int) -> list[int]:
    """This rank's chunks: every world-th one from `rank` (train/generate.py deals them the same way)."""
    return list(range(num_chunks(s)))[rank::world]


def share_features(models: SamplingModels, s: Settings, labels: torch.Tensor, chunks: list[int], net: nn.Module,
                   device: torch.device, *, progress: bool) -> np.ndarray:
    """float32 [n, F] pool features of the samples of `chunks`, each chunk generated and embedded in turn (one
    chunk of images in memory at a time). `progress`: the Inception's bar (rank 0 only)."""
    from .evaluate_inception import inception_features

    if not chunks:  # more ranks than chunks
        return np.zeros((0, POOL_WIDTH), dtype=np.float32)
    batches = (sample_chunk(models, s, c, labels, device) for c in chunks)
    count = sum(len(chunk_range(c, s)) for c in chunks)
    return inception_features(net, batches, count, device, desc=f"online FID step {s.step}", progress=progress)["pool"]


def feature_sums(pool_nF: np.ndarray) -> np.ndarray:
    """float64 [1 + F + F * F]: n, sum f, sum f f^T of one share; shares combine by adding these."""
    f_nF = pool_nF.astype(np.float64)
    return np.concatenate([[len(f_nF)], f_nF.sum(0), (f_nF.T @ f_nF).ravel()])


def statistics_from_sums(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu [F], sigma [F, F]) of all the samples (sigma unbiased, as np.cov and torch-fidelity)."""
    n, s_F, S_FF = sums[0], sums[1:1 + POOL_WIDTH], sums[1 + POOL_WIDTH:].reshape(POOL_WIDTH, POOL_WIDTH)
    mu = s_F / n
    sigma = (S_FF - n * np.outer(mu, mu)) / (n - 1)
    return mu, (sigma + sigma.T) / 2  # symmetric to the last bit, whatever order the matmul summed in


def reduce_sums(sums: np.ndarray, device: torch.device) -> np.ndarray:
    """The sum over the ranks, on rank 0 (one reduce).
    PERF: 8 (F^2 + F + 1) bytes = 32 MiB a rank whatever eval.num_samples; gathering the features instead would
    move 8 KiB a sample (80 MiB for 10k) and keep them all on rank 0."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return sums
    t = torch.from_numpy(sums).to(device)
    dist.reduce(t, dst=0)
    return t.cpu().numpy()


@contextlib.contextmanager
def inference_state(modules: list[nn.Module], device: torch.device):
    """Eval mode inside (the VAE's dropout), every submodule's own mode put back after; the global RNG states of
    the CPU and `device` forked, so the training's random stream is the same with and without evaluations."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            for module in modules:
                module.eval()
            yield
        finally:
            for m, mode in modes:
                m.training = mode


class OnlineFID:
    """The evaluations of one run: the settings, the labels, the Inception and the reference statistics."""

    def __init__(self, cfg, *, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.weights = inception_file(cfg)
        self.labels = global_labels(cfg.eval.num_samples, cfg.sit.num_classes, "equal", cfg.eval.seed)
        self.net: nn.Module | None = None
        """Built at the first evaluation; kept on the CPU between evaluations (~95 MB of host memory, no GPU
        memory taken from the training, no file read again)."""
        self.net_id = ""
        self.ref_stats: tuple[np.ndarray, np.ndarray] | None = None
        """(mu, sigma) of eval.ref, read or computed at the first evaluation (rank 0)."""

    @classmethod
    def for_run(cls, cfg, **kwargs) -> OnlineFID | None:
        return cls(cfg, **kwargs) if cfg.eval.fid_every > 0 else None

    def _network(self) -> nn.Module:
        if self.net is None:
            self.net, self.net_id = build_inception(self.weights, allow_random=self.weights is None)
        return self.net

    def _reference(self) -> tuple[np.ndarray, np.ndarray]:
        """eval.ref's stored mu, sigma; else its images' statistics, their features cached beside it (or in
        run_dir/eval when that folder is read-only) and reused by `python -m repae.train.evaluate`."""
        if self.ref_stats is None:
            ref = self.cfg.eval.ref
            if {"mu", "sigma"} <= set(npz_keys(ref)):
                with np.load(ref) as z:
                    self.ref_stats = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            else:
                beside = os.access(os.path.dirname(os.path.abspath(ref)), os.W_OK)
                cache_dir = None if beside else os.path.join(self.cfg.logging.run_dir, "eval")
                from .evaluate_metrics import fid_statistics

                feats = cached_features(ref, self._network(), self.net_id, device=self.device,
                                        batch_size=self.cfg.eval.batch_size, cache_dir=cache_dir)
                self.ref_stats = fid_statistics(feats["pool"])
        return self.ref_stats

    def features(self, step: int, ema: nn.Module, vae: nn.Module, *, rank: int, world: int) -> np.ndarray:
        """[n, F] pool features of `rank`'s share of the evaluation set (the Inception is left on the device)."""
        s = settings(self.cfg, step)
        models = SamplingModels(sit=ema, vae=vae, denormalize=ema.bn.denormalize, step=step, stem="online",
                                decode_from="the EMA latent BN")
        with inference_state([ema, vae], self.device):  # the Inception's first build draws its default init
            return share_features(models, s, self.labels, rank_chunks(s, rank, world), self._network(), self.device,
                                  progress=rank == 0)

    def run(self, step: int, ema: nn.Module, vae: nn.Module, metrics) -> float | None:
        """One evaluation (every rank); eval/fid on rank 0 (NaN when the Frechet distance fails), None elsewhere."""
        t0 = time.time()
        sums = feature_sums(self.features(step, ema, vae, rank=self.rank, world=self.world))
        ref = self._reference() if self.rank == 0 else None  # while the Inception is on the device
        self.net.cpu()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the sampling's and the Inception's blocks go back before the next step
        sums = reduce_sums(sums, self.device)
        if self.rank != 0:
            metrics.write_values(step, {}, exclude_seconds=time.time() - t0)
            return None
        from .evaluate_metrics import frechet_distance  # here: it imports scipy (the eval extra)

        try:
            fid = frechet_distance(*statistics_from_sums(sums), *ref)
        except ValueError as err:  # e.g. an imaginary square root: a line, never a stopped run
            log0(f"step {step}: online FID failed: {err}")
            fid = math.nan
        seconds = time.time() - t0
        e = self.cfg.eval
        log0(f"step {step}: eval/fid {fid:.4f} ({e.num_samples} samples, {e.sampler}{e.steps}"
             f"{'-heun' if e.heun else ''}, cfg {e.cfg_scale}, {seconds:.0f} s)")
        metrics.write_values(step, {"eval/fid": fid, "eval/seconds": seconds}, exclude_seconds=seconds)
        return fid
