"""What every DataModule shares: argument checks, loaders, seeding, the batch-transfer hook under a Trainer."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

import lightning_fisher.data as data_pkg
from lightning_fisher.data import CIFAR10DataModule, DigitsDataModule, ImageDataModule, TensorImageDataset, TinyImageNetDataModule
from lightning_fisher.data.augment import normalize

ALL = (CIFAR10DataModule, TinyImageNetDataModule, DigitsDataModule)


def test_all_exports_resolve() -> None:
    for name in data_pkg.__all__:
        assert getattr(data_pkg, name) is not None
    assert {"CIFAR10DataModule", "TinyImageNetDataModule", "DigitsDataModule"} <= set(data_pkg.__all__)


@pytest.mark.parametrize("cls", ALL)
def test_attributes_are_class_level(cls: type[ImageDataModule]) -> None:
    for name in ("num_classes", "num_channels", "image_size", "mean", "std"):
        assert name in vars(cls), f"{cls.__name__}.{name} must be a class attribute"
    assert len(cls.mean) == len(cls.std) == cls.num_channels
    assert issubclass(cls, L.LightningDataModule)


BAD_ARGS = [
    ({"batch_size": 0}, r"batch_size=0: must be an integer >= 1"),
    ({"batch_size": 2.0}, r"batch_size=2.0: must be an integer >= 1"),
    ({"batch_size": True}, r"batch_size=True: must be an integer >= 1"),
    ({"eval_batch_size": 0}, r"eval_batch_size=0: must be an integer >= 1 or None"),
    ({"num_workers": -1}, r"num_workers=-1: must be an integer >= 0"),
    ({"pin_memory": 1}, r"pin_memory=1: must be True or False"),
    ({"seed": -3}, r"seed=-3: must be an integer >= 0"),
    ({"seed": 2**63}, r"seed=9223372036854775808: must be < 2\*\*63"),
    ({"max_per_class": 0}, r"max_per_class=0: must be an integer >= 1 or None"),
    ({"max_per_class": "5"}, r"max_per_class='5': must be an integer >= 1 or None"),
    ({"augment": "yes"}, r"augment='yes': must be True or False"),
    ({"data_dir": ""}, r"data_dir='': must be a non-empty path"),
    ({"data_dir": 3}, r"data_dir=3: must be a non-empty path"),
]


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(("kwargs", "match"), BAD_ARGS)
def test_argument_validation(cls: type[ImageDataModule], kwargs: dict, match: str, tmp_path: Path) -> None:
    args = {"data_dir": str(tmp_path)} | kwargs
    with pytest.raises(ValueError, match=match):
        cls(**args)


@pytest.mark.parametrize("cls", [CIFAR10DataModule, TinyImageNetDataModule])
def test_data_dir_required(cls: type[ImageDataModule]) -> None:
    with pytest.raises(ValueError, match=r"data_dir=None: must be a path to the data set \(Hydra key data.data_dir\)"):
        cls(None)


@pytest.mark.parametrize("value", [0, 1, 0.0, 1.5, -0.1, True, "0.2"])
def test_digits_test_fraction(value: object) -> None:
    with pytest.raises(ValueError, match=r"test_fraction=.*: must be a number in \(0, 1\)"):
        DigitsDataModule(test_fraction=value)


def test_validation_uses_the_test_split_and_eval_batch_size() -> None:
    dm = DigitsDataModule(batch_size=100)
    assert dm.eval_batch_size == 100
    dm = DigitsDataModule(batch_size=100, eval_batch_size=50)
    dm.setup("fit")
    assert dm.val_dataloader().dataset is dm.test_set and dm.test_dataloader().dataset is dm.test_set
    assert [len(y) for _, y in dm.val_dataloader()] == [50] * 7 + [9]  # 359 test images, in order
    assert torch.equal(torch.cat([y for _, y in dm.test_dataloader()]), dm.test_set.labels)


def _epoch_labels(dm: ImageDataModule) -> list[torch.Tensor]:
    return [y for _, y in dm.train_dataloader()]


def test_shuffle_is_reproducible_given_seed() -> None:
    a, b, c = DigitsDataModule(batch_size=64, seed=7), DigitsDataModule(batch_size=64, seed=7), DigitsDataModule(batch_size=64, seed=8)
    for dm in (a, b, c):
        dm.setup("fit")
    la, lb = torch.cat(_epoch_labels(a)), torch.cat(_epoch_labels(b))
    assert torch.equal(la, lb)
    loader = a.train_dataloader()
    first, again = torch.cat([y for _, y in loader]), torch.cat([y for _, y in loader])
    assert torch.equal(first, again)  # every pass within an epoch: the same order (a Fisher estimate's too)
    loader.sampler.set_epoch(1)  # what the trainer does at each epoch start
    second = torch.cat([y for _, y in loader])
    assert not torch.equal(first, second)  # each epoch reshuffles...
    rebuilt = a.train_dataloader()
    rebuilt.sampler.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in rebuilt]), second)  # ...from (seed, epoch) alone: a resume replays it
    assert not torch.equal(torch.cat(_epoch_labels(c)[:1]), torch.cat(_epoch_labels(a)[:1]))


def test_lightning_sees_a_shuffled_training_loader() -> None:
    """Under DDP Lightning replaces a shuffled loader's sampler by DistributedSampler(shuffle=True); an
    unrecognised sampler would be wrapped unshuffled, and every epoch would repeat one order."""
    from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
    from lightning.pytorch.utilities.data import _is_dataloader_shuffled
    from torch.utils.data import DistributedSampler

    dm = DigitsDataModule(batch_size=64, seed=7)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert _is_dataloader_shuffled(loader)
    sampler = _get_distributed_sampler(loader, shuffle=True, overfit_batches=0, num_replicas=2, rank=0)
    assert isinstance(sampler, DistributedSampler) and sampler.shuffle
    assert not _is_dataloader_shuffled(dm.val_dataloader())


def test_train_loader_drops_the_last_partial_batch() -> None:
    dm = DigitsDataModule(batch_size=100)  # 1,438 training images
    sizes = [len(y) for y in _epoch_labels(dm)]
    assert sizes == [100] * 14
    small = DigitsDataModule(batch_size=2000)  # fewer images than one batch: keep them
    assert [len(y) for y in _epoch_labels(small)] == [1438]


def test_loader_fetches_batches_by_slicing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_single_fetch(self, index):  # noqa: ANN001, ANN202
        raise AssertionError("per-image __getitem__ must not be used")

    monkeypatch.setattr(TensorImageDataset, "__getitem__", no_single_fetch)
    dm = DigitsDataModule(batch_size=256)
    assert sum(len(y) for y in _epoch_labels(dm)) == 1280
    assert sum(len(y) for _, y in dm.val_dataloader()) == 359


def test_worker_processes_give_the_same_batches() -> None:
    serial = DigitsDataModule(batch_size=256, seed=2)
    workers = DigitsDataModule(batch_size=256, seed=2, num_workers=1)
    for (xa, ya), (xb, yb) in zip(serial.train_dataloader(), workers.train_dataloader(), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_max_per_class() -> None:
    dm = DigitsDataModule(max_per_class=5, seed=4)
    dm.setup("fit")
    assert torch.bincount(dm.train_set.labels).tolist() == [5] * 10
    assert len(dm.test_set) == 359  # the test split is never reduced
    same, other = DigitsDataModule(max_per_class=5, seed=4), DigitsDataModule(max_per_class=5, seed=5)
    same.setup("fit")
    other.setup("fit")
    assert torch.equal(same.train_set.images, dm.train_set.images)
    assert not torch.equal(other.train_set.images, dm.train_set.images)


def test_hook_without_trainer_only_normalises() -> None:
    dm = DigitsDataModule(batch_size=64)
    images, labels = next(iter(dm.train_dataloader()))
    out, out_labels = dm.on_after_batch_transfer((images, labels), 0)
    assert out_labels is labels
    torch.testing.assert_close(out, normalize(images, torch.tensor(dm.mean), torch.tensor(dm.std)))


@pytest.mark.parametrize("augment", [True, False])
def test_hook_augments_only_while_training(augment: bool) -> None:
    dm = DigitsDataModule(batch_size=256, augment=augment)
    images, labels = next(iter(dm.train_dataloader()))
    plain = normalize(images, torch.tensor(dm.mean), torch.tensor(dm.std))
    dm.trainer = SimpleNamespace(training=True, global_rank=0, current_epoch=0)
    trained, _ = dm.on_after_batch_transfer((images, labels), 0)
    assert trained.shape == images.shape and trained.dtype == torch.float32
    assert torch.equal(trained, plain) != augment
    dm.trainer = SimpleNamespace(training=False, global_rank=0, current_epoch=0)
    assert torch.equal(dm.on_after_batch_transfer((images, labels), 0)[0], plain)


def test_each_epoch_augments_from_seed_rank_and_epoch_alone() -> None:
    """A run resumed at epoch 1 augments epoch 1 as the run that went through epoch 0 does."""
    def augmented(dm: DigitsDataModule, epoch: int, rank: int = 0) -> list[torch.Tensor]:
        dm.trainer = SimpleNamespace(training=True, global_rank=rank, current_epoch=epoch)
        images = dm.train_set.images[:64]
        return [dm.on_after_batch_transfer((images, None), 0)[0] for _ in range(2)]  # two batches of the epoch

    through, resumed, other_rank = (DigitsDataModule(seed=5) for _ in range(3))
    for dm in (through, resumed, other_rank):
        dm.setup("fit")
    epoch0 = augmented(through, 0)
    epoch1 = augmented(through, 1)
    assert all(torch.equal(x, y) for x, y in zip(augmented(resumed, 1), epoch1, strict=True))
    assert not torch.equal(epoch1[0], epoch1[1])  # the sequence runs on within an epoch
    assert not torch.equal(epoch0[0], epoch1[0]) and not torch.equal(augmented(other_rank, 1, rank=1)[0], epoch1[0])


def test_setup_offsets_the_augmentation_seed_by_rank() -> None:
    dm = DigitsDataModule(seed=10)
    dm.trainer = SimpleNamespace(training=True, global_rank=3)
    dm.setup("fit")
    assert dm.augmenter.seed == 13
    images = dm.train_set.images[:64]
    first = dm.transform_batch(images, train=True)
    dm.setup("fit")  # a second fit restarts the augmentation sequence
    assert torch.equal(dm.transform_batch(images, train=True), first)


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.seen: list[tuple[str, torch.dtype]] = []

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        self.seen.append(("train", x.dtype))
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        self.seen.append(("val", batch[0].dtype))

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_calls_the_hook_with_the_right_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = DigitsDataModule(batch_size=128, eval_batch_size=180)
    calls: list[bool] = []
    original = dm.transform_batch

    def spy(images: torch.Tensor, train: bool) -> torch.Tensor:
        calls.append(train)
        return original(images, train)

    monkeypatch.setattr(dm, "transform_batch", spy)
    model = _Tiny()
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=dm)
    assert calls == [True] * 3 + [False] * 2  # 3 training batches, then 359 test images in 2 batches
    assert model.seen == [("train", torch.float32)] * 3 + [("val", torch.float32)] * 2
