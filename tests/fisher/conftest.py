"""A tiny conv net with BatchNorm, fixed data, and plain-autograd references for the per-sample Fishers."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class SmallBNNet(nn.Module):
    """3×6×6 images → 5 classes: conv, BatchNorm, ReLU (in place), dropout, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)  # must be off during estimation, or the reference would not match
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.relu(self.bn(self.conv(x))).flatten(1)))


@pytest.fixture
def small_net() -> SmallBNNet:
    torch.manual_seed(0)
    net = SmallBNNet()
    with torch.no_grad():  # running statistics far from the batch ones, so eval and train modes differ
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.2, 0.2)
    net.train()
    return net


@pytest.fixture
def small_data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(20, 3, 6, 6, generator=generator), torch.randint(0, 5, (20,), generator=generator)


def batches_of(data: tuple[Tensor, Tensor], size: int) -> Callable[[], Iterable[tuple[Tensor, Tensor]]]:
    x, y = data
    return lambda: [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


@pytest.fixture
def make_batches() -> Callable[..., Callable[[], Iterable[tuple[Tensor, Tensor]]]]:
    return batches_of


def reference_fisher(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[tuple[Tensor, Tensor]],
    num_samples: int,
    bn_mode: str,
    labels_for: Callable[[Tensor, Tensor], Tensor] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> dict[str, Tensor]:
    """(1/N) Σ_n (1/L) Σ_l g²: one ``torch.autograd.grad`` per (sample, label), no torch.func.

    ``labels_for(logits[take, C], targets[take]) -> labels[take, L]`` (default: the targets). In
    ``"train"`` mode the batch statistics come from the whole batch, and the running statistics are saved
    and restored around the loop.
    """
    flags = [(m, m.training) for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.train()
    sums = {k: torch.zeros_like(p) for k, p in params.items()}
    seen = 0
    for x, y in batches:
        take = min(len(x), num_samples - seen)
        if take <= 0:
            break
        if bn_mode == "eval":
            x = x[:take]
        logits = model(x)
        labels = y[:take, None] if labels_for is None else labels_for(logits[:take].detach(), y[:take])
        for n in range(take):
            for label in labels[n]:
                if bn_mode == "eval":  # a fresh forward of the one sample
                    loss = loss_fn(model(x[n : n + 1]), label[None])
                else:
                    loss = loss_fn(logits[n : n + 1], label[None])
                grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
                for name, g in zip(params, grads):
                    sums[name] += g.square() / labels.shape[1]
        seen += take
    for m, training in flags:
        m.training = training
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    return {k: s / seen for k, s in sums.items()}


@pytest.fixture
def reference() -> Callable[..., dict[str, Tensor]]:
    return reference_fisher
