"""Saliency scores: how much the loss is expected to grow when a weight is removed (low = prune first).

- ``magnitude``: |θ| (Han et al. 2015; the OBD score with F = I, up to monotone transforms).
- ``fisher`` (OBD, LeCun et al. 1990): ρ = θ²·(F + γ)/2 with a diagonal Fisher F and damping γ ≥ 0, the
  OBS cost θ²/(2·[(F + γI)⁻¹]_qq) of a diagonal Fisher (γ = 0: plain OBD; γ → ∞: the magnitude ranking).
- OBS with an inverse Fisher Q ≈ (F + γI)⁻¹ (Hassibi & Stork 1993; FishLeg Surgeon): ρ = θ²/(2·Q_qq).
- ``random``: uniform noise, the baseline.

Scores are float32 tensors shaped like the weight, on the weight's device.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["CRITERIA", "Criterion", "check_finite", "score_magnitude", "score_obd", "score_obs", "score_random"]

Criterion = Literal["fisher", "magnitude", "random"]
CRITERIA: tuple[str, ...] = ("fisher", "magnitude", "random")


def score_magnitude(weight: Tensor) -> Tensor:
    """|θ|."""
    return weight.detach().abs().float()


def score_obd(weight: Tensor, fisher_diag: Tensor, damping: float = 0.0) -> Tensor:
    """θ²·(F + γ)/2, the Optimal Brain Damage cost of removing each weight under a diagonal Fisher ``F``
    damped by ``damping`` = γ ≥ 0 (in the Fisher's units)."""
    _check_shape(weight, fisher_diag, "fisher_diag")
    w = weight.detach().float()
    fisher = fisher_diag.detach().to(device=w.device, dtype=torch.float32)
    return w.square() * (fisher + damping if damping else fisher) / 2


def score_obs(weight: Tensor, inverse_diag: Tensor) -> Tensor:
    """θ²/(2·Q_qq), the Optimal Brain Surgeon cost with ``inverse_diag`` = diag((F + γI)⁻¹) (positive)."""
    _check_shape(weight, inverse_diag, "inverse_diag")
    w = weight.detach().float()
    return w.square() / (2 * inverse_diag.detach().to(device=w.device, dtype=torch.float32))


def score_random(weight: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform [0, 1) noise drawn on the CPU from ``generator``, so every device draws the same values."""
    return torch.rand(weight.shape, generator=generator, dtype=torch.float32).to(weight.device)


def check_finite(scores: dict[str, Tensor]) -> None:
    """Raise if any score is NaN or +inf (a broken estimate must not silently prune at random)."""
    bad = [name for name, s in scores.items() if torch.isnan(s).any() or torch.isposinf(s).any()]
    if bad:
        raise ValueError(f"scores of {bad} contain NaN or +inf: the Fisher estimate is not finite")


def _check_shape(weight: Tensor, other: Tensor, name: str) -> None:
    if other.shape != weight.shape:
        raise ValueError(f"{name} has shape {tuple(other.shape)}, the weight {tuple(weight.shape)}")
