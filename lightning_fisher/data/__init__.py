"""DataModules for CIFAR-10, TinyImageNet-200 and scikit-learn's digits: in-memory uint8 tensors, batched augmentation."""

from lightning_fisher.data.augment import BatchAugment
from lightning_fisher.data.base import ImageDataModule
from lightning_fisher.data.cifar10 import CIFAR10DataModule
from lightning_fisher.data.dataset import TensorImageDataset
from lightning_fisher.data.digits import DigitsDataModule
from lightning_fisher.data.sampling import EpochShuffle
from lightning_fisher.data.tinyimagenet import TinyImageNetDataModule

__all__ = [
    "BatchAugment",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "EpochShuffle",
    "ImageDataModule",
    "TensorImageDataset",
    "TinyImageNetDataModule",
]
