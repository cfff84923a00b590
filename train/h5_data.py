"""The original's preprocessed ImageNet as a data source: `images.h5` + `images_h5.json` (data.source = "h5").

    source = H5Source("/data/imagenet256/images.h5", 256, global_batch_size=256, rank=r, world_size=world, seed=0)
    images_B3RR, labels_B = source.next_batch()          # same interface as train/data.py: ImageFolderSource

The layout (docs/METHOD.md#data-preprocessing), as the original's `preprocessing.py` writes it and its
`dataset.py` reads it:
- `images.h5`: image idx (its position in the sorted file list of the tree) is the PNG of its R x R reference
  crop, stored as a 0-d fixed-length byte-string dataset (`np.array(png, dtype="S")`) at key
  `f"{s[:5]}/img{s}.png"` with s = f"{idx:08d}" (groups of 1000 images); the PNGs are 8-bit RGB, written by PIL with
  compress_level=0. The file also holds `dataset.json`, a byte-string dataset of the UTF-8 JSON
  {"labels": [[key, label], ...]} in index order.
- `images_h5.json` beside it: the JSON list of every name in the file (groups, images and dataset.json).
- Reading: the image keys are the names of the sidecar with an image extension, sorted; the label of a key
  is looked up in dataset.json; each PNG is decoded by PIL to uint8 [3, R, R].

Here: dataset index i is the i-th sorted image key, and each PNG goes through train/data.py: `load_image` (to_rgb,
then center_crop_arr): a stored R x R RGB PNG at run resolution R comes back unchanged; a file written at another
resolution is re-cropped to the run's R by center_crop_arr. An entry that does not decode is replaced by the
next readable one, logged once and counted (train/loader.py), as in the folder source. The HDF5 file is opened
lazily once per process (h5py handles must not cross a fork), so DataLoader workers each hold their own. Needs
h5py (the `train` extra). Must not hold the writer: `python -m repae.train.dataset_tool prepare` writes the layout.
"""

# B batch (this rank), R resolution; in formulas n images

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import load_image
from .loader import DEFAULT_MAX_BAD_IMAGES, IndexedSource, ReplacingDataset

H5_FILE = "images.h5"
H5_INDEX_FILE = "images_h5.json"
LABELS_KEY = "dataset.json"


def import_h5py() -> Any:
    """The h5py module, or one ValueError line naming the extra that brings it."""
    try:
        import h5py
    except ImportError:
        raise ValueError("HDF5 data (data.source=h5, dataset_tool prepare) needs h5py: "
                         "pip install 'repae[train]' (or pip install h5py)") from None
    return h5py


def image_key(idx: int) -> str:
    """The original's key of image idx: '00012/img00012345.png'."""
    s = f"{idx:08d}"
    return f"{s[:5]}/img{s}.png"


def is_image_key(key: str) -> bool:
    """A key the original reads as an image: its extension is one PIL knows (dataset.json and groups are not)."""
    return os.path.splitext(key)[1].lower() in Image.registered_extensions()


def read_bytes(h5file, key: str) -> bytes:
    """The stored bytes of one entry (a 0-d byte string, or a uint8 array)."""
    return np.asarray(h5file[key]).tobytes()


def read_layout(h5_path: str) -> tuple[list[str], list[int], str]:
    """(sorted image keys, their labels, label source in words) of an images.h5, the way the original reads it.

    The keys come from the sidecar images_h5.json when it exists (else from the file itself); labels from the
    file's dataset.json. ValueError (one line) for a missing file, no images or a key without a label.
    """
    h5py = import_h5py()
    if not os.path.isfile(h5_path):
        raise FileNotFoundError(f"HDF5 file {h5_path!r} does not exist (data.root must name the images.h5 file)")
    sidecar = os.path.join(os.path.dirname(h5_path), H5_INDEX_FILE)
    with h5py.File(h5_path, "r") as f:
        if os.path.isfile(sidecar):
            with open(sidecar) as g:
                names = json.load(g)
        else:
            names = []
            f.visit(names.append)
        keys = sorted({n for n in names if is_image_key(n)})
        if not keys:
            raise ValueError(f"{h5_path} holds no images (no image keys such as {image_key(0)!r})")
        if LABELS_KEY not in f:
            raise ValueError(f"{h5_path} has no {LABELS_KEY!r} dataset (the labels of the original's layout)")
        table = json.loads(read_bytes(f, LABELS_KEY).decode("utf-8")).get("labels") or []
    by_key = {str(k).replace("\\", "/"): int(label) for k, label in table}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise ValueError(f"{h5_path}: {LABELS_KEY} has no label for {missing[0]!r} ({len(missing)} images missing)")
    return keys, [by_key[k] for k in keys], f"{h5_path}:{LABELS_KEY}"


class H5Dataset(ReplacingDataset):
    """Index -> Sample over the sorted image keys of an images.h5; one lazily opened handle per process."""

    def __init__(self, h5_path: str, resolution: int, *, max_bad_images: int = DEFAULT_MAX_BAD_IMAGES):
        self.h5_path, self.resolution, self.max_bad_images = h5_path, resolution, max_bad_images
        keys, labels, self.label_source = read_layout(h5_path)
        # PERF: one numpy buffer each, not a list of Python strings (see train/data.py: ImageFolderDataset).
        self.keys = np.array([k.encode() for k in keys])
        self.labels = np.array(labels, dtype=np.int64)
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": None}  # a handle never travels to a worker

    def _h5(self):
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = import_h5py().File(self.h5_path, "r"), os.getpid()
        return self._file

    def name(self, index: int) -> str:
        return self.keys[index].decode()

    def path(self, index: int) -> str:
        return f"{self.h5_path}:{self.name(index)}"

    def load(self, index: int) -> torch.Tensor:
        return load_image(io.BytesIO(read_bytes(self._h5(), self.name(index))), self.resolution)


class H5Source(IndexedSource):
    """An images.h5 of the original's layout as this rank's slices of world-size-independent global batches."""

    def __init__(self, root: str, resolution: int, *, max_bad_images: int = DEFAULT_MAX_BAD_IMAGES, **kw):
        """root: the images.h5 file; kw: global_batch_size, rank, world_size, seed, num_workers, drop_last,
        prefetch (train/loader.py: IndexedSource)."""
        super().__init__(lambda: H5Dataset(root, resolution, max_bad_images=max_bad_images), root=root,
                         resolution=resolution, what=f"HDF5 file {root!r}", max_bad_images=max_bad_images, **kw)
