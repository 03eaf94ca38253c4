"""Tiny copies of the real on-disk formats (CIFAR-10 ImageFolder and pickles, tiny-imagenet-200)."""

from __future__ import annotations

import pickle
import shutil
import sys
from types import ModuleType
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_fisher.data.cifar10 import CIFAR10_CLASSES

TRAIN_PER_CLASS = 3
TEST_PER_CLASS = 2
NUM_WNIDS = 200
# TinyImageNet miniature: classes 0..2 get two training images, the others one; image 0 of class 1 is
# greyscale. Validation: (file, class index) pairs.
TIN_TWO_IMAGE_CLASSES = (0, 1, 2)
TIN_VAL = (("val_0.JPEG", 0), ("val_1.JPEG", 5), ("val_2.JPEG", 199), ("val_3.JPEG", 5))


def class_colour(label: int) -> tuple[int, int, int]:
    """A flat colour per class, far enough apart to survive JPEG: R encodes the label."""
    return (20 * label + 10, 128, 255 - 20 * label)


def write_image(path: Path, size: int, colour: tuple[int, int, int] | int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), colour).save(path)


def write_cifar_folder(root: Path) -> None:
    """``root/{train,test}/<class>/NNNN.jpg`` like the real archive; the test split uses PNG (upper-case suffix)."""
    for label, name in enumerate(CIFAR10_CLASSES):
        for i in range(TRAIN_PER_CLASS):
            write_image(root / "train" / name / f"{i:04d}.jpg", 32, class_colour(label))
        for i in range(TEST_PER_CLASS):
            write_image(root / "test" / name / f"{i:04d}.PNG", 32, class_colour(label))


def cifar_pickle_rows(labels: list[int], offset: int) -> np.ndarray:
    """uint8 [N, 3072] rows, channel-major like the real files; pixel (c, y, x) of row i is a known value."""
    n = len(labels)
    values = (np.arange(n)[:, None] * 7 + offset + np.arange(3072)[None, :]) % 256
    return values.astype(np.uint8)


def write_cifar_pickles(root: Path, train_per_batch: int = 2, test_rows: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    """torchvision's ``cifar-10-batches-py`` with a few rows per batch; returns what each file holds."""
    pickle_dir = root / "cifar-10-batches-py"
    pickle_dir.mkdir(parents=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        n = test_rows if name == "test_batch" else train_per_batch
        labels = [(b + i) % 10 for i in range(n)]
        data = cifar_pickle_rows(labels, offset=31 * b)
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
        with open(pickle_dir / name, "wb") as f:
            pickle.dump(entry, f)
        written[name] = (data, labels)
    meta = {b"num_cases_per_batch": 10000, b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    with open(pickle_dir / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    return written


def wnid(index: int) -> str:
    return f"n{index:08d}"


def write_tiny_imagenet(root: Path) -> None:
    """A miniature ``tiny-imagenet-200`` tree at ``root`` (all 200 wnids, 1-2 training images each)."""
    root.mkdir(parents=True)
    # 200 classes, then lines that must be ignored (a blank one and an extra id).
    (root / "wnids.txt").write_text("".join(f"{wnid(i)}\n" for i in range(NUM_WNIDS)) + "\nn99999999\n")
    (root / "words.txt").write_text("".join(f"{wnid(i)}\tthing {i}\n" for i in range(NUM_WNIDS)))
    for i in range(NUM_WNIDS):
        class_dir = root / "train" / wnid(i)
        count = 2 if i in TIN_TWO_IMAGE_CLASSES else 1
        for j in range(count):
            if i == 1 and j == 0:
                write_image(class_dir / "images" / f"{wnid(i)}_{j}.JPEG", 64, 200, mode="L")
            else:
                write_image(class_dir / "images" / f"{wnid(i)}_{j}.JPEG", 64, (i, 255 - i, 100))
        (class_dir / f"{wnid(i)}_boxes.txt").write_text("".join(f"{wnid(i)}_{j}.JPEG\t0\t0\t63\t63\n" for j in range(count)))
    lines = []
    for name, label in TIN_VAL:
        write_image(root / "val" / "images" / name, 64, (label, 255 - label, 100))
        lines.append(f"{name}\t{wnid(label)}\t1\t2\t60\t61\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))


# Taken at import time: later, sys.modules["conftest"] is whichever conftest pytest imported last.
_THIS_MODULE = sys.modules[__name__]


@pytest.fixture(scope="session")
def fmt() -> ModuleType:
    """This module: the writers and constants above, for tests (importing a conftest is ambiguous)."""
    return _THIS_MODULE


@pytest.fixture(scope="session")
def _cifar_folder_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar_folder_source")
    write_cifar_folder(root)
    return root


@pytest.fixture(scope="session")
def _tiny_imagenet_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tin_source") / "tiny-imagenet-200"
    write_tiny_imagenet(root)
    return root


@pytest.fixture
def cifar_folder_dir(tmp_path: Path, _cifar_folder_source: Path) -> Path:
    """A data_dir holding ``train/`` and ``test/`` directly (a fresh copy, so caches do not leak)."""
    shutil.copytree(_cifar_folder_source, tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def cifar_nested_dir(tmp_path: Path, _cifar_folder_source: Path) -> Path:
    """A data_dir holding ``cifar10/{train,test}`` (what extracting the shared archive gives)."""
    shutil.copytree(_cifar_folder_source, tmp_path / "data" / "cifar10")
    return tmp_path / "data"


@pytest.fixture
def tiny_imagenet_dir(tmp_path: Path, _tiny_imagenet_source: Path) -> Path:
    """A data_dir holding ``tiny-imagenet-200/``."""
    shutil.copytree(_tiny_imagenet_source, tmp_path / "data" / "tiny-imagenet-200")
    return tmp_path / "data"
