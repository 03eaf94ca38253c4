"""TensorImageDataset (batched fetch), ImageTensors checks, per-class subsampling."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_fisher.data.dataset import ImageTensors, TensorImageDataset, collate_prebatched, subsample_per_class


def _dataset(n: int = 10) -> TensorImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return TensorImageDataset(images, torch.arange(n) % 3)


def test_getitems_returns_a_stacked_batch() -> None:
    ds = _dataset()
    images, labels = ds.__getitems__([4, 1, 7])
    assert images.shape == (3, 1, 2, 2) and images.dtype == torch.uint8
    assert images[:, 0, 0, 0].tolist() == [4, 1, 7] and labels.tolist() == [1, 1, 1]
    image, label = ds[5]
    assert image.shape == (1, 2, 2) and int(image[0, 0, 0]) == 5 and int(label) == 2
    assert len(ds) == 10


def test_loader_fetches_whole_batches_without_getitem(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _dataset()

    def no_single_fetch(self, index):  # noqa: ANN001, ANN202
        raise AssertionError("per-image __getitem__ must not be used")

    monkeypatch.setattr(TensorImageDataset, "__getitem__", no_single_fetch)
    batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_prebatched))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert torch.cat([b[0][:, 0, 0, 0] for b in batches]).tolist() == list(range(10))


def test_dataset_length_mismatch() -> None:
    with pytest.raises(ValueError, match=r"images.shape=\(3, 1, 2, 2\), labels.shape=\(2,\): lengths differ"):
        TensorImageDataset(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))


def test_image_tensors_checks_dtypes() -> None:
    with pytest.raises(ValueError, match=r"images: dtype=torch.float32, shape=\(2, 1, 2, 2\): must be uint8"):
        ImageTensors(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64), ("a",))
    with pytest.raises(ValueError, match=r"labels: dtype=torch.int32, shape=\(2,\): must be int64 \[2\]"):
        ImageTensors(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32), ("a",))


def test_subsample_per_class() -> None:
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)[torch.randperm(20, generator=torch.Generator().manual_seed(3))]
    keep = subsample_per_class(labels, 4, seed=0)
    assert torch.bincount(labels[keep]).tolist() == [4, 3, 4]
    assert torch.equal(keep, torch.sort(keep).values) and keep.unique().numel() == keep.numel()
    assert torch.equal(keep, subsample_per_class(labels, 4, seed=0))  # deterministic
    others = [subsample_per_class(labels, 4, seed=s) for s in range(1, 6)]
    assert any(not torch.equal(keep, o) for o in others)  # and depends on the seed
    assert torch.equal(subsample_per_class(labels, 100, seed=0), torch.arange(20))
    with pytest.raises(ValueError, match=r"max_per_class=0: must be >= 1"):
        subsample_per_class(labels, 0, seed=0)
