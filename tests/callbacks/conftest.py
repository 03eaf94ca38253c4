"""Tiny models, data and trainers shared by the callback tests (CPU, a second or two per fit)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher.module import ImageClassifier

class TinyNet(nn.Module):
    """8×8 grey images → 10 classes: stem conv, two convs (one with BatchNorm), two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.relu(self.fc1(x.flatten(1))))


class DigitsData(L.LightningDataModule):
    """The first ``size`` sklearn digits (bundled, no download), unshuffled so runs are deterministic."""

    def __init__(self, size: int = 128, batch_size: int = 32) -> None:
        super().__init__()
        digits = load_digits()
        x = torch.tensor(digits.images[:size], dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target[:size], dtype=torch.long)
        self.train_set = TensorDataset(x, y)
        self.val_set = TensorDataset(x[:64], y[:64])
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=64)


def _make_module(optimizer: Callable[..., torch.optim.Optimizer] | None = None, net: nn.Module | None = None) -> ImageClassifier:
    return ImageClassifier(
        net if net is not None else TinyNet(),
        num_classes=10,
        optimizer=optimizer or partial(torch.optim.Adam, lr=1e-2),
    )


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run far faster on one thread: with 2 threads on a busy 2-core machine, OpenMP
    synchronisation dominated (a 32×8×8×8 conv forward+backward measured 45 ms vs 0.7 ms on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_module() -> Callable[..., ImageClassifier]:
    """``make_module(optimizer=None, net=None)``: ImageClassifier around ``TinyNet`` with Adam(lr=1e-2)."""
    return _make_module


@pytest.fixture
def tiny_net() -> type[TinyNet]:
    return TinyNet


@pytest.fixture
def make_digits() -> type[DigitsData]:
    return DigitsData


@pytest.fixture
def digits() -> DigitsData:
    return DigitsData()


@pytest.fixture
def make_trainer(tmp_path: Path) -> Callable[..., L.Trainer]:
    """``make_trainer(callbacks, **overrides)``: a quiet CPU trainer writing under ``tmp_path``."""

    def _make(callbacks: list[Any], **overrides: Any) -> L.Trainer:
        kwargs: dict[str, Any] = dict(
            max_epochs=4,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
            deterministic=True,
            num_sanity_val_steps=0,
        )
        kwargs.update(overrides)
        return L.Trainer(callbacks=callbacks, **kwargs)

    return _make
