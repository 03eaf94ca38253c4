"""On a small CNN trained with Adam, the free Squisher ranks weights like the empirical Fisher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.datasets import load_digits
from torch import Tensor, nn

from lightning_fisher.fisher import EmpiricalFisher, FisherContext, Squisher

BATCH = 32


def _train_digits_cnn() -> tuple[nn.Module, torch.optim.Optimizer, Tensor, Tensor]:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        index = torch.randint(0, len(x), (BATCH,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(net(x[index]), y[index]).backward()
        optimizer.step()
    return net, optimizer, x, y


def test_squisher_ranks_weights_like_the_empirical_fisher():
    net, optimizer, x, y = _train_digits_cnn()
    accuracy = (net(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9  # measured 0.974: the network is trained, so the comparison is meaningful

    weights = {name: p for name, p in net.named_parameters() if p.ndim > 1}  # 3,784 conv/linear weights
    subset = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:512]
    context = FisherContext(
        net, weights, optimizer,
        batches=lambda: [(x[subset[i : i + 64]], y[subset[i : i + 64]]) for i in range(0, 512, 64)],
        loss_fn=F.cross_entropy, batch_size=BATCH,
    )
    squisher = Squisher().diagonal(context)
    empirical = EmpiricalFisher(num_samples=512, backend="vmap").diagonal(context)

    def flat(values: dict[str, Tensor]) -> Tensor:
        return torch.cat([values[name].detach().flatten() for name in weights])

    theta_sq = flat(weights).square()
    fisher_rho = spearmanr(flat(squisher).numpy(), flat(empirical).numpy()).statistic
    score_rho = spearmanr((theta_sq * flat(squisher)).numpy(), (theta_sq * flat(empirical)).numpy()).statistic
    magnitude_rho = spearmanr(theta_sq.numpy(), (theta_sq * flat(empirical)).numpy()).statistic

    # Measured here (seed 0): Spearman 0.924 between the Fisher diagonals and 0.946 between the pruning
    # scores θ²F/2, against 0.642 for magnitude θ² alone vs the empirical-Fisher score. Model seeds 1-4
    # gave 0.897-0.930, 0.943-0.952 and 0.616-0.670.
    assert fisher_rho > 0.8, fisher_rho
    assert score_rho > 0.85, score_rho
    assert score_rho > magnitude_rho + 0.15, (score_rho, magnitude_rho)
