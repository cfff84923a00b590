"""Which data source a run reads, chosen and built in one place.

    source, line = build_source(cfg, rank=r, world=w, device=device, run_dir=run_dir)   # line: which and why

Every source has the same interface: `next_batch()` -> this rank's (uint8 [B, 3, R, R], int64 [B]) of the next
world-size-independent global batch (train/sharding.py), `last_indices` (int64 [B]: the dataset indices of that
batch after unreadable files were replaced, what the feature cache looks up), `state_dict()` /
`load_state_dict()` (the exact resume position), `check_labels(num_classes)`, `num_images`, `num_bad_images`.
"""

# B batch (this rank), R resolution

from __future__ import annotations

import importlib.util
import os
import shutil

import torch

DEMO_PHOTOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo_photos")
"""The real photographs of the demo run (48 JPEGs in 4 classes; sources and licences in their LICENSE.md)."""


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def choose_source(name: str, root: str | None, device: torch.device) -> tuple[str, str]:
    """(source, why) for data.source=name; auto picks dali on a GPU with DALI installed, h5 for an .h5 root, else
    folder."""
    if name != "auto":
        return name, f"data.source={name}"
    if root is not None and root.endswith((".h5", ".hdf5")):
        return "h5", f"data.source=auto and data.root={root} is an HDF5 file"
    if device.type == "cuda" and dali_available():
        return "dali", "data.source=auto, a GPU and NVIDIA DALI are present"
    why = ("no GPU" if device.type != "cuda"
           else "NVIDIA DALI is not installed (the extra repae[dali]: pip install -e '.[dali]')")
    return "folder", f"data.source=auto and {why}: PIL decoding in worker processes"


def copy_demo_photos(dest: str) -> str:
    """The shipped demo photographs copied into dest (once; the copy is atomic), so a run never writes into
    the package."""
    if not os.path.isdir(dest):
        tmp = f"{dest}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(DEMO_PHOTOS, tmp, ignore=shutil.ignore_patterns("*.md"))
        os.replace(tmp, dest)
    return dest


def default_clean_list(root: str) -> str:
    """Where `dataset_tool check ROOT` writes its clean list by default: <root>-check/clean_list.txt."""
    return os.path.join(os.path.normpath(root) + "-check", "clean_list.txt")


def build_source(cfg, *, rank: int, world: int, device: torch.device, run_dir: str, log=print):
    """The configured source for this rank, and one line saying which and why (logged by the caller on rank 0)."""
    from .distributed import barrier

    d, G, seed = cfg.data, cfg.schedule.global_batch_size, cfg.schedule.seed
    name, why = choose_source(d.source, d.root, device)
    root, file_list = d.root, d.file_list
    if name == "demo":
        root = os.path.join(run_dir, "demo_photos")
        if rank == 0:
            copy_demo_photos(root)
        barrier()
        name, why = "folder", f"{why}: the {len(os.listdir(DEMO_PHOTOS)) - 1} classes of real photographs shipped " \
                              f"in the package, copied to {root}"
    elif name == "synthetic":
        from .demo_data import write_demo_dataset

        root = os.path.join(run_dir, "demo_data")
        if rank == 0 and not os.path.isdir(root):
            write_demo_dataset(root, num_images=max(64, 2 * G), num_classes=min(4, cfg.sit.num_classes),
                               resolution=d.resolution, seed=seed)
        barrier()
        name = "folder"
    if name in ("folder", "dali") and file_list is None and os.path.isfile(default_clean_list(root)):
        file_list = default_clean_list(root)
        why += f"; reading the clean list {file_list}"
    common = dict(global_batch_size=G, rank=rank, world_size=world, seed=seed, num_workers=d.num_workers,
                  max_bad_images=d.max_bad_images, prefetch=d.prefetch)
    if name == "folder":
        from .data import ImageFolderSource

        source = ImageFolderSource(root, d.resolution, file_list=file_list, **common)
    elif name == "h5":
        from .h5_data import H5Source

        source = H5Source(root, d.resolution, **common)
    else:
        from .dali_data import DALISource

        source = DALISource(root, d.resolution, file_list=file_list, device=device, **common)
    source.check_labels(cfg.sit.num_classes)  # before any step: label num_classes would be the null class
    return source, f"data source: {name} ({why}), {source.num_images} images"
