"""CIFAR-10 from torchvision's pickle batches or from an ImageFolder tree of JPEG/PNG files."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lightning_fisher.data.base import ImageDataModule, Split
from lightning_fisher.data.checks import check_bool
from lightning_fisher.data.cache import cached_split, fingerprint_files
from lightning_fisher.data.dataset import ImageTensors
from lightning_fisher.data.decode import decode_images, list_image_folder

__all__ = ["CIFAR10_CLASSES", "CIFAR10DataModule"]

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PICKLE_DIRNAME = "cifar-10-batches-py"
PICKLE_FILES: dict[Split, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
META_FILE = "batches.meta"
Layout = Literal["pickle", "folder"]


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (Krizhevsky, 2009, "Learning Multiple Layers of Features from Tiny Images"): 10 classes, 32x32 RGB.

    Layouts accepted, searched in this order:

    1. torchvision's ``<data_dir>/cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``,
       ``test_batch``, ``batches.meta``), read directly (no decoding, so no cache);
    2. an ImageFolder tree ``train/<class>/*`` and ``test/<class>/*`` (JPEG or PNG) directly under
       ``data_dir`` or under ``data_dir/cifar10/`` (what ``tar -xzf cifar10-jpeg.tar.gz`` gives).
       The class folders in alphabetical order are the label ids 0-9 (CIFAR-10's own order). The
       decoded tensors are cached in ``<data_dir>/.lightning_fisher_cache/``;
    3. otherwise, with ``download=True``, torchvision's ``CIFAR10(download=True)`` into ``data_dir``.

    When none is found a ``FileNotFoundError`` (``RuntimeError`` if the download failed) names the
    searched directory and the accepted layouts. Validation and test both use the 10,000-image test
    split. Normalisation uses CIFAR-10's usual per-channel training-set statistics,
    mean (0.4914, 0.4822, 0.4465) and std (0.2470, 0.2435, 0.2616). Training augmentation: random
    crop 32 with 4 pixels of zero padding, random horizontal flip.

    Args:
        data_dir: the directory to search (Hydra key ``data.data_dir``).
        download: download with torchvision when no layout is found.
        **kwargs: the common arguments of :class:`~lightning_fisher.data.base.ImageDataModule`
            (``batch_size``, ``eval_batch_size``, ``num_workers``, ``pin_memory``, ``seed``,
            ``max_per_class``, ``augment``).
    """

    name = "cifar10"
    num_classes = 10
    num_channels = 3
    image_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    crop_padding = 4
    horizontal_flip = True

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        download: bool = True,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        max_per_class: int | None = None,
        augment: bool = True,
    ) -> None:
        check_bool("download", download)
        super().__init__(
            data_dir,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
            max_per_class=max_per_class,
            augment=augment,
        )
        self.download = download
        self._layout: tuple[Layout, Path] | None = None

    def locate(self) -> tuple[Layout, Path]:
        """Finds the data (downloading it if allowed): ``("pickle", dir)`` or ``("folder", root)``."""
        if self._layout is None:
            self._layout = self._find() or self._download()
        return self._layout

    def _find(self) -> tuple[Layout, Path] | None:
        if _has_pickles(self._pickle_dir):
            return "pickle", self._pickle_dir
        for root in self._folder_roots:
            if (root / "train").is_dir() and (root / "test").is_dir():
                return "folder", root
        return None

    @property
    def _pickle_dir(self) -> Path:
        return self._root / PICKLE_DIRNAME

    @property
    def _folder_roots(self) -> tuple[Path, Path]:
        return self._root, self._root / "cifar10"

    @property
    def _root(self) -> Path:
        if self.data_dir is None:  # unreachable: the constructor requires data_dir
            raise RuntimeError("data_dir is not set")
        return self.data_dir

    def _download(self) -> tuple[Layout, Path]:
        if not self.download:
            raise FileNotFoundError(self._missing_message("download=False, so nothing was downloaded."))
        log.info("CIFAR-10 not found in %s; downloading it with torchvision", self._root)
        try:
            download_cifar10(self._root)
        except Exception as exc:
            raise RuntimeError(self._missing_message(f"The download failed: {exc!r}.")) from exc
        if not _has_pickles(self._pickle_dir):
            raise RuntimeError(self._missing_message(f"The download finished but {self._pickle_dir} is incomplete."))
        return "pickle", self._pickle_dir

    def _missing_message(self, reason: str) -> str:
        roots = " and ".join(f"{r}/{{train,test}}" for r in self._folder_roots)
        return (
            f"CIFAR-10 not found in data_dir={os.fspath(self._root)!r}: searched {self._pickle_dir} and {roots}. "
            f"{reason} Accepted layouts: (1) torchvision's '{PICKLE_DIRNAME}/' with "
            f"{', '.join(PICKLE_FILES['train'] + PICKLE_FILES['test'])} and {META_FILE}; "
            "(2) an ImageFolder tree train/<class>/*.jpg|png and test/<class>/*.jpg|png directly under data_dir "
            "or under data_dir/cifar10/ (what `tar -xzf cifar10-jpeg.tar.gz` produces); "
            "(3) download=True with network access. "
            "Set the location with data.data_dir=/path/to/data (or the data_dir argument)."
        )

    def _load_split(self, split: Split) -> ImageTensors:
        layout, path = self.locate()
        if layout == "pickle":
            return read_cifar10_pickles(path, split)
        split_dir = path / split
        paths, labels, classes = list_image_folder(split_dir)
        if len(classes) != self.num_classes:
            raise RuntimeError(f"{split_dir}: found {len(classes)} class folders {classes}, expected {self.num_classes}")
        if not paths:
            raise RuntimeError(f"{split_dir}: no .jpg/.jpeg/.png images in its class folders")
        if classes != CIFAR10_CLASSES:
            log.warning("%s: class folders %s are not CIFAR-10's names; labels follow their sorted order", split_dir, classes)

        def decode() -> ImageTensors:
            images = decode_images(paths, self.image_size, mode="RGB")
            return ImageTensors(images, torch.tensor(labels, dtype=torch.int64), classes)

        return cached_split(self._root, self.name, split, fingerprint_files(paths, split_dir), decode)


def download_cifar10(root: str | os.PathLike[str]) -> None:
    """Downloads and extracts CIFAR-10's python batches into ``root/cifar-10-batches-py`` (torchvision)."""
    from torchvision.datasets import CIFAR10

    CIFAR10(root=os.fspath(root), train=True, download=True)


def read_cifar10_pickles(pickle_dir: str | os.PathLike[str], split: Split) -> ImageTensors:
    """Reads torchvision's CIFAR-10 pickle batches of ``split`` into uint8 ``[N, 3, 32, 32]`` and labels.

    Each batch file is a pickled dict with ``data`` (uint8 ``[N, 3072]``, channel-major rows) and
    ``labels`` (a list of ints); ``batches.meta`` holds ``label_names``. Keys may be ``str`` or
    ``bytes`` (the original files were written by Python 2).
    """
    pickle_dir = Path(pickle_dir)
    images, labels = [], []
    for name in PICKLE_FILES[split]:
        entry = _unpickle(pickle_dir / name)
        data = np.asarray(_get(entry, "data", pickle_dir / name), dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.extend(_get(entry, "labels", pickle_dir / name))
    meta = _unpickle(pickle_dir / META_FILE)
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in _get(meta, "label_names", pickle_dir / META_FILE))
    return ImageTensors(
        torch.from_numpy(np.concatenate(images)).contiguous(), torch.tensor(labels, dtype=torch.int64), classes
    )


def _has_pickles(pickle_dir: Path) -> bool:
    names = PICKLE_FILES["train"] + PICKLE_FILES["test"] + (META_FILE,)
    return all((pickle_dir / name).is_file() for name in names)


def _unpickle(path: Path) -> dict[Any, Any]:
    with open(path, "rb") as f:
        # The files are trusted data set files in torchvision's format; torchvision reads them the same way.
        return pickle.load(f, encoding="latin1")


def _get(entry: dict[Any, Any], key: str, path: Path) -> Any:
    for k in (key, key.encode()):
        if k in entry:
            return entry[k]
    raise RuntimeError(f"{path}: no {key!r} entry (keys: {sorted(map(str, entry))})")
