"""Data sources, images/s: the folder source (PIL in DataLoader workers), the h5 source and DALI (its CPU backend;
on a GPU also the mixed nvJPEG decoder) at batch 32, 256 px, 2 workers, over a tree of generated full-size
500x375 JPEGs (noise on gradients, so the files are about the size of ImageNet's). Runs on CPU too (`cpu_ok`).

Timing: host clock around next_batch(), after 3 batches of warm-up (workers started, pipeline built), over
NUM_TIMED batches; a GPU batch is synchronized before the clock stops. One row per source in
bench/results/<device>/data.jsonl. Speed is never asserted.
"""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

BATCH, RESOLUTION, WORKERS, NUM_IMAGES, NUM_TIMED = 32, 256, 2, 256, 16


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory) -> str:
    """NUM_IMAGES 500x375 JPEGs (quality 90) in 4 class folders."""
    root = tmp_path_factory.mktemp("bench_data") / "train"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(NUM_IMAGES):
        folder = root / f"n{i % 4:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.stack([xx * rng.uniform(0.2, 0.5), yy * rng.uniform(0.2, 0.6), (xx + yy) * 0.2], -1)
        pixels = np.clip(base + rng.normal(0, 24, (375, 500, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.JPEG", quality=90)
    return str(root)


def _time(source, device: torch.device) -> float:
    """Seconds per batch of source.next_batch(), after the warm-up."""
    for _ in range(3):
        source.next_batch()
    start = time.perf_counter()
    for _ in range(NUM_TIMED):
        images, _ = source.next_batch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / NUM_TIMED


def _h5_file(jpeg_tree: str, tmp_path) -> str:
    """images.h5 of the tree, written by the dataset tool's `prepare` (skip when either is not there yet)."""
    if importlib.util.find_spec("repae.train.h5_data") is None:
        pytest.skip("repae.train.h5_data (H5Source) does not exist yet")
    if importlib.util.find_spec("repae.train.dataset_tool") is None:
        pytest.skip("repae.train.dataset_tool (prepare) does not exist yet")
    from repae.train import dataset_tool

    out_dir = tmp_path / "h5"
    try:
        code = dataset_tool.main(["prepare", jpeg_tree, str(out_dir), "--resolution", str(RESOLUTION),
                                  "--workers", str(WORKERS)])
    except (SystemExit, Exception) as err:  # noqa: BLE001 - a failed prepare skips this row, not the others
        pytest.skip(f"dataset_tool prepare failed here: {type(err).__name__}: {err}")
    path = str(out_dir / "images.h5")
    if code or not os.path.isfile(path):
        pytest.skip(f"dataset_tool prepare returned {code} without writing {path}")
    return path


@pytest.mark.bench
@pytest.mark.cpu_ok
@pytest.mark.parametrize("provider,mode", [("folder", "cpu"), ("h5", "cpu"), ("dali", "cpu"), ("dali", "mixed")])
def test_bench_data(provider, mode, jpeg_tree, tmp_path, record):
    common = dict(global_batch_size=BATCH, rank=0, world_size=1, seed=0, num_workers=WORKERS, prefetch=2)
    device = torch.device("cuda" if mode == "mixed" else "cpu")
    if provider == "folder":
        from repae.train.data import ImageFolderSource

        source = ImageFolderSource(jpeg_tree, RESOLUTION, **common)
    elif provider == "h5":
        path = _h5_file(jpeg_tree, tmp_path)
        from repae.train.h5_data import H5Source

        source = H5Source(path, RESOLUTION, **common)
    else:
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'repae[dali]')")
        if mode == "mixed" and not torch.cuda.is_available():
            pytest.skip("DALI's mixed (nvJPEG) decoder needs a CUDA GPU")
        from repae.train.dali_data import DALISource

        source = DALISource(jpeg_tree, RESOLUTION, device=device, **common)
    seconds = _time(source, device)
    record(op="data", case="jpeg500x375_b32_r256", provider=provider, mode=mode, ms=(seconds * 1e3,) * 3,
           img_per_s=BATCH / seconds, workers=WORKERS, num_images=NUM_IMAGES, cpu_count=os.cpu_count())
