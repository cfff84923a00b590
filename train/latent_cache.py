"""VAE latent cache: the frozen VAE's posterior (mean, std) of every image of a dataset, computed once for the
LDM-only run, which samples z = mean + std * eps each step (docs/METHOD.md#latent-cache).

    python -m repae.train.latent_cache --config CONFIG [--set k=v ...] [--out PATH] [--batch-size N]
    torchrun --nproc_per_node 8 -m repae.train.latent_cache --config CONFIG --out PATH   # rows dealt over ranks
    vae, bias_C, scale_C = build_frozen_vae(cfg, device)     # the VAE and latent statistics, as the writer's
    cache = LatentCache.for_run(cfg, vae, bias_C, scale_C)    # checked against the run's VAE, stats and config
    cache.check_source(source)                                # ... and its dataset
    mean_BChw, std_BChw = cache.moments(indices_B, device)    # fp32, bitwise the VAE's posterior.mean / .std

The VAE runs in fp32, eval mode, without autocast (as the original; TF32 as schedule.tf32), and the rows are stored
in fp32 (no fp16/bf16 option), so a sample drawn from them is the VAE's own sample with the same eps, bitwise.

Format (instead of the original's HDF5 file: memory-mapped rows need no h5py, and the ranks write one file at
disjoint offsets): PATH is a folder holding
- `moments.npy`: float32 [n, 2C, h, w] in dataset-index order, per image the mean then the std (the original's
  layout; std = exp(0.5 * clamp(logvar, -30, 20)), not the logvar); `labels.npy`: int64 [n], each row's label;
- `header.json`: {"format", "version", "chunk_rows", "complete", "identity", "info"}. `identity` is checked field
  by field at load (one line naming the field and both values): resolution, preprocessing, precision, the VAE
  (name, VAEConfig, a hash of its state dict), the latent statistics (bias and scale, exact), the latent shape and
  the dataset (root, image count, a hash of the ordered names and labels); `info` is not checked;
- during a write, `done-r<k>.npy`: bool [chunks] of rank k. Chunk c = rows [c * chunk_rows, (c + 1) * chunk_rows),
  one VAE batch at every world size (so the bytes do not depend on it), is marked after its rows are fsynced. A
  write starts from the union of all done files (any earlier world size), deals the missing chunks over its ranks,
  and rank 0 sets `complete` and removes the done files once every chunk is marked.
A row whose image was unreadable holds its replacement's moments and label (train/loader.py). DALI runs: rows come
from the reference PIL decode and crop, as the feature cache's.
"""

# B batch, C latent channels, h, w latent height and width, R image side; in formulas n images, c chunk

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import sys

import numpy as np
import torch

from .array_cache import (
    HEADER,
    check_identity,
    dataset_identity,
    open_array,
    open_for_write,
    read_header,
    save_npy_atomic,
    source_for_cache,
    state_dict_fingerprint,
    write_header,
    write_rows,
)
from .distributed import barrier, log0, on_rank0, rank, world_size

FORMAT, VERSION = "repae-latent-cache", 1
WHAT, COMPUTED_FOR = "latent cache", "VAE, latent statistics, config or dataset"
MOMENTS, LABELS = "moments.npy", "labels.npy"


def done_file(path: str, r: int) -> str:
    return os.path.join(path, f"done-r{r}.npy")


# ---------------------------------------------------------------------------------------------------
# The VAE and the identity of its rows
# ---------------------------------------------------------------------------------------------------


def build_frozen_vae(cfg, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The run's VAE (vae.weights; a random init after torch.manual_seed(schedule.seed) only with vae.allow_random),
    fp32, eval, frozen, on `device`, and its latent statistics fp32 (bias [C], scale [C]) from vae.latents_stats or
    the weights' -latents-stats twin (bias 0, scale 1 without a file, only with vae.allow_random)."""
    from repae.model.vae import build_vae, latents_stats_path, load_latents_stats, load_vae_weights

    torch.manual_seed(cfg.schedule.seed)
    vae = build_vae(cfg.model_configs().vae)
    if cfg.vae.weights is not None:
        load_vae_weights(vae, cfg.vae.weights)
    elif not cfg.vae.allow_random:
        raise ValueError("config key vae.weights is not set: the latent cache needs the trained VAE (set it, or set "
                         "vae.allow_random=true for a demo)")
    C = vae.config.embed_dim
    stats = cfg.vae.latents_stats or (latents_stats_path(cfg.vae.weights) if cfg.vae.weights else None)
    if stats is not None and os.path.exists(stats):
        bias, scale = load_latents_stats(stats)
        if bias.numel() != C:
            raise ValueError(f"latents-stats file {stats}: {bias.numel()} channels, the VAE has {C}")
    elif cfg.vae.allow_random:
        log0(f"NOTE: no latents-stats file ({stats}): latent statistics bias 0, scale 1 (vae.allow_random)")
        bias, scale = torch.zeros(C), torch.ones(C)
    else:
        raise ValueError(f"config key vae.latents_stats: no latents-stats file {stats} (the LDM-only run normalises "
                         "the latents with the VAE's statistics)")
    return vae.to(device).eval().requires_grad_(False), bias.to(device), scale.to(device)


@torch.no_grad()
def posterior_moments(vae, images_B3RR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) fp32 [B, C, h, w] of uint8 images: x = image / 127.5 - 1 as in the step, the VAE in fp32
    without autocast, std = exp(0.5 * clamp(logvar, -30, 20)) (DiagonalGaussianDistribution)."""
    x = images_B3RR.float() / 127.5 - 1
    with torch.autocast(device_type=x.device.type, enabled=False):
        posterior = vae.encode(x)
    return posterior.mean, posterior.std


def config_identity(cfg, vae, latents_bias: torch.Tensor, latents_scale: torch.Tensor) -> dict:
    """The identity fields that come from the run config, its VAE and the latent statistics it normalises with."""
    C, f = vae.config.embed_dim, vae.config.factor
    # Through JSON (tuples become lists) so that it compares equal to the header's; the first difference is named.
    return json.loads(json.dumps({
        "resolution": cfg.data.resolution,
        "preprocessing": {"crop": "RGB, ADM center crop (train/data.py load_image)", "scale": "x / 127.5 - 1"},
        "precision": "fp32, eval, no autocast",
        "vae": {"name": cfg.vae.name, "config": dataclasses.asdict(vae.config),
                "fingerprint": state_dict_fingerprint(vae)},
        # fp32 -> Python float is exact, and JSON keeps every bit of a float: compared exactly.
        "latents_stats": {"bias": latents_bias.detach().float().cpu().reshape(-1).tolist(),
                          "scale": latents_scale.detach().float().cpu().reshape(-1).tolist()},
        "latent_shape": [C, cfg.data.resolution // f, cfg.data.resolution // f],
    }))


def _rows_done(path: str, chunk_rows: int, n: int) -> tuple[np.ndarray, int]:
    """(done bool [chunks], rows done): the union of every done file at `path`."""
    num_chunks = -(-n // chunk_rows)
    done = np.zeros(num_chunks, dtype=bool)
    for file in glob.glob(os.path.join(path, "done-r*.npy")):
        marks = np.load(file)
        if marks.shape != done.shape:
            raise ValueError(f"{WHAT} {file}: {marks.shape[0]} chunks, the header says {num_chunks} (remove it to "
                             "start over)")
        done |= marks
    last = n - (num_chunks - 1) * chunk_rows
    return done, int(done[:-1].sum()) * chunk_rows + (last if num_chunks and done[-1] else 0)


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


class LatentCache:
    """A complete cache opened read-only (memory-mapped); `moments(indices)` gives the posteriors of a batch."""

    def __init__(self, path: str):
        self.path = path
        self.header = read_header(path, FORMAT, VERSION, WHAT)
        n = self.num_images
        if not self.header.get("complete"):
            rows = _rows_done(path, self.header["chunk_rows"], n)[1]
            raise ValueError(f"{WHAT} {path} is incomplete ({rows} of {n} rows): finish it by running the same "
                             "latent_cache command again")
        C, h, w = self.latent_shape
        self.moments_array = open_array(os.path.join(path, MOMENTS), (n, 2 * C, h, w), np.float32, WHAT)
        self.labels = open_array(os.path.join(path, LABELS), (n,), np.int64, WHAT)
        """int64 [n]: the label of the image each row was computed from."""

    @property
    def num_images(self) -> int:
        return self.header["identity"]["dataset"]["num_images"]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""
        return tuple(self.header["identity"]["latent_shape"])

    @classmethod
    def for_run(cls, cfg, vae, latents_bias: torch.Tensor, latents_scale: torch.Tensor) -> LatentCache:
        """data.latent_cache opened and checked against the run's config, its VAE and the latent statistics
        (bias [C], scale [C]) it normalises with."""
        if cfg.data.latent_cache is None:
            raise ValueError("config key data.latent_cache is not set (a folder written by python -m "
                             "repae.train.latent_cache)")
        cache = cls(cfg.data.latent_cache)
        cache.check(config_identity(cfg, vae, latents_bias, latents_scale))
        return cache

    def check(self, identity: dict) -> None:
        check_identity(self.path, self.header["identity"], identity, what=WHAT, computed_for=COMPUTED_FOR,
                       hint="rebuild it, or point data.latent_cache at the right one")

    def check_source(self, source) -> None:
        self.check({"dataset": dataset_identity(source, WHAT)})

    def moments(self, indices_B: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior (mean, std) of dataset indices [B]: fp32 [B, C, h, w] each, contiguous, on `device`."""
        rows = indices_B.detach().cpu().numpy().astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_images):
            raise ValueError(f"{WHAT} {self.path}: dataset index {int(rows.min())}..{int(rows.max())} outside its "
                             f"{self.num_images} rows")
        # PERF: a synchronous read in the step's thread, B * 2C * h * w * 4 bytes (1 MB for 32 images of f8d4 at
        # 256 px): page-cache speed once the file is warm.
        block = torch.from_numpy(np.ascontiguousarray(self.moments_array[rows])).to(device)  # (B, 2C, h, w)
        C = self.latent_shape[0]
        return block[:, :C].contiguous(), block[:, C:].contiguous()


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def deal_chunks(done: np.ndarray, r: int, world: int) -> list[int]:
    """Rank r's share of the chunks not done yet: every world-th of them, from the r-th (disjoint, no padding)."""
    return [int(c) for c in np.flatnonzero(~done)[r::world]]


def _fill(vae, dataset, path: str, chunks: list[int], done: np.ndarray, *, chunk_rows: int, num_workers: int,
          device: torch.device, bar) -> None:
    """Compute and write this rank's chunks, marking each in its done file after its rows are on disk."""
    from .loader import collate_samples

    n, r = len(dataset), rank()
    batches = [list(range(c * chunk_rows, min(n, (c + 1) * chunk_rows))) for c in chunks]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                         collate_fn=collate_samples)
    for c, (images_B3RR, labels_B, indices_B, bad) in zip(chunks, loader):
        if bool((indices_B < 0).any()):
            raise ValueError(f"{WHAT}: no readable image near row {c * chunk_rows} ({bad[0][1]})")
        for i, reason, used in bad:
            print(f"[repae] rank {r}: unreadable image {dataset.path(i)} ({reason}); its row holds "
                  f"{dataset.name(used)}", flush=True)
        mean_BChw, std_BChw = posterior_moments(vae, images_B3RR.to(device))
        write_rows(os.path.join(path, MOMENTS), c * chunk_rows, torch.cat([mean_BChw, std_BChw], 1).cpu().numpy())
        write_rows(os.path.join(path, LABELS), c * chunk_rows, labels_B.to(torch.int64).numpy())
        done[c] = True
        save_npy_atomic(done_file(path, r), done)  # after the rows are on disk: a mark never runs ahead of the data
        bar.update(len(images_B3RR))


def _open(path: str, header: dict, arrays: dict) -> dict:
    """Rank 0: the header of the cache at `path`, created (with its arrays) or checked against `header`."""
    if not os.path.isfile(os.path.join(path, HEADER)):
        for file in glob.glob(os.path.join(path, "done-r*.npy")):  # marks of a cache that is gone
            os.remove(file)
    return open_for_write(path, header, arrays, what=WHAT, computed_for=COMPUTED_FOR)[0]


def _finish(path: str, header: dict, log) -> None:
    """Rank 0, after every rank's last chunk: `complete` once every chunk is marked, then the done files go."""
    n = header["identity"]["dataset"]["num_images"]
    done, rows = _rows_done(path, header["chunk_rows"], n)
    if not done.all():
        log(f"{WHAT} {path}: {rows} of {n} rows written; run the same command again to finish it")
        return
    write_header(path, {**header, "complete": True})
    for file in glob.glob(os.path.join(path, "done-r*.npy")):
        os.remove(file)
    log(f"wrote {path}: {n} images, latents {header['identity']['latent_shape']} (mean and std, float32)")


@torch.no_grad()
def write_cache(cfg, path: str, *, batch_size: int = 64, device: torch.device | None = None, progress: bool = True,
                log=print) -> str:
    """Compute the VAE posterior of every image of the run's dataset into `path`, or continue a partial write
    there; every rank of a launched world calls it and writes its share of the missing chunks. Returns path."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"{WHAT}: batch size {batch_size}, expected >= 1")
    r, world = rank(), world_size()
    say = log if r == 0 else (lambda *_: None)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = cfg.schedule.tf32  # as train/build.py
    torch.backends.cudnn.allow_tf32 = cfg.schedule.tf32
    vae, bias_C, scale_C = build_frozen_vae(cfg, device)
    source, line = source_for_cache(cfg, device, WHAT, rank=r, world=world)
    say(line)
    identity = {**config_identity(cfg, vae, bias_C, scale_C), "dataset": dataset_identity(source, WHAT)}
    n, (C, h, w) = identity["dataset"]["num_images"], identity["latent_shape"]
    weights = cfg.vae.weights
    info = {"vae_weights": f"{weights} ({os.path.getsize(weights)} bytes)" if weights else "random init",
            "latents_stats": cfg.vae.latents_stats, "tf32": cfg.schedule.tf32, "device": str(device),
            "world_size": world, "torch": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    new = {"format": FORMAT, "version": VERSION, "chunk_rows": batch_size, "complete": False, "identity": identity,
           "info": info}
    arrays = {MOMENTS: ((n, 2 * C, h, w), np.float32), LABELS: ((n,), np.int64)}
    header = on_rank0(lambda: _open(path, new, arrays), device)
    if header["complete"]:
        say(f"{WHAT} {path} is already complete ({n} images)")
        return path
    chunk_rows = header["chunk_rows"]
    if chunk_rows != batch_size:
        say(f"{WHAT} {path}: continuing in its chunks of {chunk_rows} rows (--batch-size {batch_size} ignored)")
    done, rows = _rows_done(path, chunk_rows, n)
    barrier()  # every rank has read the done files before any rank rewrites its own
    say(f"{WHAT} {path}: {rows} of {n} rows already written, {n - rows} to compute on {world} rank(s)")
    chunks = deal_chunks(done, r, world)
    todo = sum(min(n, (c + 1) * chunk_rows) - c * chunk_rows for c in chunks)
    bar = tqdm(total=todo, unit="img", desc=f"{WHAT} (rank 0 of {world})", disable=not progress or r != 0)
    _fill(vae, source.dataset, path, chunks, done, chunk_rows=chunk_rows, num_workers=cfg.data.num_workers,
          device=device, bar=bar)
    bar.close()
    barrier()
    if r == 0:
        _finish(path, header, say)
    barrier()
    return path


def main(argv=None) -> int:
    import torch.distributed as dist

    from .config import load_config

    p = argparse.ArgumentParser(description="precompute the VAE posterior (mean, std) of a run's dataset (a latent "
                                            "cache for data.latent_cache); under torchrun the ranks share the "
                                            "rows; a killed run continues")
    p.add_argument("--config", required=True, help="the run JSON (configs/*.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides, as train.main")
    p.add_argument("--out", help="the cache folder (continued when it holds a partial cache); default "
                                 "data.latent_cache")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE call and per chunk (default 64)")
    a = p.parse_args(argv)
    device, launched = None, int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if launched:  # torchrun, deepspeed
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        cfg = load_config(a.config, a.set)
        out = a.out or cfg.data.latent_cache
        if out is None:
            raise ValueError("no output folder: pass --out PATH or set data.latent_cache")
        write_cache(cfg, out, batch_size=a.batch_size, device=device)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if launched:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
