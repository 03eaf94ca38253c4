"""In-memory image tensors, a Dataset that fetches whole batches by slicing them, and subsampling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ImageTensors", "TensorImageDataset", "collate_prebatched", "subsample_per_class"]


@dataclass(frozen=True)
class ImageTensors:
    """A decoded split: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``, class names."""

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images: dtype={self.images.dtype}, shape={tuple(self.images.shape)}: must be uint8 [N, C, H, W]"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels: dtype={self.labels.dtype}, shape={tuple(self.labels.shape)}: "
                f"must be int64 [{self.images.shape[0]}]"
            )


class TensorImageDataset(Dataset[tuple[Tensor, Tensor]]):
    """A map-style dataset over in-memory uint8 images whose batches are fetched with one slice.

    ``DataLoader`` calls ``__getitems__`` with the whole list of indices of a batch, so a batch is a
    single ``index_select`` instead of one ``__getitem__`` per image. Use it with
    ``collate_fn=collate_prebatched`` (the batch is already stacked).

    Args:
        images: uint8 ``[N, C, H, W]``.
        labels: int64 ``[N]``.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.shape[:1] != labels.shape:
            raise ValueError(f"images.shape={tuple(images.shape)}, labels.shape={tuple(labels.shape)}: lengths differ")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.images.index_select(0, idx), self.labels.index_select(0, idx)


def collate_prebatched(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The ``collate_fn`` for :class:`TensorImageDataset`: its batches come out already stacked."""
    return batch


def subsample_per_class(labels: Tensor, max_per_class: int, seed: int) -> Tensor:
    """Indices (ascending) of at most ``max_per_class`` examples of each class, chosen at random.

    The choice depends only on ``labels``, ``max_per_class`` and ``seed``.
    """
    if max_per_class < 1:
        raise ValueError(f"max_per_class={max_per_class}: must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(labels.numel(), generator=generator)
    order = torch.sort(labels[perm], stable=True).indices
    grouped = perm[order]  # random order within each class, classes contiguous
    sorted_labels = labels[grouped]
    _, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank_in_class = torch.arange(labels.numel()) - starts
    return torch.sort(grouped[rank_in_class < max_per_class]).values
