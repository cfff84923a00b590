"""Training images for the trainer: a class-folder source that yields (uint8 [B, 3, R, R], int64 [B]) per rank.

    source = ImageFolderSource(root, 256, global_batch_size=256, rank=r, world_size=world, seed=0)
    images_B3RR, labels_B = source.next_batch()          # this rank's slice of the next global batch
    state = source.state_dict(); ...; source.load_state_dict(state)   # resumes at the very next batch

Holds: the folder scan and labels of the original `preprocessing.py` (docs/METHOD.md#data-preprocessing), the ADM
`center_crop_arr`, the mode conversion to 8-bit RGB (16-bit PNGs included), the skipping of unreadable files, the label
check against the model's class count and the resumable position. Must not hold augmentation (REPA-E has none),
VAE/latent code or anything of the train step: a GPU (DALI) source replaces this file behind the same interface.
The batch order (world-size independent) is train/sharding.py's; the synthetic demo set is train/demo_data.py's.

Unreadable files (truncated, corrupt, empty, not an image): index i that fails to decode is replaced by the
next readable index i+1, i+2, ... (mod n) in the sorted file order, so the replacement depends only on the
files, never on the worker count or the world size; batch shapes, order and resume stay exact. Each sample
carries the (index, reason) of the files it skipped; the main process logs each file once per rank with its
name and reason, counts the distinct files, and stops with one ValueError line when a rank has met more
than `max_bad_images` (config key data.max_bad_images). Corruption inside the JPEG entropy-coded data that
libjpeg decodes without an error (garbled pixels) cannot be seen here and is not counted.
"""

# B batch (this rank), G global batch, R resolution; in formulas n images

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from .preemption import shield_loader_worker
from .sharding import RankBatchSampler

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""PIL modes of one integer channel wider than 8 bits: 16-bit greyscale PNGs open as I;16 (older Pillows gave I)."""
DEFAULT_MAX_BAD_IMAGES = 100
"""Unreadable files one rank may skip before the run stops (the default of config key data.max_bad_images)."""


# ---------------------------------------------------------------------------------------------------
# Scan and decode (docs/METHOD.md#data-preprocessing: the original's preprocessing.py)
# ---------------------------------------------------------------------------------------------------


def scan_image_folder(root: str) -> tuple[list[str], list[int]]:
    """Sorted relative paths of the images under `root` and their labels.

    Labels come from `root/dataset.json` ({"labels": [[relpath, label], ...]}) when it exists, else from the
    sorted top-level directory names (0..K-1; files directly under root form the class "" that sorts first).
    """
    relpaths, labels, _ = _scan_with_label_source(root)
    return relpaths, labels


def _scan_with_label_source(root: str) -> tuple[list[str], list[int], str]:
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


def load_image(path: str, resolution: int) -> torch.Tensor:
    """One file -> uint8 [3, R, R] (RGB by `to_rgb`, ADM center crop, no augmentation); raises on a bad file."""
    with Image.open(path) as img:
        img.load()  # decode now: a truncated file fails here, inside the caller's error handling
        arr_RR3 = center_crop_arr(to_rgb(img), resolution)
    return torch.from_numpy(np.ascontiguousarray(arr_RR3)).permute(2, 0, 1).contiguous()


def _reason(err: BaseException) -> str:
    """One short line for a decode failure: 'OSError: image file is truncated'."""
    text = " ".join(str(err).split()) or "no message"
    return f"{type(err).__name__}: {text[:200]}"


class Sample(NamedTuple):
    """One dataset item: the image actually used, its label and index, and the unreadable files skipped to it."""

    image: torch.Tensor  # uint8 (3, R, R)
    label: int
    index: int  # the index decoded (the requested one unless it was unreadable); -1: none readable within reach
    bad: tuple[tuple[int, str], ...]  # (index, reason) of each unreadable file skipped, in probe order


class ImageFolderDataset(Dataset):
    """Index -> Sample over a scanned folder; an unreadable file is replaced by the next readable index."""

    def __init__(self, root: str, resolution: int, *, max_bad_images: int = DEFAULT_MAX_BAD_IMAGES,
                 file_list: str | None = None):
        self.root, self.resolution, self.max_bad_images = root, resolution, max_bad_images
        relpaths, labels, self.label_source = (_scan_with_label_source(root) if file_list is None
                                               else read_file_list(root, file_list))
        # PERF: one numpy buffer each, not 1.28M Python objects: forked workers would touch every object's
        # refcount and so copy the pages, the DataLoader "memory leak" of large Python lists.
        self.relpaths = np.array([p.encode() for p in relpaths])
        self.labels = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.relpaths)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.relpaths[index].decode())

    def __getitem__(self, index: int) -> Sample:
        """Decode `index`, or the first readable of index+1, index+2, ... (mod n) if it cannot be read.

        At most max_bad_images + 1 files are probed (never more than n): past that the main process stops
        the run anyway, and the sample comes back with index -1 and a zero image.
        """
        bad = []
        for offset in range(min(len(self), self.max_bad_images + 1)):
            i = (index + offset) % len(self)
            try:
                image = load_image(self.path(i), self.resolution)
            # PIL raises OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error, ... depending on
            # where the bytes break; any failure of one file's decode is that file's fault, so all are caught.
            except Exception as err:  # noqa: BLE001
                bad.append((i, _reason(err)))
                continue
            return Sample(image, int(self.labels[i]), i, tuple(bad))
        R = self.resolution
        return Sample(torch.zeros(3, R, R, dtype=torch.uint8), 0, -1, tuple(bad))


def collate_samples(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    """Samples -> (images uint8 [B, 3, R, R], labels int64 [B], indices int64 [B], bad (index, reason, used) tuples)."""
    # PERF: default_collate stacks into shared memory inside a worker (no extra copy through the queue).
    images_B3RR, labels_B = default_collate([(s.image, s.label) for s in samples])
    indices_B = torch.tensor([s.index for s in samples], dtype=torch.int64)
    bad = tuple((i, reason, s.index) for s in samples for i, reason in s.bad)
    return images_B3RR, labels_B, indices_B, bad


class ImageFolderSource:
    """Class-folder images as this rank's slices of world-size-independent global batches, resumable."""

    def __init__(self, root: str, resolution: int, *, global_batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 4, drop_last: bool = True, max_bad_images: int = DEFAULT_MAX_BAD_IMAGES,
                 file_list: str | None = None, prefetch: int = 2):
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be > 0, got {global_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if global_batch_size % world_size != 0:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if max_bad_images < 0:
            raise ValueError(f"max_bad_images must be >= 0 (data.max_bad_images), got {max_bad_images}")
        self.dataset = ImageFolderDataset(root, resolution, max_bad_images=max_bad_images, file_list=file_list)
        self.prefetch = prefetch
        self.last_indices: torch.Tensor | None = None
        """Dataset indices (int64 [B]) of the batch next_batch() returned last, after unreadable files were replaced."""
        self.max_bad_images = max_bad_images
        # Distinct unreadable files this rank has met (relpath -> reason), each logged once. Not in state_dict:
        # after a resume the same files are met again and counted once again, so the count stays distinct.
        self.bad_images: dict[str, str] = {}
        self.root, self.resolution, self.seed = root, resolution, seed
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.num_workers, self.drop_last = num_workers, drop_last
        if drop_last and self.num_images < global_batch_size:
            raise ValueError(f"image folder {root!r} holds {self.num_images} images, fewer than "
                             f"global_batch_size={global_batch_size} (drop_last leaves no batch)")
        # Position of the next batch next_batch() returns (the loader may have decoded further ahead).
        self.epoch, self.batch_in_epoch = 0, 0
        self._it = None

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    @property
    def num_classes(self) -> int:
        return int(self.dataset.labels.max()) + 1

    @property
    def num_bad_images(self) -> int:
        """Distinct unreadable files this rank has skipped so far (each replaced by the next readable one)."""
        return len(self.bad_images)

    def check_labels(self, num_classes: int, key: str = "sit.num_classes") -> None:
        """ValueError (one line naming both numbers, `key` and the label source) unless 0 <= label < num_classes.

        Label num_classes is the model's CFG null class: one class too many would silently train as
        unconditional, two too many fail with an IndexError in the embedding at the first step.
        """
        lo, hi = int(self.dataset.labels.min()), int(self.dataset.labels.max())
        if lo < 0:
            raise ValueError(f"{self.dataset.label_source} has label {lo}: labels must be >= 0")
        if hi >= num_classes:
            raise ValueError(f"{self.dataset.label_source} has labels up to {hi} ({hi + 1} classes), but "
                             f"{key}={num_classes}: labels must be < {key} (label {num_classes} is the CFG null "
                             f"class); set {key}={hi + 1} or fix the labels")

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch (n // G with drop_last, else ceil(n / G))."""
        n, G = self.num_images, self.global_batch_size
        return n // G if self.drop_last else -(-n // G)

    @property
    def batch_per_rank(self) -> int:
        return self.global_batch_size // self.world_size

    def _loader(self) -> Iterator:
        sampler = RankBatchSampler(num_images=self.num_images, global_batch_size=self.global_batch_size,
                                    steps_per_epoch=self.steps_per_epoch, rank=self.rank, world_size=self.world_size,
                                    seed=self.seed, epoch=self.epoch, batch=self.batch_in_epoch)
        # worker_init_fn: the loader workers outlive a SIGTERM/SIGINT sent to the process group or tree, so the
        # trainer can finish its step and checkpoint (train/preemption.py).
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            collate_fn=collate_samples, pin_memory=torch.cuda.is_available(),
                            persistent_workers=False, worker_init_fn=shield_loader_worker,
                            prefetch_factor=self.prefetch if self.num_workers > 0 else None)
        return iter(loader)

    def _note_bad(self, bad: tuple, indices_B: torch.Tensor) -> None:
        """Log each new unreadable file once (rank, path, reason, replacement); stop past max_bad_images."""
        for i, reason, used in bad:
            relpath = self.dataset.relpaths[i].decode()
            if relpath in self.bad_images:
                continue
            self.bad_images[relpath] = reason
            instead = f"replaced by {self.dataset.relpaths[used].decode()}" if used >= 0 else "no replacement"
            print(f"[repae] rank {self.rank}: skipped unreadable image {self.dataset.path(i)} ({reason}); {instead} "
                  f"[{self.num_bad_images} so far, data.max_bad_images={self.max_bad_images}]", flush=True)
        if self.num_bad_images > self.max_bad_images:
            relpath, reason = next(reversed(self.bad_images.items()))
            raise ValueError(f"{self.num_bad_images} unreadable images on rank {self.rank} exceed "
                             f"data.max_bad_images={self.max_bad_images} (last: {os.path.join(self.root, relpath)}: "
                             f"{reason}); fix or remove the files, or raise data.max_bad_images")
        if bool((indices_B < 0).any()):
            raise ValueError(f"no readable image among the {self.num_images} files under data.root={self.root} "
                             f"({self.num_bad_images} unreadable, e.g. {next(iter(self.bad_images.items()))})")

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (images uint8 [B, 3, R, R], labels int64 [B]); wraps into the next epoch by itself."""
        if self._it is None:
            self._it = self._loader()
        images_B3RR, labels_B, indices_B, bad = next(self._it)
        if bad or bool((indices_B < 0).any()):
            self._note_bad(bad, indices_B)
        self.batch_in_epoch += 1
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.last_indices = indices_B.to(torch.int64)
        return images_B3RR, labels_B.to(torch.int64)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """next_batch() forever (training is counted in steps, not epochs)."""
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Position of the next batch, plus what must match on resume (the world size need not)."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_images": self.num_images,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the batch that followed `state`; the seed, global batch and image count must match."""
        for key in ("epoch", "batch_in_epoch"):
            if key not in state:
                raise ValueError(f"data state has no key {key!r} (keys: {sorted(state)})")
        for key in ("seed", "global_batch_size", "num_images", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"data state {key}={state[key]!r} does not match this source's {getattr(self, key)!r}")
        if not 0 <= state["batch_in_epoch"] < self.steps_per_epoch or state["epoch"] < 0:
            raise ValueError(f"data state epoch={state['epoch']}, batch_in_epoch={state['batch_in_epoch']} out of "
                             f"range (steps_per_epoch={self.steps_per_epoch})")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self._it = None  # drop batches decoded ahead from the old position (and its workers)
