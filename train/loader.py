"""What the CPU data sources share: the unreadable-image policy and the resumable, world-size-independent loader.

    class MyDataset(ReplacingDataset):            # len, labels, label_source, resolution, max_bad_images
        def load(self, i): ...                    # uint8 [3, R, R], raises on a bad image
        def name(self, i): ...                    # relpath or key, for the logs
    class MySource(IndexedSource):
        def __init__(self, ..., **kw): super().__init__(lambda: MyDataset(...), what="...", **kw)

Holds: `Sample`, `collate_samples`, the replacement loop of `ReplacingDataset` (index i that fails to decode is
replaced by the next readable index i+1, i+2, ... mod n, so the replacement depends only on the data, never on
the worker count or the world size), and `IndexedSource` (DataLoader workers in the order of train/sharding.py,
the bad-image log and threshold, the label check, state_dict / load_state_dict). Must not hold how an image is
found or decoded: train/data.py (class folders) and train/h5_data.py (the original's HDF5 file) do that.
"""

# B batch (this rank), G global batch, R resolution; in formulas n images

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from .preemption import shield_loader_worker
from .sharding import RankBatchSampler

DEFAULT_MAX_BAD_IMAGES = 100
"""Unreadable files one rank may skip before the run stops (the default of config key data.max_bad_images)."""


def failure_reason(err: BaseException) -> str:
    """One short line for a decode failure: 'OSError: image file is truncated'."""
    text = " ".join(str(err).split()) or "no message"
    return f"{type(err).__name__}: {text[:200]}"


class Sample(NamedTuple):
    """One dataset item: the image actually used, its label and index, and the unreadable files skipped to it."""

    image: torch.Tensor  # uint8 (3, R, R)
    label: int
    index: int  # the index decoded (the requested one unless it was unreadable); -1: none readable within reach
    bad: tuple[tuple[int, str], ...]  # (index, reason) of each unreadable file skipped, in probe order


class ReplacingDataset(Dataset):
    """Index -> Sample; an image that cannot be decoded is replaced by the next readable index.

    A subclass sets `labels` (int64 numpy [n]), `label_source` (words for error messages), `resolution` and
    `max_bad_images`, and defines `__len__`, `load(i)` and `name(i)`.
    """

    labels: np.ndarray
    label_source: str
    resolution: int
    max_bad_images: int

    def load(self, index: int) -> torch.Tensor:
        """uint8 [3, R, R] of image `index`; raises on an unreadable image."""
        raise NotImplementedError

    def name(self, index: int) -> str:
        """The image's name in the logs (a relpath, an HDF5 key)."""
        raise NotImplementedError

    def path(self, index: int) -> str:
        """Where the image is, for a person reading the log."""
        return self.name(index)

    def __getitem__(self, index: int) -> Sample:
        """Decode `index`, or the first readable of index+1, index+2, ... (mod n) if it cannot be read.

        At most max_bad_images + 1 images are probed (never more than n): past that the main process stops
        the run anyway, and the sample comes back with index -1 and a zero image.
        """
        bad = []
        for offset in range(min(len(self), self.max_bad_images + 1)):
            i = (index + offset) % len(self)
            try:
                image = self.load(i)
            # PIL raises OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error, ... depending on
            # where the bytes break; any failure of one image's decode is that image's fault, so all are caught.
            except Exception as err:  # noqa: BLE001
                bad.append((i, failure_reason(err)))
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


class IndexedSource:
    """A ReplacingDataset as this rank's slices of world-size-independent global batches, resumable."""

    def __init__(self, make_dataset: Callable[[], ReplacingDataset], *, root: str, resolution: int, what: str,
                 global_batch_size: int, rank: int, world_size: int, seed: int, num_workers: int = 4,
                 drop_last: bool = True, max_bad_images: int = DEFAULT_MAX_BAD_IMAGES, prefetch: int = 2):
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
        self.dataset = make_dataset()
        self.prefetch = prefetch
        self.last_indices: torch.Tensor | None = None
        """Dataset indices (int64 [B]) of the batch next_batch() returned last, after unreadable files were replaced."""
        self.max_bad_images = max_bad_images
        # Distinct unreadable images this rank has met (name -> reason), each logged once. Not in state_dict:
        # after a resume the same images are met again and counted once again, so the count stays distinct.
        self.bad_images: dict[str, str] = {}
        self._last_bad = ""  # "path: reason" of the last image added to bad_images
        self.root, self.resolution, self.seed = root, resolution, seed
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.num_workers, self.drop_last = num_workers, drop_last
        if drop_last and self.num_images < global_batch_size:
            raise ValueError(f"{what} holds {self.num_images} images, fewer than "
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
        """Distinct unreadable images this rank has skipped so far (each replaced by the next readable one)."""
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
        if self.num_workers > 0:
            # Collected here, not in a forked worker: garbage owning native threads (a DALI pipeline from earlier
            # in the process) would be destroyed in the child, whose copy of those threads does not exist, and its
            # destructor would wait on them for ever (seen: a worker stuck in DALI's Executor2 destructor).
            gc.collect()
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            collate_fn=collate_samples, pin_memory=torch.cuda.is_available(),
                            persistent_workers=False, worker_init_fn=shield_loader_worker,
                            prefetch_factor=self.prefetch if self.num_workers > 0 else None)
        return iter(loader)

    def _note_bad(self, bad: tuple, indices_B: torch.Tensor) -> None:
        """Log each new unreadable image once (rank, path, reason, replacement); stop past max_bad_images."""
        for i, reason, used in bad:
            name = self.dataset.name(i)
            if name in self.bad_images:
                continue
            self.bad_images[name] = reason
            self._last_bad = f"{self.dataset.path(i)}: {reason}"
            instead = f"replaced by {self.dataset.name(used)}" if used >= 0 else "no replacement"
            print(f"[repae] rank {self.rank}: skipped unreadable image {self.dataset.path(i)} ({reason}); {instead} "
                  f"[{self.num_bad_images} so far, data.max_bad_images={self.max_bad_images}]", flush=True)
        if self.num_bad_images > self.max_bad_images:
            raise ValueError(f"{self.num_bad_images} unreadable images on rank {self.rank} exceed "
                             f"data.max_bad_images={self.max_bad_images} (last: {self._last_bad}); "
                             f"fix or remove the files, or raise data.max_bad_images")
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
