"""Shared fixtures of the trainer tests: one single-process gloo DeepSpeed world, tiny run configs."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from repae.train.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="session")
def ds_world():
    """deepspeed.init_distributed once for the session (world size 1, gloo, CPU)."""
    pytest.importorskip("deepspeed")  # the GPU machine has none unless its wheel is carried
    if importlib.util.find_spec("lpips") is None:  # found, not imported: lpips imports scipy, which we never use
        pytest.skip("lpips is not installed: the trainer's LPIPS heads are its shipped weights file")
    import torch.distributed as dist

    from repae.train.main import init_distributed

    if not dist.is_initialized():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        init_distributed()
    return dist


def tiny_config(run_dir, *extra: str, config: str = "tiny_cpu.json"):
    """configs/tiny_cpu.json (or another configs/ file, e.g. tiny_ldm_cpu.json) shrunk for tests: batch 4, fp32, no
    workers, run_dir under tmp."""
    return load_config(CONFIGS / config, [f"logging.run_dir={run_dir}", "schedule.global_batch_size=4",
                                          "schedule.precision=fp32", "data.num_workers=0", "logging.tensorboard=false",
                                          *extra])
