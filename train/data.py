"""Training images for the trainer: a class-folder source that yields (uint8 [B, 3, R, R], int64 [B]) per rank.

    source = ImageFolderSource(root, 256, global_batch_size=256, rank=r, world_size=world, seed=0)
    images_B3RR, labels_B = source.next_batch()          # this rank's slice of the next global batch
    state = source.state_dict(); ...; source.load_state_dict(state)   # resumes at the very next batch

Holds: the folder scan and labels of the original `preprocessing.py` (docs/METHOD.md#data-preprocessing), the
clean-list reader, the ADM `center_crop_arr` (the reference crop), the mode conversion to 8-bit RGB (16-bit PNGs
included) and the folder dataset. Must not hold augmentation (REPA-E has none), VAE/latent code or anything of the
train step: a GPU (DALI) source replaces this file behind the same interface. The loader, the batch order and the
unreadable-file policy are train/loader.py's and train/sharding.py's; the synthetic demo set is train/demo_data.py's.

Unreadable files (truncated, corrupt, empty, not an image): index i that fails to decode is replaced by the
next readable index i+1, i+2, ... (mod n) in the sorted file order (train/loader.py); each file is logged once
per rank with its name and reason, counted, and the run stops with one ValueError line when a rank has met
more than `max_bad_images` (config key data.max_bad_images). Corruption inside the JPEG entropy-coded data that
libjpeg decodes without an error (garbled pixels) cannot be seen here and is not counted.
"""

# B batch (this rank), G global batch, R resolution; in formulas n images

from __future__ import annotations

import json
import os
from typing import IO

import numpy as np
import torch
from PIL import Image

from .loader import DEFAULT_MAX_BAD_IMAGES, IndexedSource, ReplacingDataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""PIL modes of one integer channel wider than 8 bits: 16-bit greyscale PNGs open as I;16 (older Pillows gave I)."""


# ---------------------------------------------------------------------------------------------------
# Scan and decode (docs/METHOD.md#data-preprocessing: the original's preprocessing.py)
# ---------------------------------------------------------------------------------------------------


def scan_image_folder(root: str) -> tuple[list[str], list[int]]:
    """Sorted relative paths of the images under `root` and their labels.

    Labels come from `root/dataset.json` ({"labels": [[relpath, label], ...]}) when it exists, else from the
    sorted top-level directory names (0..K-1; files directly under root form the class "" that sorts first).
    """
    relpaths, labels, _ = scan_with_label_source(root)
    return relpaths, labels


def scan_with_label_source(root: str) -> tuple[list[str], list[int], str]:
    """scan_image_folder plus where the labels came from, in words for error messages."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist (data.root)")
    relpaths = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # glob("**") of the original skips hidden entries; so does this walk.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                relpaths.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    relpaths.sort()
    if not relpaths:
        raise ValueError(f"image folder {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    meta_path = os.path.join(root, "dataset.json")
    table = None
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            table = json.load(f).get("labels")
    if table:
        by_path = {str(p): int(label) for p, label in table}
        missing = [p for p in relpaths if p not in by_path]
        if missing:
            raise ValueError(f"{meta_path}: 'labels' has no entry for {missing[0]!r} ({len(missing)} images missing)")
        return relpaths, [by_path[p] for p in relpaths], f"{meta_path} ('labels')"
    top = [p.split("/")[0] if "/" in p else "" for p in relpaths]
    index = {name: i for i, name in enumerate(sorted(set(top)))}
    return relpaths, [index[name] for name in top], f"the {len(index)} class folders of data.root={root}"


def read_file_list(root: str, path: str) -> tuple[list[str], list[int], str]:
    """A file list of `relpath<TAB>label` lines (relpaths under root, `#` comments and blank lines skipped), in
    its own order; what `dataset_tool check` writes as the clean list. ValueError naming the file and line."""
    relpaths, labels = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.rsplit("\t", 1)
            if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
                raise ValueError(f"{path}:{n}: expected 'relpath<TAB>label', got {line[:80]!r}")
            relpaths.append(parts[0])
            labels.append(int(parts[1]))
    if not relpaths:
        raise ValueError(f"file list {path} holds no images")
    return relpaths, labels, f"the file list {path}"


def list_images(root: str, file_list: str | None = None) -> tuple[list[str], list[int], str]:
    """(relpaths, labels, label source in words) of `file_list` when given, else of the scanned folder."""
    return scan_with_label_source(root) if file_list is None else read_file_list(root, file_list)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM center crop: BOX-halve while the short side >= 2*size, BICUBIC to short side = size, crop the center."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded PIL image -> 8-bit RGB, as the original's `convert("RGB")` but without clipping 16-bit data.

    8-bit modes (L, P, LA, PA, RGBA, CMYK, YCbCr, 1, ...) go through `convert("RGB")` as in the original: alpha
    is dropped (the colour under a transparent pixel is kept, no compositing), palettes are looked up, CMYK
    uses PIL's plain formula (no ICC profile). One-channel modes wider than 8 bits (WIDE_INT_MODES) would be
    clipped at 255 by `convert` (a 16-bit image of mean 127.5 reads as 254.5); they are mapped by the high
    byte, v8 = v16 >> 8 (v clipped to [0, 65535] first for mode I), then replicated to RGB. `>> 8` is the
    rule PIL itself applies to 16-bit RGB, RGBA and greyscale+alpha PNGs (it opens them as 8-bit RGB/RGBA
    by keeping the high byte), so every 16-bit kind converts alike.
    """
    if img.mode in WIDE_INT_MODES:
        v_RR = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return Image.fromarray((v_RR >> 8).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | IO[bytes], resolution: int) -> torch.Tensor:
    """One file (a path or a binary file object) -> uint8 [3, R, R] (RGB by `to_rgb`, ADM center crop, no
    augmentation); raises on a bad file. An 8-bit RGB image of R x R comes back unchanged (the crop is then an
    identity: no halving, a resize to its own size is a copy in PIL)."""
    with Image.open(path) as img:
        img.load()  # decode now: a truncated file fails here, inside the caller's error handling
        arr_RR3 = center_crop_arr(to_rgb(img), resolution)
    return torch.from_numpy(np.ascontiguousarray(arr_RR3)).permute(2, 0, 1).contiguous()


class ImageFolderDataset(ReplacingDataset):
    """Index -> Sample over a scanned folder (or a file list); an unreadable file is replaced by the next readable
    index (train/loader.py)."""

    def __init__(self, root: str, resolution: int, *, max_bad_images: int = DEFAULT_MAX_BAD_IMAGES,
                 file_list: str | None = None):
        self.root, self.resolution, self.max_bad_images = root, resolution, max_bad_images
        relpaths, labels, self.label_source = list_images(root, file_list)
        # PERF: one numpy buffer each, not 1.28M Python objects: forked workers would touch every object's
        # refcount and so copy the pages, the DataLoader "memory leak" of large Python lists.
        self.relpaths = np.array([p.encode() for p in relpaths])
        self.labels = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.relpaths)

    def name(self, index: int) -> str:
        return self.relpaths[index].decode()

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.name(index))

    def load(self, index: int) -> torch.Tensor:
        return load_image(self.path(index), self.resolution)


class ImageFolderSource(IndexedSource):
    """Class-folder images as this rank's slices of world-size-independent global batches, resumable."""

    def __init__(self, root: str, resolution: int, *, max_bad_images: int = DEFAULT_MAX_BAD_IMAGES,
                 file_list: str | None = None, **kw):
        """root: the class-folder tree; file_list: relpath<TAB>label lines to read instead of the scan; kw:
        global_batch_size, rank, world_size, seed, num_workers, drop_last, prefetch (train/loader.py)."""
        super().__init__(lambda: ImageFolderDataset(root, resolution, max_bad_images=max_bad_images,
                                                    file_list=file_list),
                         root=root, resolution=resolution, what=f"image folder {root!r}",
                         max_bad_images=max_bad_images, **kw)
