"""Optimal Brain Surgeon compensation: move the surviving parameters to absorb the pruned weights.

With an inverse Fisher Q ≈ (F + γI)⁻¹, pruning the set S of weights changes every parameter by
δθ = −Q[(θ ⊙ 1_S) ⊘ diag Q] (Hassibi & Stork 1993, the independent-weights form used by WoodFisher,
oBERT and FishLeg Surgeon). For a single pruned weight q this is the exact OBS step
δθ = −Q e_q θ_q / Q_qq, which makes θ_q exactly zero. With a diagonal Q the survivors do not move
(δθ_j = −Q_jj · 0 = 0): OBS reduces to OBD.

δθ is not confined to the pruned weights: where Q couples them to parameters that are never pruned (a
layer's bias, in FishLeg's Kronecker form over [W | b]), the inverse product returns a block for those
parameters too, and the update moves them (δb = −[Q e_q]_bias θ_q / Q_qq). The caller names them in
``coupled``; a block for any other parameter is an error, never dropped silently. The vector the
product is taken of is zero on every coupled parameter, since they are not pruned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

__all__ = ["InverseProduct", "obs_compensate_", "obs_update"]

InverseProduct = Callable[[dict[str, Tensor]], dict[str, Tensor]]
"""``vectors -> Q @ vectors`` per parameter block, keyed by FQN; may add blocks for coupled parameters."""


def obs_update(
    weights: Mapping[str, Tensor],
    pruned: Mapping[str, Tensor],
    inverse_diag: Mapping[str, Tensor],
    inverse_product: InverseProduct,
    coupled: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """δθ = −Q[(θ ⊙ 1_S) ⊘ diag Q] for every parameter; ``pruned[fqn]`` is True on S.

    Args:
        weights: the pruned parameters (every key of ``pruned``), by FQN.
        pruned: ``{fqn: bool tensor}``, True on the weights removed now.
        inverse_diag: diag(Q) for every key of ``pruned`` (positive).
        inverse_product: ``vectors -> Q·vectors``; it returns a block for every key of ``pruned`` and
            may return blocks for further parameters Q couples to them.
        coupled: the parameters (never pruned) those further blocks may be for, by FQN.

    Returns:
        ``{fqn: δθ}`` for every key of ``pruned`` and for every coupled parameter the product returned.

    Raises:
        ValueError: a shape mismatch, a non-positive diag(Q), or a name both pruned and coupled.
        KeyError: the product misses a pruned parameter, or returns a block for a parameter that is
            neither pruned nor in ``coupled``.
    """
    coupled = {} if coupled is None else coupled
    both = sorted(set(coupled) & set(pruned))
    if both:
        raise ValueError(f"coupled={both}: these parameters are pruned; pass them in weights/pruned only")
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
    extra = [name for name in products if name not in vectors]
    unexpected = sorted(name for name in extra if name not in coupled)
    if unexpected:
        raise KeyError(
            f"inverse_product returned blocks for {unexpected}, which are neither pruned nor coupled: pass "
            "these parameters in coupled= so OBS moves them too"
        )
    for name in extra:
        if products[name].shape != coupled[name].shape:
            raise ValueError(
                f"{name}: inverse_product block has shape {tuple(products[name].shape)}, "
                f"the parameter {tuple(coupled[name].shape)}"
            )
    targets = {**coupled, **weights}
    return {name: -products[name].to(targets[name].device) for name in [*vectors, *extra]}


@torch.no_grad()
def obs_compensate_(
    weights: Mapping[str, Tensor],
    pruned: Mapping[str, Tensor],
    inverse_diag: Mapping[str, Tensor],
    inverse_product: InverseProduct,
    coupled: Mapping[str, Tensor] | None = None,
) -> list[str]:
    """Add the OBS update :func:`obs_update` to ``weights`` and ``coupled`` in place (then apply the masks).

    Returns:
        The names of the coupled parameters that moved.
    """
    targets = {**({} if coupled is None else coupled), **weights}
    moved = []
    for name, delta in obs_update(weights, pruned, inverse_diag, inverse_product, coupled).items():
        targets[name].add_(delta.to(targets[name].dtype))
        if name not in weights:
            moved.append(name)
    return moved
