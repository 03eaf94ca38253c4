"""scikit-learn's bundled 8x8 handwritten digits, for the CPU quickstart."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch import Tensor

from lightning_fisher.data.base import ImageDataModule, Split
from lightning_fisher.data.dataset import ImageTensors

__all__ = ["DigitsDataModule", "load_digits_uint8", "stratified_split"]

log = logging.getLogger(__name__)


class DigitsDataModule(ImageDataModule):
    """Handwritten digits (Alpaydin & Kaynak, 1998, UCI "Optical Recognition of Handwritten Digits"): 10 classes, 8x8 grey.

    The 1,797 images bundled with scikit-learn (``sklearn.datasets.load_digits``, values 0..16,
    scaled here to 0..255), so nothing is downloaded and ``data_dir`` is not needed. The train/test
    split is stratified and drawn by ``seed``; validation and test both use the test part.
    Normalisation uses the statistics of all 1,797 images on the 0..1 scale, mean 0.3053 and std
    0.3759. Training augmentation: random crop 8 with 1 pixel of zero padding; no flip (a mirrored
    digit is another symbol).

    Args:
        data_dir: ignored (kept so that every data config has the key); may be ``None``.
        test_fraction: share of each class held out for testing, in (0, 1); every class keeps at
            least one image on each side.
        **kwargs: the common arguments of :class:`~lightning_fisher.data.base.ImageDataModule`.
    """

    name = "digits"
    num_classes = 10
    num_channels = 1
    image_size = 8
    mean = (0.3053,)
    std = (0.3759,)
    crop_padding = 1
    horizontal_flip = False
    requires_data_dir = False

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        test_fraction: float = 0.2,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        max_per_class: int | None = None,
        augment: bool = True,
    ) -> None:
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction={test_fraction!r}: must be a number in (0, 1)")
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
        self.test_fraction = float(test_fraction)

    def _load_split(self, split: Split) -> ImageTensors:
        images, labels = load_digits_uint8()
        is_test = stratified_split(labels, self.test_fraction, self.seed)
        keep = is_test if split == "test" else ~is_test
        classes = tuple(str(d) for d in range(self.num_classes))
        return ImageTensors(images[keep].contiguous(), labels[keep].contiguous(), classes)


def load_digits_uint8() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as uint8 ``[N, 1, 8, 8]`` (0..16 scaled to 0..255) and int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return torch.from_numpy(pixels).unsqueeze(1), torch.from_numpy(bunch.target.astype(np.int64))


def stratified_split(labels: Tensor, test_fraction: float, seed: int) -> Tensor:
    """A boolean mask of test examples: ``round(test_fraction * n_c)`` random ones of each class.

    Each class keeps at least one example on each side (when it has two or more).
    """
    generator = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(labels.numel(), dtype=torch.bool)
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        n = members.numel()
        n_test = min(max(round(test_fraction * n), 1), n - 1) if n > 1 else 0
        chosen = members[torch.randperm(n, generator=generator)[:n_test]]
        is_test[chosen] = True
    return is_test
