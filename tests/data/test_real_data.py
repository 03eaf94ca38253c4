"""The real shared archives (CIFAR-10 JPEG copy, TinyImageNet subset) through the real loaders. Slow."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch

from lightning_fisher.data import CIFAR10DataModule, TinyImageNetDataModule
from lightning_fisher.data.cifar10 import CIFAR10_CLASSES

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("LIGHTNING_FISHER_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _extract(archive_name: str, destination: Path) -> Path:
    archive = SHARED_DATA / archive_name
    if not archive.is_file():
        pytest.skip(
            f"{archive} not found: the shared data folder (<repo>/../shared/data, or set "
            "LIGHTNING_FISHER_SHARED_DATA) is absent on this machine"
        )
    with tarfile.open(archive) as tar:
        tar.extractall(destination, filter="data")
    return destination


def test_cifar10_jpeg_copy(tmp_path: Path) -> None:
    data_dir = _extract("cifar10-jpeg.tar.gz", tmp_path)
    dm = CIFAR10DataModule(data_dir, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.locate() == ("folder", data_dir / "cifar10")
    assert dm.classes == CIFAR10_CLASSES
    assert dm.train_set.images.shape == (50_000, 3, 32, 32)
    assert torch.bincount(dm.train_set.labels).tolist() == [5_000] * 10
    assert torch.bincount(dm.test_set.labels).tolist() == [1_000] * 10
    # The documented normalisation constants fit this copy (measured on every 10th training image:
    # mean within 0.0022, std within 0.0009 of the constants).
    _check_statistics(dm.train_set.images[::10], dm.mean, dm.std, atol=0.01)
    images, labels = next(iter(dm.train_dataloader()))
    assert dm.transform_batch(images, train=True).shape == (128, 3, 32, 32)


def test_tiny_imagenet_subset(tmp_path: Path) -> None:
    data_dir = _extract("tiny-imagenet-200-sub100.tar.gz", tmp_path)
    dm = TinyImageNetDataModule(data_dir)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.locate() == data_dir / "tiny-imagenet-200"
    assert len(dm.classes) == dm.num_classes == 200
    assert dm.train_set.images.shape == (20_000, 3, 64, 64)
    assert torch.bincount(dm.train_set.labels, minlength=200).tolist() == [100] * 200
    assert dm.test_set.images.shape == (10_000, 3, 64, 64)
    assert torch.bincount(dm.test_set.labels, minlength=200).tolist() == [50] * 200
    # The constants were computed on this copy's training set (every 10th image: within 0.002).
    _check_statistics(dm.train_set.images[::10], dm.mean, dm.std, atol=0.01)


def _check_statistics(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], atol: float) -> None:
    pixels = images.transpose(0, 1).reshape(images.shape[1], -1).double().div(255)
    torch.testing.assert_close(pixels.mean(dim=1), torch.tensor(mean, dtype=torch.float64), atol=atol, rtol=0)
    torch.testing.assert_close(pixels.std(dim=1), torch.tensor(std, dtype=torch.float64), atol=atol, rtol=0)
