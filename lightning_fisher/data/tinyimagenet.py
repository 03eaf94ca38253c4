"""TinyImageNet-200 from the standard ``tiny-imagenet-200`` directory layout."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from lightning_fisher.data.base import ImageDataModule, Split
from lightning_fisher.data.cache import cached_split, fingerprint_files
from lightning_fisher.data.dataset import ImageTensors
from lightning_fisher.data.decode import decode_images, list_images

__all__ = ["TinyImageNetDataModule", "read_wnids"]

log = logging.getLogger(__name__)

DIRNAME = "tiny-imagenet-200"
NUM_CLASSES = 200


class TinyImageNetDataModule(ImageDataModule):
    """TinyImageNet-200 (Le & Yang, 2015, "Tiny ImageNet Visual Recognition Challenge"): 200 classes, 64x64 RGB.

    The standard layout, found either at ``data_dir`` itself or at ``data_dir/tiny-imagenet-200/``:
    ``wnids.txt`` (the first 200 lines are the class ids; their order gives the label ids),
    ``train/<wnid>/images/*.JPEG`` and ``val/images/*.JPEG`` with ``val/val_annotations.txt``
    (tab-separated: file name, wnid, bounding box). Classes may hold fewer than the usual 500
    training images. Greyscale JPEGs are converted to RGB. There is no download: a
    ``FileNotFoundError`` names the searched directories when the layout is missing.

    The labelled ``val`` split (10,000 images) serves as both validation and test split (the
    official test split has no labels). The decoded tensors are cached in
    ``<data_dir>/.lightning_fisher_cache/``. Normalisation uses TinyImageNet's own per-channel
    statistics, computed on the 20,000 training images of the shared ``tiny-imagenet-200-sub100``
    copy: mean (0.4791, 0.4474, 0.3971), std (0.2766, 0.2693, 0.2818) (within 0.002 of the values
    usually quoted for the full training set; ImageNet's std, 0.229/0.224/0.225, is too small for
    these images). Training augmentation: random crop 64 with 8 pixels of zero padding (the same
    1/8 of the side as CIFAR's 4 of 32), random horizontal flip.

    Args:
        data_dir: the directory to search (Hydra key ``data.data_dir``).
        **kwargs: the common arguments of :class:`~lightning_fisher.data.base.ImageDataModule`.
    """

    name = "tinyimagenet"
    num_classes = NUM_CLASSES
    num_channels = 3
    image_size = 64
    mean = (0.4791, 0.4474, 0.3971)
    std = (0.2766, 0.2693, 0.2818)
    crop_padding = 8
    horizontal_flip = True

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        max_per_class: int | None = None,
        augment: bool = True,
    ) -> None:
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

    def locate(self) -> Path:
        """The ``tiny-imagenet-200`` root: ``data_dir`` or ``data_dir/tiny-imagenet-200``."""
        if self.data_dir is None:  # unreachable: the constructor requires data_dir
            raise RuntimeError("data_dir is not set")
        candidates = (self.data_dir, self.data_dir / DIRNAME)
        for root in candidates:
            if (root / "wnids.txt").is_file() and (root / "train").is_dir() and (root / "val").is_dir():
                return root
        raise FileNotFoundError(
            f"TinyImageNet not found in data_dir={os.fspath(self.data_dir)!r}: searched "
            f"{' and '.join(map(str, candidates))} for wnids.txt, train/ and val/. Accepted layout: the standard "
            f"'{DIRNAME}' tree (wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt), "
            f"either as data_dir itself or as data_dir/{DIRNAME}/ (what `tar -xzf tiny-imagenet-200*.tar.gz` "
            "produces); it is not downloaded. Set the location with data.data_dir=/path/to/data "
            "(or the data_dir argument)."
        )

    def _load_split(self, split: Split) -> ImageTensors:
        root = self.locate()
        wnids = read_wnids(root / "wnids.txt")
        if split == "train":
            paths, labels = _list_train(root, wnids)
            extra = [root / "wnids.txt"]
        else:
            paths, labels = _list_val(root, wnids)
            extra = [root / "wnids.txt", root / "val" / "val_annotations.txt"]

        def decode() -> ImageTensors:
            images = decode_images(paths, self.image_size, mode="RGB")
            return ImageTensors(images, torch.tensor(labels, dtype=torch.int64), wnids)

        fingerprint = fingerprint_files([*extra, *paths], root)
        if self.data_dir is None:  # unreachable: the constructor requires data_dir
            raise RuntimeError("data_dir is not set")
        return cached_split(self.data_dir, self.name, split, fingerprint, decode)


def read_wnids(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The 200 class ids: the first 200 lines of ``wnids.txt``, stripped (later lines are ignored)."""
    with open(path) as f:
        wnids = tuple(line.strip() for _, line in zip(range(NUM_CLASSES), f))
    if len(wnids) != NUM_CLASSES or not all(wnids) or len(set(wnids)) != NUM_CLASSES:
        raise RuntimeError(f"{path}: the first {NUM_CLASSES} lines must be {NUM_CLASSES} distinct, non-empty wnids")
    return wnids


def _list_train(root: Path, wnids: tuple[str, ...]) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        image_dir = root / "train" / wnid / "images"
        if not image_dir.is_dir():
            raise RuntimeError(f"TinyImageNet: missing training folder {image_dir} for class {wnid}")
        files = list_images(image_dir)
        if not files:
            log.warning("TinyImageNet: no training images in %s", image_dir)
        paths += files
        labels += [label] * len(files)
    return paths, labels


def _list_val(root: Path, wnids: tuple[str, ...]) -> tuple[list[Path], list[int]]:
    index = {wnid: label for label, wnid in enumerate(wnids)}
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise RuntimeError(f"TinyImageNet: missing {annotations} (the validation labels)")
    paths: list[Path] = []
    labels: list[int] = []
    with open(annotations) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise RuntimeError(f"{annotations}:{line_no}: expected 'file<TAB>wnid<TAB>box', got {line.rstrip()!r}")
            paths.append(root / "val" / "images" / fields[0])
            labels.append(index[fields[1]])
    if not paths:
        raise RuntimeError(f"{annotations}: no annotated images")
    return paths, labels
