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

The independent form treats the removals in S as if each were the only one: it is exact for one weight,
and for many it sums single-weight steps whose interactions through Q it ignores, so the pruned weights
do not land on zero (the mask zeroes them afterwards) and the survivors absorb a move meant for a
different set. The joint OBS step for a set T (Hassibi & Stork's constrained form, as in Optimal Brain
Compression, Frantar & Alistarh 2022) is δθ = −Q E_T (Q_TT)⁻¹ θ_T: the smallest move, in the metric
F_γ = Q⁻¹, that puts every weight of T exactly on zero. With ``iterations=k > 0`` we solve
Q_TT x = θ_T by k steps of conjugate gradients preconditioned by diag(Q) (one product with Q each; the
first step is the independent form rescaled by the optimal step length), with T = every weight the
masks hold at zero, so weights pruned earlier stay on zero instead of being moved and re-zeroed. With a
weakly damped Q, Q_TT is ill-conditioned and k steps give a truncated solve (the debug log of this module
reports the relative residual left at each prune).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

__all__ = ["InverseProduct", "obs_compensate_", "obs_update", "validate_obs_iterations"]

log = logging.getLogger(__name__)

_RELATIVE_TOLERANCE = 1e-6  # conjugate gradients stop early once the residual on T is this small

InverseProduct = Callable[[dict[str, Tensor]], dict[str, Tensor]]
"""``vectors -> Q @ vectors`` per parameter block, keyed by FQN; may add blocks for coupled parameters."""


def validate_obs_iterations(iterations: int, compensate: bool) -> int:
    """Check ``obs_iterations`` (an integer ≥ 0, non-zero only with OBS compensation) and return it."""
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise TypeError(f"obs_iterations={iterations!r}: must be an integer >= 0")
    if iterations < 0:
        raise ValueError(f"obs_iterations={iterations!r}: must be >= 0 (0 = the independent-weights OBS update)")
    if iterations and not compensate:
        raise ValueError(f"obs_iterations={iterations!r}: only the OBS update uses it; set compensate=True or leave it 0")
    return iterations


def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    return sum(float((a[name].double() * b[name].double()).sum()) for name in a)


def _joint_solve(
    rhs: dict[str, Tensor],
    pruned: Mapping[str, Tensor],
    inverse_diag: Mapping[str, Tensor],
    inverse_product: InverseProduct,
    iterations: int,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """x ≈ (Q_TT)⁻¹ θ_T by Jacobi-preconditioned conjugate gradients from 0, and Q·x (every block)."""

    def preconditioned(r: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: v / inverse_diag[name] for name, v in r.items()}

    x = {name: torch.zeros_like(v) for name, v in rhs.items()}
    qx: dict[str, Tensor] | None = None
    residual, direction = dict(rhs), preconditioned(rhs)
    rz = _dot(residual, direction)
    rhs_norm = residual_norm = _dot(rhs, rhs) ** 0.5
    steps = 0
    while steps < iterations and rz > 0 and residual_norm > _RELATIVE_TOLERANCE * rhs_norm:
        q_direction = inverse_product(direction)
        a_direction = {name: torch.where(pruned[name], q_direction[name], 0.0) for name in direction}
        curvature = _dot(direction, a_direction)
        if not curvature > 0:  # Q_TT is positive definite; stop rather than divide by a rounding error
            break
        step = rz / curvature
        for name in x:
            x[name].add_(direction[name], alpha=step)
            residual[name] = residual[name] - step * a_direction[name]
        if qx is None:
            qx = {name: torch.zeros_like(block) for name, block in q_direction.items()}
        for name, block in q_direction.items():
            qx[name].add_(block, alpha=step)
        steps += 1
        residual_norm = _dot(residual, residual) ** 0.5
        z = preconditioned(residual)
        rz, rz_old = _dot(residual, z), rz
        direction = {name: z[name] + (rz / rz_old) * direction[name] for name in z}
    if rhs_norm:
        log.debug("joint OBS update: %d CG steps, relative residual %.2e", steps, residual_norm / rhs_norm)
    return x, inverse_product(x) if qx is None else qx


def obs_update(
    weights: Mapping[str, Tensor],
    pruned: Mapping[str, Tensor],
    inverse_diag: Mapping[str, Tensor],
    inverse_product: InverseProduct,
    coupled: Mapping[str, Tensor] | None = None,
    iterations: int = 0,
) -> dict[str, Tensor]:
    """The OBS update for removing the weights where ``pruned[fqn]`` is True (the set S).

    ``iterations=0``: the independent-weights form δθ = −Q[(θ ⊙ 1_S) ⊘ diag Q]. ``iterations=k > 0``:
    the joint form δθ = −Q E_S (Q_SS)⁻¹ θ_S with (Q_SS)⁻¹ θ_S taken to k conjugate-gradient steps (fewer
    if it converges); pass every weight held at zero in S, so the earlier ones stay there.

    Args:
        weights: the pruned parameters (every key of ``pruned``), by FQN.
        pruned: ``{fqn: bool tensor}``, True on the weights removed now (and, for the joint form, on those
            removed before, which are zero already).
        inverse_diag: diag(Q) for every key of ``pruned`` (positive).
        inverse_product: ``vectors -> Q·vectors``; it returns a block for every key of ``pruned`` and
            may return blocks for further parameters Q couples to them.
        coupled: the parameters (never pruned) those further blocks may be for, by FQN.
        iterations: 0 for the independent form, else the most conjugate-gradient steps (one product each).

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
    rhs, diag = {}, {}
    for name, mask in pruned.items():
        w = weights[name].detach().float()
        q = inverse_diag[name].to(device=w.device, dtype=torch.float32)
        if q.shape != w.shape:
            raise ValueError(f"{name}: inverse_diag has shape {tuple(q.shape)}, the weight {tuple(w.shape)}")
        if not bool((q > 0).all()):
            raise ValueError(f"{name}: diag of the inverse Fisher must be positive")
        rhs[name], diag[name] = torch.where(mask, w, torch.zeros_like(w)), q

    def product(vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        products = inverse_product(vectors)
        missing = sorted(set(vectors) - set(products))
        if missing:
            raise KeyError(f"inverse_product returned no block for {missing}")
        return products

    if iterations:
        vectors, products = _joint_solve(rhs, pruned, diag, product, iterations)
    else:
        vectors = {name: r / diag[name] for name, r in rhs.items()}
        products = product(vectors)
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
    iterations: int = 0,
) -> list[str]:
    """Add the OBS update :func:`obs_update` to ``weights`` and ``coupled`` in place (then apply the masks).

    Returns:
        The names of the coupled parameters that moved.
    """
    targets = {**({} if coupled is None else coupled), **weights}
    moved = []
    for name, delta in obs_update(weights, pruned, inverse_diag, inverse_product, coupled, iterations).items():
        targets[name].add_(delta.to(targets[name].dtype))
        if name not in weights:
            moved.append(name)
    return moved
