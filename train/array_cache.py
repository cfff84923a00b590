"""What the dataset caches share: a folder of .npy arrays in dataset-index order plus a `header.json` that
records what the rows were computed from, checked field by field when a run opens the cache.

    header = read_header(path, FORMAT, VERSION, "feature cache")           # format/version checked
    check_identity(path, header["identity"], identity, what="feature cache", computed_for="...", hint="...")
    header, arrays = open_for_write(path, header, {"tokens_0.npy": (shape, np.float16)}, what=..., same=("dtype",))

Users: train/feature_cache.py (DINOv2 tokens) and train/latent_cache.py (VAE posterior moments). Holds the
identity helpers (state-dict fingerprint, dataset identity, first mismatching field), the atomic header write,
the memory-mapped arrays (created, reopened, rows written in place) and the data source a cache is computed
from. Must not hold what either cache stores or how its rows are computed.
"""

# R resolution; in formulas n images

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import torch

HEADER = "header.json"


# ---------------------------------------------------------------------------------------------------
# Identity: what a cache was computed from, compared field by field at load
# ---------------------------------------------------------------------------------------------------


def state_dict_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, dtype, shape, bytes), 16 hex digits: the weights as built
    (loaded or random, pos_embed resampled), independent of the device."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def dataset_identity(source, what: str = "feature cache") -> dict:
    """root, image count and a hash of the ordered (name, label) list of a data source's `dataset`: the relpaths
    of a class-folder tree (train/data.py, also read by DALI), the image keys of an images.h5 (train/h5_data.py)."""
    ds = getattr(source, "dataset", source)
    relpaths, labels = getattr(ds, "relpaths", None), getattr(ds, "labels", None)
    if relpaths is None and isinstance(getattr(ds, "keys", None), np.ndarray):
        relpaths = ds.keys
    root = getattr(source, "root", None) or getattr(ds, "root", None)
    if relpaths is None or labels is None or root is None:
        raise ValueError(f"{what}: the data source {type(source).__name__} does not expose its file order "
                         "(root, relpaths, labels), which the cache is indexed by")
    h = hashlib.sha256(b"\n".join(p if isinstance(p, bytes) else str(p).encode() for p in relpaths))
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return {"root": os.path.abspath(os.fspath(root)), "num_images": len(relpaths), "index_hash": h.hexdigest()[:16]}


def first_mismatch(cached, run, field: str = "") -> tuple[str, object, object] | None:
    """The first field (dotted path) where `run` differs from `cached`, with both values; None if all equal."""
    if isinstance(run, dict) and isinstance(cached, dict):
        for key in run:
            if (m := first_mismatch(cached.get(key), run[key], f"{field}.{key}")) is not None:
                return m
        return None
    if isinstance(run, list) and isinstance(cached, list) and len(run) == len(cached):
        for i, (c, r) in enumerate(zip(cached, run)):
            if (m := first_mismatch(c, r, f"{field}[{i}]")) is not None:
                return m
        return None
    return None if cached == run else (field, cached, run)


def check_identity(path: str, cached: dict, identity: dict, *, what: str, computed_for: str, hint: str) -> None:
    """ValueError (one line naming the field and both values) unless every field of `identity` equals the
    cache's (only the fields given are compared)."""
    if (m := first_mismatch(cached, identity)) is not None:
        field, was, now = m
        raise ValueError(f"{what} {path}: {field.lstrip('.')} is {was!r} in the cache but {now!r} in this run "
                         f"(it was computed for another {computed_for}: {hint})")


# ---------------------------------------------------------------------------------------------------
# Header and arrays
# ---------------------------------------------------------------------------------------------------


def read_header(path: str, fmt: str, version: int, what: str) -> dict:
    file = os.path.join(path, HEADER)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{what} {path}: no {HEADER} (not a {what}, or its write never started)")
    with open(file) as f:
        header = json.load(f)
    if header.get("format") != fmt or header.get("version") != version:
        raise ValueError(f"{what} {path}: format {header.get('format')!r} version {header.get('version')!r}, "
                         f"expected {fmt!r} version {version}")
    return header


def write_json_atomic(file: str, obj) -> None:
    """Write, flush, fsync, rename: a reader sees the old file or the new one."""
    tmp = f"{file}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


def write_header(path: str, header: dict) -> None:
    write_json_atomic(os.path.join(path, HEADER), header)


def open_array(file: str, shape: tuple[int, ...], dtype, what: str, mode: str = "r") -> np.ndarray:
    """A standard .npy memory-mapped (mode r or r+); ValueError unless it has this shape and dtype."""
    arr = np.load(file, mmap_mode=mode)
    if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise ValueError(f"{what} {file}: {arr.dtype} {arr.shape}, the header says {np.dtype(dtype)} {tuple(shape)}")
    return arr


def open_for_write(path: str, header: dict, arrays: dict[str, tuple[tuple[int, ...], object]], *, what: str,
                   computed_for: str, same: tuple[str, ...] = ()) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and the writable arrays (file name -> (shape, dtype)) of a cache at `path`.

    A cache there with the same format, identity and header fields `same` is continued (its header returned);
    anything else that has a header is refused in one line; without one, the arrays (zeros, sparse on disk) and
    `header` are written, the header last.
    """
    if os.path.isfile(os.path.join(path, HEADER)):
        old = read_header(path, header["format"], header["version"], what)
        for key in same:
            if old.get(key) != header[key]:
                raise ValueError(f"{what} {path}: {key} is {old.get(key)!r} in the cache but {header[key]!r} here "
                                 "(remove it to start over)")
        check_identity(path, old["identity"], header["identity"], what=what, computed_for=computed_for,
                       hint="remove it, or write to another --out")
        return old, {name: open_array(os.path.join(path, name), shape, dtype, what, "r+")
                     for name, (shape, dtype) in arrays.items()}
    os.makedirs(path, exist_ok=True)
    out = {name: np.lib.format.open_memmap(os.path.join(path, name), mode="w+", dtype=dtype, shape=shape)
           for name, (shape, dtype) in arrays.items()}
    write_header(path, header)
    return header, out


def write_rows(file: str, start: int, block: np.ndarray) -> None:
    """Rows [start, start + len(block)) of a .npy written in place (one pwrite at their offset, so ranks writing
    disjoint rows of one file never meet) and fsynced before it returns."""
    offset = np.load(file, mmap_mode="r").offset + start * block[0].nbytes
    data = np.ascontiguousarray(block).tobytes()
    fd = os.open(file, os.O_RDWR)
    try:
        written = os.pwrite(fd, data, offset)
        if written != len(data):
            raise OSError(f"{file}: wrote {written} of {len(data)} bytes at offset {offset}")
        os.fsync(fd)
    finally:
        os.close(fd)


def save_npy_atomic(file: str, arr: np.ndarray) -> None:
    """np.save written, fsynced and renamed: a reader sees the old array or the new one."""
    tmp = f"{file}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


# ---------------------------------------------------------------------------------------------------
# The data a cache is computed from
# ---------------------------------------------------------------------------------------------------


def collate_images(samples) -> torch.Tensor:
    """Dataset items (train/data.py Sample, or (image, label, ...) tuples) -> uint8 [B, 3, R, R]."""
    return torch.stack([s.image if hasattr(s, "image") else s[0] for s in samples])


def source_for_cache(cfg, device: torch.device, what: str, *, rank: int = 0, world: int = 1):
    """The run's data source over the whole dataset, and its log line; DALI is replaced by the folder source (the
    reference decode). Every rank of a launched world calls it (the demo and synthetic sets are written by rank 0
    between barriers); only `source.dataset` is used, never its batches."""
    from .sources import build_source, choose_source

    if choose_source(cfg.data.source, cfg.data.root, device)[0] == "dali":
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="folder"))
    if cfg.data.source not in ("demo", "synthetic") and cfg.data.root is None:
        raise ValueError(f"config key data.root must be set for data.source={cfg.data.source}")
    G = cfg.schedule.global_batch_size
    if G % world:  # the source's batches are never drawn: any world size may write the cache
        cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, global_batch_size=G - G % world
                                                                    + world))
    source, line = build_source(cfg, rank=rank, world=world, device=device, run_dir=cfg.logging.run_dir)
    if not hasattr(source, "dataset"):
        raise ValueError(f"{what}: the data source {type(source).__name__} has no indexable dataset")
    return source, line
