"""What a run reports: the progress bar, tensorboard, log.jsonl, losses.png, throughput and MFU.

    metrics = Metrics(cfg, rank=rank, world=world, device=device, history=history)
    metrics.open(step, resumed=...)          # bar and tensorboard writer (rank 0)
    metrics.add(logs)                        # every step: 0-d tensors summed on the device, no host sync
    metrics.write(step, extra)               # every logging.log_every steps: one all-reduce, then rank 0 writes
    metrics.write_values(step, values)       # values from outside the window (eval/fid): a row of their own
    metrics.close()

A written row is the mean over the window's steps and over the ranks of every step log, plus `extra` (values the
trainer reads from engines and data), `log/window_steps` (the first window after a resume may be shorter),
`perf/img_per_s` and, on a GPU, the estimated TFLOP/s per GPU and MFU (train/build.py: flops_per_image).
log.jsonl is strict JSON (a non-finite value is null); `history` (kept in checkpoints) feeds losses.png.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings

import torch

from repae.model.flops import peak_bf16_tflops

from .distributed import all_mean

LOG_FILE = "log.jsonl"
PLOT_FILE = "losses.png"


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


def engine_values(engines: dict) -> dict[str, float]:
    """<name>/grad_norm and <name>/loss_scale of each engine, where the engine knows them."""
    values = {}
    for name, engine in engines.items():
        if (norm := engine.grad_norm()) is not None:
            values[f"{name}/grad_norm"] = norm
        if (scale := engine.loss_scale()) is not None:
            values[f"{name}/loss_scale"] = scale
    return values


class Metrics:
    """Window sums of the step logs and the writers of rank 0."""

    def __init__(self, cfg, *, rank: int, world: int, device: torch.device, history: dict,
                 flops_per_image: float | None = None):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.history, self.flops_per_image = history, flops_per_image
        self.run_dir = cfg.logging.run_dir
        self.writer = self.bar = None
        self._sums: dict[str, torch.Tensor] = {}
        self._count, self._t0 = 0, time.time()

    def open(self, step: int, *, resumed: bool) -> None:
        """The progress bar and the tensorboard writer (rank 0). After a resume, the rows and events of the steps
        after the checkpoint are dropped: they are trained (and logged) again."""
        if self.rank != 0:
            return
        if resumed:
            truncate_log(os.path.join(self.run_dir, LOG_FILE), step)
        if self.cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(self.run_dir, "tb"), purge_step=step + 1 if resumed else None)
            except ImportError:
                warnings.warn("tensorboard is not installed: no tensorboard logs (pip install tensorboard)",
                              stacklevel=1)
        from tqdm import tqdm

        self.bar = tqdm(total=self.cfg.schedule.max_steps, initial=step, desc="repae", unit="step",
                        dynamic_ncols=True)
        self._t0 = time.time()

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        for k, v in logs.items():
            self._sums[k] = self._sums.get(k, 0) + v.detach().float().to(self.device)  # no host sync
        self._count += 1
        if self.bar is not None:
            self.bar.update(1)

    def _perf(self, count: int) -> dict[str, float]:
        values = {"perf/img_per_s": count * self.cfg.schedule.global_batch_size / max(time.time() - self._t0, 1e-9)}
        if self.flops_per_image is not None:
            tflops = self.flops_per_image * values["perf/img_per_s"] / self.world / 1e12
            values["perf/tflops_per_gpu_est"] = tflops
            peak = peak_bf16_tflops(torch.cuda.get_device_name())
            if peak is not None:
                values["perf/mfu_est"] = tflops / peak
        return values

    def write(self, step: int, extra: dict[str, float]) -> None:
        """Reduce the window (every rank calls it) and, on rank 0, write it everywhere; the window restarts."""
        keys = sorted(self._sums)
        vec = all_mean(torch.stack([self._sums[k] for k in keys]).float().to(self.device) / max(self._count, 1))
        values = dict(zip(keys, vec.tolist()))
        values["log/window_steps"] = self._count
        values.update(self._perf(self._count))
        values.update(extra)
        self._sums, self._count, self._t0 = {}, 0, time.time()
        if self.rank == 0:
            self._write_rank0(step, values)

    def write_values(self, step: int, values: dict[str, float], *, exclude_seconds: float = 0.0) -> None:
        """Values measured outside the step window (the online FID, train/online_eval.py): the history, tensorboard
        and a log.jsonl row of their own (rank 0). Every rank calls it; `exclude_seconds` (the time the values took)
        are left out of the window's img/s."""
        self._t0 += exclude_seconds
        if self.rank == 0:
            self._record(step, values)

    def _record(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.history.setdefault(k, []).append((step, v))
            if self.writer is not None:
                self.writer.add_scalar(k, v, step)
        with open(os.path.join(self.run_dir, LOG_FILE), "a") as f:
            f.write(json_line({"step": step, **values}) + "\n")

    def _write_rank0(self, step: int, values: dict[str, float]) -> None:
        from .visual import save_loss_plot

        self._record(step, values)
        if self.bar is not None:  # the losses the run has (stage=ldm: the SiT's alone)
            shown = (("sit", "sit/loss", ".4f"), ("vae", "vae/loss", ".4f"), ("d", "disc/discriminator_loss", ".3f"))
            self.bar.set_postfix({"img/s": f"{values['perf/img_per_s']:.1f}",
                                  **{name: f"{values[k]:{fmt}}" for name, k, fmt in shown if k in values}})
        save_loss_plot({k: v for k, v in self.history.items() if k.endswith("loss")},
                       os.path.join(self.run_dir, PLOT_FILE))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
