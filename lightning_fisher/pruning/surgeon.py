"""Optimal Brain Surgeon compensation: move the surviving weights to absorb the pruned ones.

With an inverse Fisher Q ≈ (F + γI)⁻¹, pruning the set S of weights changes the others by
δθ = −Q[(θ ⊙ 1_S) ⊘ diag Q] (Hassibi & Stork 1993, the independent-weights form used by WoodFisher,
oBERT and FishLeg Surgeon). For a single pruned weight q this is the exact OBS step
δθ = −Q e_q θ_q / Q_qq, which makes θ_q exactly zero. With a diagonal Q the survivors do not move
(δθ_j = −Q_jj · 0 = 0): OBS reduces to OBD.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

__all__ = ["InverseProduct", "obs_compensate_", "obs_update"]

InverseProduct = Callable[[dict[str, Tensor]], dict[str, Tensor]]
"""``vectors -> Q @ vectors`` per parameter block, keyed by FQN."""


def obs_update(
    weights: Mapping[str, Tensor],
    pruned: Mapping[str, Tensor],
    inverse_diag: Mapping[str, Tensor],
    inverse_product: InverseProduct,
) -> dict[str, Tensor]:
    """δθ = −Q[(θ ⊙ 1_S) ⊘ diag Q] for every parameter; ``pruned[fqn]`` is True on S."""
    vectors = {}
    for name, mask in pruned.items():
        w = weights[name].detach().float()
        q = inverse_diag[name].to(device=w.device, dtype=torch.float32)
        if q.shape != w.shape:
            raise ValueError(f"{name}: inverse_diag has shape {tuple(q.shape)}, the weight {tuple(w.shape)}")
        if not bool((q > 0).all()):
            raise ValueError(f"{name}: diag of the inverse Fisher must be positive")
        vectors[name] = torch.where(mask, w / q, torch.zeros_like(w))
    products = inverse_product(vectors)
    missing = sorted(set(vectors) - set(products))
    if missing:
        raise KeyError(f"inverse_product returned no block for {missing}")
    return {name: -products[name].to(weights[name].device) for name in vectors}


@torch.no_grad()
def obs_compensate_(
    weights: Mapping[str, Tensor],
    pruned: Mapping[str, Tensor],
    inverse_diag: Mapping[str, Tensor],
    inverse_product: InverseProduct,
) -> None:
    """Add the OBS update :func:`obs_update` to ``weights`` in place (then apply the masks)."""
    for name, delta in obs_update(weights, pruned, inverse_diag, inverse_product).items():
        weights[name].add_(delta.to(weights[name].dtype))
