"""The DataModule base shared by every data set: argument checks, in-memory splits, loaders, GPU augmentation."""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_fisher.data.augment import BatchAugment
from lightning_fisher.data.checks import check_bool, check_int
from lightning_fisher.data.dataset import ImageTensors, TensorImageDataset, collate_prebatched, subsample_per_class
from lightning_fisher.data.sampling import EpochShuffle, derive_seed

__all__ = ["SPLITS", "ImageDataModule", "Split"]

log = logging.getLogger(__name__)

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")


class ImageDataModule(L.LightningDataModule, ABC):
    """Image classification data held in memory as uint8 tensors, augmented batch-wise after transfer.

    Each split is decoded once into a uint8 ``[N, C, H, W]`` tensor plus int64 labels (subclasses
    cache the decoded tensors on disk). A batch is one slice of that tensor
    (:class:`~lightning_fisher.data.dataset.TensorImageDataset`), and augmentation plus normalisation
    run on the whole batch in :meth:`on_after_batch_transfer`, i.e. on the GPU when training there.
    The validation loader serves the **test split** (the convention under which CIFAR-10 and
    TinyImageNet results are reported); :meth:`test_dataloader` serves it too.

    ``prepare_data`` (rank 0) decodes both splits and fills the cache; ``setup`` builds the datasets,
    from the copy ``prepare_data`` kept in this process or from the cache. Subclasses set the class
    attributes below and implement :meth:`_load_split`.

    Args:
        data_dir: where the data set lives (subclasses say which layouts they accept). Hydra key:
            ``data.data_dir``.
        batch_size: training batch size.
        eval_batch_size: batch size of the validation/test loaders; ``None`` means ``batch_size``.
        num_workers: DataLoader worker processes. ``0`` is usually fastest: a batch is one slice.
        pin_memory: pin batches in page-locked memory (faster host-to-GPU copies).
        seed: seeds the training shuffle, the ``max_per_class`` choice, any split the subclass
            draws, and the augmentation sequence. Each epoch's order and augmentations are drawn from
            ``(seed, epoch)`` (and the global rank, for the augmentations; under DDP the order is
            Lightning's ``DistributedSampler``'s, from the global seed and the epoch), so a run resumed
            from an end-of-epoch checkpoint trains on the same batches as an uninterrupted one.
        max_per_class: keep at most this many training images per class (chosen at random by
            ``seed``) for quick runs; ``None`` keeps all. The test split is never reduced.
        augment: apply the training augmentation (random crop with padding, flip where it makes
            sense). Normalisation is always applied.

    Raises:
        ValueError: when an argument is out of range; the message names the value and the rule.
    """

    name: ClassVar[str]
    num_classes: ClassVar[int]
    num_channels: ClassVar[int]
    image_size: ClassVar[int]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    crop_padding: ClassVar[int]
    horizontal_flip: ClassVar[bool]
    requires_data_dir: ClassVar[bool] = True

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        max_per_class: int | None = None,
        augment: bool = True,
    ) -> None:
        super().__init__()
        if data_dir is None:
            if self.requires_data_dir:
                raise ValueError("data_dir=None: must be a path to the data set (Hydra key data.data_dir)")
        elif not isinstance(data_dir, (str, os.PathLike)) or not os.fspath(data_dir):
            raise ValueError(f"data_dir={data_dir!r}: must be a non-empty path")
        check_int("batch_size", batch_size, minimum=1)
        check_int("eval_batch_size", eval_batch_size, minimum=1, none_ok=True)
        check_int("num_workers", num_workers, minimum=0)
        check_bool("pin_memory", pin_memory)
        check_int("seed", seed, minimum=0)
        if seed >= 2**63:
            raise ValueError(f"seed={seed}: must be < 2**63")
        check_int("max_per_class", max_per_class, minimum=1, none_ok=True)
        check_bool("augment", augment)
        self.save_hyperparameters()

        self.data_dir = None if data_dir is None else Path(os.path.expanduser(os.fspath(data_dir)))
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.max_per_class = max_per_class
        self.augment = augment
        self.augmenter = BatchAugment(
            self.mean, self.std, padding=self.crop_padding, flip=self.horizontal_flip, seed=seed
        )
        self.train_set: TensorImageDataset | None = None
        self.test_set: TensorImageDataset | None = None
        self.classes: tuple[str, ...] | None = None
        self._decoded: dict[Split, ImageTensors] = {}
        self._augment_epoch: int | None = None  # the epoch the augmentation sequence was last seeded for

    @abstractmethod
    def _load_split(self, split: Split) -> ImageTensors:
        """Finds (or downloads) the data and returns ``split`` decoded, using the disk cache."""

    def _split(self, split: Split) -> ImageTensors:
        if split not in self._decoded:
            data = self._load_split(split)
            if data.images.shape[1:] != (self.num_channels, self.image_size, self.image_size):
                raise RuntimeError(
                    f"{self.name} {split} images have shape {tuple(data.images.shape[1:])}, expected "
                    f"{(self.num_channels, self.image_size, self.image_size)}"
                )
            if len(data.classes) != self.num_classes:
                raise RuntimeError(f"{self.name} {split} has {len(data.classes)} classes, expected {self.num_classes}")
            self._decoded[split] = data
        return self._decoded[split]

    @override
    def prepare_data(self) -> None:
        """Downloads where supported, decodes both splits and writes the cache (rank 0 of each node)."""
        for split in SPLITS:
            self._split(split)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Builds the training set for ``fit`` (or ``None``) and the test set for every stage."""
        if stage in (None, "fit") and self.train_set is None:
            train = self._split("train")
            images, labels = train.images, train.labels
            if self.max_per_class is not None:
                keep = subsample_per_class(labels, self.max_per_class, self.seed)
                images, labels = images[keep], labels[keep]
                log.info("max_per_class=%d: training on %d of %d images", self.max_per_class, len(keep), len(train.labels))
            self.train_set = TensorImageDataset(images, labels)
            self.classes = train.classes
        if self.test_set is None:
            test = self._split("test")
            if self.classes is not None and test.classes != self.classes:
                raise RuntimeError(f"{self.name}: train classes {self.classes} differ from test classes {test.classes}")
            self.test_set = TensorImageDataset(test.images, test.labels)
            self.classes = test.classes
        if stage in (None, "fit"):
            rank = self.trainer.global_rank if self.trainer is not None else 0
            self.augmenter.reseed((self.seed + rank) % 2**63)  # outside a trainer; a trainer's epochs reseed it
            self._augment_epoch = None
        # The datasets share the tensors; drop the extra references so a split that is not used
        # in this stage (train, for a test-only run) is freed.
        self._decoded.clear()

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled training batches; each epoch's order is drawn from ``(seed, epoch)``
        (:class:`~lightning_fisher.data.sampling.EpochShuffle`; the trainer sets the epoch).

        The last incomplete batch is dropped when there is at least one full batch (a batch of one
        image breaks BatchNorm, and every epoch then has the same number of steps).
        """
        if self.train_set is None:
            self.setup("fit")
        train_set = self.train_set
        if train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup('fit') did not build the training set")
        return self._loader(
            train_set,
            self.batch_size,
            sampler=EpochShuffle(len(train_set), self.seed),
            drop_last=len(train_set) >= self.batch_size,
        )

    @override
    def val_dataloader(self) -> DataLoader[Any]:
        """Batches of the test split (validation is reported on the test split by default)."""
        return self._eval_loader()

    @override
    def test_dataloader(self) -> DataLoader[Any]:
        """Batches of the test split, in order."""
        return self._eval_loader()

    def _eval_loader(self) -> DataLoader[Any]:
        if self.test_set is None:
            self.setup("test")
        test_set = self.test_set
        if test_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup('test') did not build the test set")
        return self._loader(test_set, self.eval_batch_size, shuffle=False)

    def _loader(self, dataset: TensorImageDataset, batch_size: int, **kwargs: Any) -> DataLoader[Any]:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_prebatched,
            **kwargs,
        )

    def transform_batch(self, images: Tensor, train: bool) -> Tensor:
        """Augments (if ``train`` and ``augment``) and normalises a uint8 batch to float32."""
        return self.augmenter(images, train=train and self.augment)

    @contextmanager
    def preserved_rng(self) -> Iterator[None]:
        """Batches drawn inside augment as usual, and the augmentation sequence resumes on exit where it was.

        ``FisherPruning`` draws training batches for its Fisher estimates inside this, so an estimate does
        not change the augmentations training sees next: two runs that differ only in their pruning
        criterion train on the same stream.
        """
        seed, state, epoch = self.augmenter.seed, self.augmenter.rng_state(), self._augment_epoch
        try:
            yield
        finally:
            self.augmenter.reseed(seed)
            self.augmenter.set_rng_state(state)
            self._augment_epoch = epoch

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Runs :meth:`transform_batch` on the device; augments only while the trainer is training, from a
        sequence seeded at each epoch's first training batch by ``(seed, rank, epoch)``."""
        images, labels = batch
        training = self.trainer is not None and self.trainer.training
        if training and self.augment:
            epoch = self.trainer.current_epoch
            if epoch != self._augment_epoch:
                self.augmenter.reseed(derive_seed(self.seed, self.trainer.global_rank, epoch))
                self._augment_epoch = epoch
        return self.transform_batch(images, train=training), labels

