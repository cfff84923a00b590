"""The batch order of every data source: world-size independent and resumable.

Epoch e permutes all n images with `torch.Generator().manual_seed(seed + e)`; global batch k is
perm[k*G:(k+1)*G] (the last partial batch dropped), and rank r takes the contiguous slice [r*G/world:(r+1)*G/world].
Concatenating the ranks' slices gives the global batch, so one rank with batch G and `world` ranks with G/world each see
the same images in the same order; the position (epoch, batch) is all a resume needs.
"""

# G global batch; in formulas n images, r rank, world the world size

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def epoch_permutation(num_images: int, seed: int, epoch: int) -> torch.Tensor:
    """The image order of one epoch: randperm(n) from a CPU generator seeded with seed + epoch (int64 [n])."""
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed + epoch))


def rank_slice(global_batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Contiguous slice of rank r: [r*G/world:(r+1)*G/world] (a partial last batch is split as evenly as possible)."""
    n = global_batch.numel()
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    return global_batch[lo:hi]


class RankBatchSampler(Sampler):
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
        perm = None
        while True:
            if batch >= self.steps_per_epoch:
                epoch, batch, perm = epoch + 1, 0, None
            if perm is None:  # one randperm per epoch, not per batch
                perm = epoch_permutation(self.num_images, self.seed, epoch)
            yield rank_slice(perm[batch * G:(batch + 1) * G], self.rank, self.world_size).tolist()
            batch += 1
