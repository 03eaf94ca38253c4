"""Random streams that are a function of (seed, epoch): a run resumed at an epoch boundary sees what an
uninterrupted run sees, with nothing to store in the checkpoint."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import RandomSampler

__all__ = ["EpochShuffle", "derive_seed"]


def derive_seed(*keys: int) -> int:
    """A seed in ``[0, 2**63)`` from integer ``keys`` (seed, rank, epoch, ...), well mixed: neighbouring
    keys give unrelated streams, unlike ``seed + epoch``, whose streams overlap shifted by one."""
    digest = hashlib.sha256(",".join(str(int(k)) for k in keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class EpochShuffle(RandomSampler):
    """A random order of ``range(size)`` drawn from ``(seed, epoch)`` alone.

    Lightning calls :meth:`set_epoch` at the start of every training epoch (as for a
    ``DistributedSampler``). A ``DataLoader(shuffle=True, generator=...)`` instead draws each epoch's order
    from a generator it advances, so a loader rebuilt after a resume replays epoch 0's order, and any
    extra pass over the loader (a Fisher estimate reading training batches) shifts every later epoch.
    Here every pass over the loader in one epoch yields the same order, whatever came before.

    A ``RandomSampler`` for Lightning's sake: under DDP it sees a shuffled loader and puts a
    ``DistributedSampler(shuffle=True)`` in its place, whose order is also a function of (seed, epoch).
    """

    def __init__(self, size: int, seed: int) -> None:
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"size={size!r}: must be an integer >= 0")
        super().__init__(range(size))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())
