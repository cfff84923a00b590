"""Training images for the trainer: a class-folder source that yields (uint8 [b,3,R,R], int64 [b]) per rank.

    source = ImageFolderSource(root, 256, global_batch_size=256, rank=r, world_size=W, seed=0)
    images_b3RR, labels_b = source.next_batch()          # this rank's slice of the next global batch
    state = source.state_dict(); ...; source.load_state_dict(state)   # resumes at the very next batch

Holds: the folder scan and labels of the original `preprocessing.py` (spec sec. 7), the ADM `center_crop_arr`,
the world-size-independent batch order, the resumable position, and `write_demo_dataset` (a small synthetic
set for the CPU demo and the tests). Must not hold augmentation (REPA-E has none), VAE/latent code or
anything of the train step: a GPU (DALI) source replaces this file behind the same interface.

Batch order: epoch e permutes all N images with `torch.Generator().manual_seed(seed + e)`; global batch k
is perm[k*G:(k+1)*G] (the last partial batch dropped), and rank r takes the contiguous slice
[r*G/W:(r+1)*G/W]. Concatenating the ranks' slices gives the global batch, so one rank with batch G and W
ranks with G/W each see the same images in the same order.
"""

# b per-rank batch, G global batch, W world size, R resolution, N images

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


# ---------------------------------------------------------------------------------------------------
# Scan and decode (spec sec. 7: preprocessing.py)
# ---------------------------------------------------------------------------------------------------


def scan_image_folder(root: str) -> tuple[list[str], list[int]]:
    """Sorted relative paths of the images under `root` and their labels.

    Labels come from `root/dataset.json` ({"labels": [[relpath, label], ...]}) when it exists, else from the
    sorted top-level directory names (0..K-1; files directly under root form the class "" that sorts first).
    """
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
        return relpaths, [by_path[p] for p in relpaths]
    top = [p.split("/")[0] if "/" in p else "" for p in relpaths]
    index = {name: i for i, name in enumerate(sorted(set(top)))}
    return relpaths, [index[name] for name in top]


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


def load_image(path: str, resolution: int) -> torch.Tensor:
    """One file -> uint8 [3, R, R] (RGB, ADM center crop, no augmentation)."""
    with Image.open(path) as img:
        arr_RR3 = center_crop_arr(img.convert("RGB"), resolution)
    return torch.from_numpy(np.ascontiguousarray(arr_RR3)).permute(2, 0, 1).contiguous()


class ImageFolderDataset(Dataset):
    """Index -> (uint8 [3,R,R], int64 label) over a scanned folder; decoding happens in the loader's workers."""

    def __init__(self, root: str, resolution: int):
        self.root, self.resolution = root, resolution
        relpaths, labels = scan_image_folder(root)
        # PERF: one numpy buffer each, not 1.28M Python objects: forked workers would touch every object's
        # refcount and so copy the pages, the DataLoader "memory leak" of large Python lists.
        self.relpaths = np.array([p.encode() for p in relpaths])
        self.labels = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = os.path.join(self.root, self.relpaths[index].decode())
        return load_image(path, self.resolution), int(self.labels[index])


# ---------------------------------------------------------------------------------------------------
# Batch order: world-size independent, resumable
# ---------------------------------------------------------------------------------------------------


def epoch_permutation(num_images: int, seed: int, epoch: int) -> torch.Tensor:
    """The image order of one epoch: randperm(N) from a CPU generator seeded with seed + epoch (int64 [N])."""
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed + epoch))


def rank_slice(global_batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Contiguous slice of rank r: [r*G/W:(r+1)*G/W] (a partial last batch is split as evenly as possible)."""
    n = global_batch.numel()
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    return global_batch[lo:hi]


class _RankBatchSampler(Sampler):
    """Yields this rank's index lists from (epoch, batch) on, walking the epochs forever.

    Holds plain numbers, not the source: a reference back would make a cycle source -> loader iterator ->
    sampler -> source, and a cycle collected late tears the workers down out of order (5 s join timeouts).
    """

    def __init__(self, *, num_images: int, global_batch_size: int, steps_per_epoch: int, rank: int, world_size: int,
                 seed: int, epoch: int, batch: int):
        self.num_images, self.global_batch_size, self.steps_per_epoch = num_images, global_batch_size, steps_per_epoch
        self.rank, self.world_size, self.seed, self.epoch, self.batch = rank, world_size, seed, epoch, batch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, batch, G = self.epoch, self.batch, self.global_batch_size
        perm_N = None
        while True:
            if batch >= self.steps_per_epoch:
                epoch, batch, perm_N = epoch + 1, 0, None
            if perm_N is None:  # one randperm per epoch, not per batch
                perm_N = epoch_permutation(self.num_images, self.seed, epoch)
            yield rank_slice(perm_N[batch * G:(batch + 1) * G], self.rank, self.world_size).tolist()
            batch += 1


class ImageFolderSource:
    """Class-folder images as this rank's slices of world-size-independent global batches, resumable."""

    def __init__(self, root: str, resolution: int, *, global_batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 4, drop_last: bool = True):
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be > 0, got {global_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if global_batch_size % world_size != 0:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = ImageFolderDataset(root, resolution)
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
    def steps_per_epoch(self) -> int:
        """Global batches per epoch (N // G with drop_last, else ceil(N / G))."""
        N, G = self.num_images, self.global_batch_size
        return N // G if self.drop_last else -(-N // G)

    @property
    def batch_per_rank(self) -> int:
        return self.global_batch_size // self.world_size

    def _loader(self) -> Iterator:
        sampler = _RankBatchSampler(num_images=self.num_images, global_batch_size=self.global_batch_size,
                                    steps_per_epoch=self.steps_per_epoch, rank=self.rank, world_size=self.world_size,
                                    seed=self.seed, epoch=self.epoch, batch=self.batch_in_epoch)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False)
        return iter(loader)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (images uint8 [b,3,R,R], labels int64 [b]); wraps into the next epoch by itself."""
        if self._it is None:
            self._it = self._loader()
        images_b3RR, labels_b = next(self._it)
        self.batch_in_epoch += 1
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return images_b3RR, labels_b.to(torch.int64)

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


# ---------------------------------------------------------------------------------------------------
# Synthetic demo set
# ---------------------------------------------------------------------------------------------------


def _demo_image(rng: np.random.RandomState, label: int, num_classes: int, resolution: int) -> np.ndarray:
    """Smooth RGB image [R, R, 3] uint8: a class-coloured blob on a class-oriented gradient."""
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float64) / max(resolution - 1, 1)
    angle = 2 * np.pi * label / num_classes  # gradient direction encodes the class
    grad = 0.5 + 0.5 * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle))
    hue = label / num_classes  # blob colour encodes the class too; position, size and shade vary per image
    colour = 0.5 + 0.5 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))
    cy, cx = rng.uniform(0.25, 0.75, size=2)
    radius = rng.uniform(0.12, 0.3)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2))[..., None]
    background = grad[..., None] * (0.3 + 0.4 * rng.uniform(size=3))
    img = (1 - blob) * background + blob * colour
    return np.clip(np.round(255 * img), 0, 255).astype(np.uint8)


def write_demo_dataset(root: str, num_images: int = 64, num_classes: int = 4, resolution: int = 64,
                       seed: int = 0) -> str:
    """Write `num_images` deterministic PNGs into root/class_XX/ (round-robin over classes); returns root.

    A missing root is written as a sibling temp folder and renamed, so an interrupted write leaves no half set.
    """
    if num_images <= 0 or num_classes <= 0 or resolution <= 0:
        raise ValueError(f"write_demo_dataset: num_images={num_images}, num_classes={num_classes}, "
                         f"resolution={resolution} must all be > 0")
    root = os.path.abspath(root)
    target = root if os.path.isdir(root) else f"{root}.tmp{os.getpid()}"
    rng = np.random.RandomState(seed)
    for i in range(num_images):
        label = i % num_classes
        folder = os.path.join(target, f"class_{label:02d}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(_demo_image(rng, label, num_classes, resolution)).save(
            os.path.join(folder, f"img_{i:05d}.png"))
    if target != root:
        if os.path.isdir(root):  # another writer won the race: keep its (identical) set
            shutil.rmtree(target)
        else:
            os.replace(target, root)
    return root
