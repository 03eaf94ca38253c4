"""Tiny models and data for the AdaFisher tests."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn


class ConvNet(nn.Module):
    """3×6×6 images → 4 classes: conv with bias, BatchNorm, in-place ReLU, conv without bias, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(6 * 3 * 3, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


@pytest.fixture
def conv_net() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet()


@pytest.fixture
def conv_data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=generator), torch.randint(0, 4, (8,), generator=generator)
