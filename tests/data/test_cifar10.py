"""CIFAR10DataModule on tiny copies of the real layouts: ImageFolder (two placements), pickles, download."""

from __future__ import annotations

import urllib.error
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import lightning_fisher.data.cifar10 as cifar10_module
from lightning_fisher.data import CIFAR10DataModule
from lightning_fisher.data.cache import CACHE_DIRNAME
from lightning_fisher.data.cifar10 import CIFAR10_CLASSES


def test_attributes_before_setup(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(tmp_path / "nowhere", download=False)
    assert (dm.num_classes, dm.num_channels, dm.image_size) == (10, 3, 32)
    assert dm.mean == (0.4914, 0.4822, 0.4465) and dm.std == (0.2470, 0.2435, 0.2616)
    assert dm.hparams["download"] is False and dm.hparams["batch_size"] == 128


@pytest.mark.parametrize("layout", ["cifar_folder_dir", "cifar_nested_dir"])
def test_image_folder_layouts(layout: str, request: pytest.FixtureRequest, fmt: ModuleType) -> None:
    data_dir = request.getfixturevalue(layout)
    dm = CIFAR10DataModule(str(data_dir), download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.locate()[0] == "folder"
    assert dm.classes == CIFAR10_CLASSES
    train, test = dm.train_set, dm.test_set
    assert train.images.shape == (10 * fmt.TRAIN_PER_CLASS, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (10 * fmt.TEST_PER_CLASS, 3, 32, 32)
    assert train.labels.dtype == torch.int64
    assert torch.bincount(train.labels).tolist() == [fmt.TRAIN_PER_CLASS] * 10
    # Alphabetical folder i is label i: the red channel encodes the class the image was written for.
    for ds in (train, test):
        red = ds.images[:, 0].float().mean(dim=(1, 2))
        expected = torch.tensor([fmt.class_colour(int(y))[0] for y in ds.labels], dtype=torch.float32)
        torch.testing.assert_close(red, expected, atol=3, rtol=0)  # JPEG on flat colours: measured error <= 1
    assert (data_dir / CACHE_DIRNAME).is_dir()


def test_cache_is_used_on_second_construction(cifar_nested_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = CIFAR10DataModule(cifar_nested_dir, download=False)
    first.prepare_data()
    first.setup("fit")
    assert len(list((cifar_nested_dir / CACHE_DIRNAME).glob("cifar10-*.pt"))) == 2

    def no_decoding(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(cifar10_module, "decode_images", no_decoding)
    second = CIFAR10DataModule(cifar_nested_dir, download=False)
    second.setup("fit")
    assert torch.equal(second.train_set.images, first.train_set.images)
    assert torch.equal(second.test_set.labels, first.test_set.labels)
    # A changed file list changes the fingerprint, so the stale cache is not used.
    extra = cifar_nested_dir / "cifar10" / "train" / "cat" / "0099.jpg"
    extra.write_bytes((cifar_nested_dir / "cifar10" / "train" / "cat" / "0000.jpg").read_bytes())
    with pytest.raises(AssertionError, match="decoded again"):
        CIFAR10DataModule(cifar_nested_dir, download=False).setup("fit")


def test_pickle_layout(tmp_path: Path, fmt: ModuleType) -> None:
    written = fmt.write_cifar_pickles(tmp_path)
    dm = CIFAR10DataModule(tmp_path, download=False)
    dm.setup()
    assert dm.locate() == ("pickle", tmp_path / "cifar-10-batches-py")
    train_rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert torch.equal(dm.train_set.images, torch.from_numpy(train_rows).view(-1, 3, 32, 32))
    assert dm.train_set.labels.tolist() == train_labels
    assert torch.equal(dm.test_set.images, torch.from_numpy(written["test_batch"][0]).view(-1, 3, 32, 32))
    # Channel-major rows: entry 1024 of a row is channel 1, pixel (0, 0).
    assert int(dm.test_set.images[0, 1, 0, 0]) == int(written["test_batch"][0][0, 1024])
    assert dm.classes == CIFAR10_CLASSES
    assert not (tmp_path / CACHE_DIRNAME).exists()  # nothing to decode, nothing cached


def test_pickles_take_precedence_over_folders(cifar_folder_dir: Path, fmt: ModuleType) -> None:
    fmt.write_cifar_pickles(cifar_folder_dir, train_per_batch=1, test_rows=4)
    dm = CIFAR10DataModule(cifar_folder_dir, download=False)
    dm.setup()
    assert dm.locate()[0] == "pickle"
    assert len(dm.train_set) == 5 and len(dm.test_set) == 4


def test_missing_data_without_download(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(tmp_path, download=False)
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert f"CIFAR-10 not found in data_dir={str(tmp_path)!r}" in message
    for needle in (
        str(tmp_path / "cifar-10-batches-py"),
        f"{tmp_path / 'cifar10'}/{{train,test}}",
        "download=False",
        "data_batch_1",
        "train/<class>/*.jpg|png",
        "data.data_dir=/path/to/data",
    ):
        assert needle in message


def test_failed_download_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(root):  # noqa: ANN001, ANN202
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar10_module, "download_cifar10", offline)
    with pytest.raises(RuntimeError, match=r"The download failed: URLError.*data\.data_dir=/path/to/data"):
        CIFAR10DataModule(tmp_path).setup()


def test_download_then_pickles_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: ModuleType) -> None:
    calls = []

    def fake_download(root):  # noqa: ANN001, ANN202
        calls.append(Path(root))
        fmt.write_cifar_pickles(Path(root))

    monkeypatch.setattr(cifar10_module, "download_cifar10", fake_download)
    dm = CIFAR10DataModule(tmp_path, download=True)
    dm.prepare_data()
    dm.setup()
    assert calls == [tmp_path]
    assert len(dm.train_set) == 10 and len(dm.test_set) == 3


def test_wrong_number_of_class_folders(tmp_path: Path, fmt: ModuleType) -> None:
    for split in ("train", "test"):
        fmt.write_image(tmp_path / split / "only_class" / "0.png", 32, (0, 0, 0))
    with pytest.raises(RuntimeError, match=r"found 1 class folders \('only_class',\), expected 10"):
        CIFAR10DataModule(tmp_path, download=False).setup()


def test_wrong_image_size(cifar_folder_dir: Path, fmt: ModuleType) -> None:
    fmt.write_image(cifar_folder_dir / "test" / "cat" / "big.png", 40, (0, 0, 0))
    with pytest.raises(RuntimeError, match=r"big.png: image is 40x40, expected 32x32"):
        CIFAR10DataModule(cifar_folder_dir, download=False).setup("test")


def test_download_must_be_bool(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"download='no': must be True or False"):
        CIFAR10DataModule(tmp_path, download="no")
