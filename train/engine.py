"""Engines: a trained module with its optimizer, as the step and the checkpoints see it.

    engine = build_engine(module, cfg.optim_sit, cfg, world_size, device, use_deepspeed=True)
    out = engine(x, ...); engine.backward(loss); engine.step()

`Engine` is the protocol; `PlainEngine` (one process, no DeepSpeed: tests, demos, world-size studies) and
`DeepSpeedEngine` (an adapter around a DeepSpeed engine) satisfy it, including saving and loading their part of
a checkpoint, so the trainer and train/checkpoint.py never ask which kind they hold. `kind` names the files an
engine writes (train/checkpoint.py lists the layout of both kinds).
"""

from __future__ import annotations

import json
import os
from typing import Protocol

import torch
from torch import nn

from .checkpoint_io import CheckpointError, failure_text, load_file, need_keys, one_line, safe_engine, save_file


class Engine(Protocol):
    kind: str
    """'plain' (one file <tag>.pt) or 'deepspeed' (a folder <tag>/ of DeepSpeed files)."""
    module: nn.Module

    def __call__(self, *args, **kwargs): ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def grad_norm(self) -> float | None:
        """The global gradient norm of the last update (before clipping), None when not known."""

    def loss_scale(self) -> float | None:
        """The fp16 loss scale, None in other precisions."""

    def set_optimizer_settings(self, section) -> None:
        """Apply lr, betas, eps, weight_decay and grad_clip of an OptimSection to the (loaded) optimizer."""

    def save(self, folder: str, tag: str, *, rank: int, failure: str | None) -> str | None:
        """Write this engine's part of the checkpoint folder (every rank calls it); returns the first failure
        (the one passed in, or this write's), so that a rank that failed still keeps step with the others."""

    def load(self, folder: str, tag: str, device: torch.device) -> None:
        """Load weights and optimizer from a validated checkpoint folder; CheckpointError naming the file."""

    # Per kind, without an engine (validation on rank 0, export):
    @staticmethod
    def check_files(folder: str, tag: str) -> int | None:
        """Every file of this engine's part is present and weights-only loadable (tensors mapped, not read);
        returns the world size that wrote a per-rank partitioned optimizer, None when it is not partitioned."""

    @staticmethod
    def read_weights(folder: str, tag: str) -> dict:
        """The module state dict of this engine's part, read weights-only."""


MODEL_STATES = "mp_rank_00_model_states.pt"
"""DeepSpeed's file of an engine's weights (and, at ZeRO stage 0, its optimizer) inside <tag>/."""

OPTIM_KEYS = ("lr", "betas", "eps", "weight_decay")
"""AdamW settings that a resume applies to the loaded param groups (loading restores the checkpoint's)."""


def _set_param_groups(optimizer: torch.optim.Optimizer, section) -> None:
    for name in OPTIM_KEYS:
        value = getattr(section, name)
        for group in optimizer.param_groups:
            group[name] = tuple(value) if isinstance(value, (tuple, list)) else value


class PlainEngine:
    """The engine without DeepSpeed: module + optimizer + global-norm clipping, one process."""

    kind = "plain"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 1.0):
        self.module, self.optimizer, self.grad_clip = module, optimizer, grad_clip
        self._grad_norm: torch.Tensor | None = None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self) -> float | None:
        return None if self._grad_norm is None else float(self._grad_norm)

    def loss_scale(self) -> float | None:
        return None

    def set_optimizer_settings(self, section) -> None:
        _set_param_groups(self.optimizer, section)
        self.grad_clip = section.grad_clip

    def save(self, folder: str, tag: str, *, rank: int, failure: str | None) -> str | None:
        path = os.path.join(folder, f"{tag}.pt")
        if rank != 0 or failure is not None:
            return failure
        try:
            save_file({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}, path)
        except (OSError, CheckpointError) as err:
            return failure_text(path, err)
        return None

    def load(self, folder: str, tag: str, device: torch.device) -> None:
        path = os.path.join(folder, f"{tag}.pt")
        state = load_file(path, map_location=device)
        try:
            self.module.load_state_dict(state["module"])
            self.optimizer.load_state_dict(state["optimizer"])
        except Exception as err:  # noqa: BLE001 - state-dict mismatches, as one line
            raise CheckpointError(f"{path}: could not be loaded into the {tag} engine ({type(err).__name__}: "
                                  f"{one_line(err)})") from err

    @staticmethod
    def wrote(folder: str, tag: str) -> bool:
        return os.path.isfile(os.path.join(folder, f"{tag}.pt"))

    @staticmethod
    def check_files(folder: str, tag: str) -> int | None:
        file = os.path.join(folder, f"{tag}.pt")
        need_keys(load_file(file, mmap=True), ("module", "optimizer"), file)
        return None

    @staticmethod
    def read_weights(folder: str, tag: str) -> dict:
        return load_file(os.path.join(folder, f"{tag}.pt"))["module"]


def _optim_file(folder: str, rank: int) -> str:
    for prefix in ("", "bf16_"):
        path = os.path.join(folder, f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        if os.path.isfile(path):
            return path
    return os.path.join(folder, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")  # missing: load_file says so


class DeepSpeedEngine:
    """A DeepSpeed engine seen through the Engine protocol; every other attribute is the wrapped engine's.
    Its checkpoint files are read and written weights-only (train/checkpoint_io.py: SafeCheckpointEngine)."""

    kind = "deepspeed"

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.inner.backward(loss)

    def step(self) -> None:
        self.inner.step()

    def grad_norm(self) -> float | None:
        norm = self.inner.get_global_grad_norm()
        return None if norm is None else float(norm)

    def loss_scale(self) -> float | None:
        scale = getattr(self.inner.optimizer, "cur_scale", None)
        return None if scale is None else float(scale)

    def set_optimizer_settings(self, section) -> None:
        opt = self.inner.optimizer
        _set_param_groups(getattr(opt, "optimizer", opt), section)  # the AdamW inside ZeRO / bf16 wrappers
        if hasattr(opt, "clip_grad"):  # ZeRO keeps its own copy of the clip value
            opt.clip_grad = section.grad_clip

    def save(self, folder: str, tag: str, *, rank: int, failure: str | None) -> str | None:
        writer = safe_engine(self.inner)
        writer.failure = failure  # after a failure, DeepSpeed only keeps step with the other ranks
        try:
            self.inner.save_checkpoint(folder, tag=tag, save_latest=False)
        except OSError as err:  # outside its checkpoint engine (the recovery scripts it copies)
            failure = failure or failure_text(os.path.join(folder, tag), err)
        failure = failure or writer.failure
        writer.failure = None
        return failure

    def load(self, folder: str, tag: str, device: torch.device) -> None:
        where = os.path.join(folder, tag)
        safe_engine(self.inner)
        try:
            loaded, _ = self.inner.load_checkpoint(folder, tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - DeepSpeed's asserts and state-dict mismatches, as one line
            raise CheckpointError(f"{where}: could not be loaded into the {tag} engine ({type(err).__name__}: "
                                  f"{one_line(err)})") from err
        if loaded is None:
            raise CheckpointError(f"{where}: DeepSpeed found no model states to load")

    @staticmethod
    def check_files(folder: str, tag: str) -> int | None:
        where = os.path.join(folder, tag)
        if not os.path.isdir(where):
            raise CheckpointError(f"{where}: missing engine folder (DeepSpeed engine {tag})")
        file = os.path.join(where, MODEL_STATES)
        states = need_keys(load_file(file, mmap=True), ("module", "optimizer", "dp_world_size"), file)
        if states["optimizer"] is not None:
            return None
        for r in range(states["dp_world_size"]):  # ZeRO 1/2: one optimizer partition per rank of the writing run
            optim = _optim_file(where, r)
            need_keys(load_file(optim, mmap=True), ("optimizer_state_dict",), optim)
        return states["dp_world_size"]

    @staticmethod
    def read_weights(folder: str, tag: str) -> dict:
        return load_file(os.path.join(folder, tag, MODEL_STATES))["module"]


ENGINE_KINDS = {"plain": PlainEngine, "deepspeed": DeepSpeedEngine}
"""Engine.kind -> its class: how checkpoint validation and export read a part without an engine."""


def ds_config(cfg, world_size: int, grad_clip: float) -> dict:
    """The shared DeepSpeed section plus what the trainer owns: batch sizes, clipping."""
    G = cfg.schedule.global_batch_size
    return {**json.loads(json.dumps(cfg.deepspeed)), "train_batch_size": G,
            "train_micro_batch_size_per_gpu": G // world_size,
            "gradient_accumulation_steps": 1, "gradient_clipping": grad_clip, "zero_allow_untested_optimizer": True,
            "steps_per_print": cfg.deepspeed.get("steps_per_print", 10**9)}


def build_engine(module: nn.Module, optim, cfg, world_size: int, device: torch.device, *,
                 use_deepspeed: bool) -> Engine:
    """AdamW over the module's trainable parameters (fused on GPU: the same update up to rounding; foreach on
    CPU), wrapped in DeepSpeed (config from cfg.deepspeed) or in a PlainEngine."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                            fused=(device.type == "cuda") or None)
    if not use_deepspeed:
        return PlainEngine(module, opt, optim.grad_clip)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt,
                                           config=ds_config(cfg, world_size, optim.grad_clip))
    return DeepSpeedEngine(engine)
