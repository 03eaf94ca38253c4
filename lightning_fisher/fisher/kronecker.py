"""The Kronecker Fisher: AdaFisher's own per-layer factors read as a Fisher estimate, at no cost.

AdaFisher (:mod:`lightning_fisher.optim.adafisher`) keeps, per Linear/Conv2d layer, the averaged
diagonals of the activation factor H and the output-gradient factor S; their Kronecker product is a
diagonal Fisher estimate (K-FAC's, with KFC's convention for convolutions; exact definitions in
:mod:`lightning_fisher.optim.factors`): F[i, j] = S[i] · H[j], i.e. the mean over samples of the squared
per-sample-loss gradient under K-FAC's independence approximation. This estimator reads the raw
bias-corrected EMA factors, not the min-max normalised ones the optimizer preconditions with:
normalisation shifts each factor so its smallest entry is zero and rescales each layer by its own
range, which destroys both the zero point and the comparison between layers that a global pruning
ranking needs. Normalisation layers are covered in their per-feature diagonal form (F_γ = H·S, F_β = S).

With diagonal factors the Kronecker inverse is diagonal too: (F + δI)⁻¹ = diag(1/(F + δ)), so
``inverse_diagonal`` and ``inverse_product`` are exact for this F. OBS compensation with a diagonal
inverse leaves the surviving weights where they are (it reduces to OBD scoring θ²(F + δ)/2). Nothing is
coupled either: ``inverse_product`` returns only the blocks it was given, never one for a bias, so OBS
with this estimator is OBD for the survivors and moves no other parameter.

The factors are identical on every data-parallel rank (the optimizer all-reduces them), so no
all-reduce is needed here. Under AMP they include the loss scale squared, a factor common to every
layer at a given step: rankings do not change.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_fisher.fisher.base import FisherContext, FisherEstimator
from lightning_fisher.optim.adafisher import AdaFisher

__all__ = ["KroneckerFisher"]


def _unwrap(optimizer: Any) -> Any:
    # Lightning hands callbacks a ``LightningOptimizer``; the real optimizer is its ``.optimizer``.
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class KroneckerFisher(FisherEstimator):
    """Diagonal Fisher diag(H) ⊗ diag(S) from AdaFisher's Kronecker factors, with its exact inverse.

    The "free" Kronecker Fisher of AdaFisher (Gomes et al., ICLR 2025, arXiv 2405.16397), in the
    diagonal K-FAC form of Martens & Grosse (ICML 2015) and Grosse & Martens (ICML 2016, convolutions).
    Train with :class:`~lightning_fisher.optim.AdaFisher` or ``AdaFisherW``; the estimate is read from
    the optimizer when asked for, nothing is added to training.

    F is diagonal (diag H ⊗ diag S), so (F + δI)⁻¹ is diagonal and couples no two parameters:
    :meth:`inverse_product` returns exactly the blocks it was given (no bias blocks), and OBS
    compensation with this estimator is OBD for the survivors (nothing but the pruned weights moves).

    Args:
        damping: δ in (F + δI)⁻¹ for :meth:`inverse_diagonal` / :meth:`inverse_product` (> 0, finite).
            Absolute, in the units of F (squared per-sample loss gradients). The default is far below
            the Fisher of any weight that still receives gradient, so it only keeps dead units finite.
        floor: lower bound of every entry :meth:`diagonal` returns (> 0, finite; as the Squisher's).

    Raises:
        ValueError: ``damping`` or ``floor`` not positive and finite.

    Parameters without factors (those AdaFisher updates with its Adam rule: embeddings, free
    parameters, unsupported layer types) are an error, never silently replaced; the pruning callback
    asks only for Conv2d/Linear weights.

    Example::

        optimizer = AdaFisher(model)
        ...  # train
        estimator = KroneckerFisher()
        estimator.check(optimizer)
        fisher = estimator.diagonal(FisherContext(model, {"fc.weight": model.fc.weight}, optimizer))
    """

    requires_data = False
    needs_all_reduce = False  # the optimizer all-reduces its factors before every update

    def __init__(self, damping: float = 1e-8, floor: float = 1e-30) -> None:
        for name, value in (("damping", damping), ("floor", floor)):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 < value < math.inf):
                raise ValueError(f"{name}={value!r}: must be a positive finite number")
            if torch.tensor(float(value), dtype=torch.float32).item() == 0.0:
                raise ValueError(f"{name}={value!r}: must be representable in float32 (>= 1.4e-45)")
        self.damping = float(damping)
        self.floor = float(floor)

    @property
    def supports_inverse(self) -> bool:
        return True

    def check(self, optimizer: torch.optim.Optimizer | None) -> None:
        """``ValueError`` without an optimizer, ``TypeError`` when it is not AdaFisher/AdaFisherW."""
        if optimizer is None:
            raise ValueError(
                "optimizer=None: KroneckerFisher reads AdaFisher's Kronecker factors; train with "
                "lightning_fisher.optim.AdaFisher, or use EmpiricalFisher, which needs no optimizer"
            )
        inner = _unwrap(optimizer)
        if not isinstance(inner, AdaFisher):
            raise TypeError(
                f"optimizer={type(inner).__name__}: KroneckerFisher reads the Kronecker factors that only "
                "AdaFisher/AdaFisherW keep. Train with lightning_fisher.optim.AdaFisher, or use Squisher "
                "(Adam-family optimizers) or EmpiricalFisher (any optimizer)"
            )

    def _optimizer(self, context: FisherContext) -> AdaFisher:
        self.check(context.optimizer)
        return _unwrap(context.optimizer)

    def diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        optimizer = self._optimizer(context)
        uncovered = [fqn for fqn, param in context.parameters.items() if not optimizer.covers(param)]
        if uncovered:
            raise ValueError(
                f"KroneckerFisher: no Kronecker factors for {uncovered}: AdaFisher keeps factors for the "
                "Linear, Conv2d, BatchNorm and LayerNorm parameters it optimizes and updates the others with "
                "an Adam rule. Prune only those layers, or use EmpiricalFisher for these parameters"
            )
        fisher = {}
        with torch.inference_mode(False):
            for fqn, param in context.parameters.items():
                try:
                    estimate = optimizer.fisher_diagonal(param)
                except RuntimeError as error:
                    raise RuntimeError(f"KroneckerFisher: {fqn}: {error}") from None
                estimate = estimate.to(param.device).clamp_min_(self.floor)
                if not torch.isfinite(estimate).all():
                    raise ValueError(f"KroneckerFisher: {fqn}: the Kronecker factors hold non-finite values")
                fisher[fqn] = estimate
        return fisher

    def inverse_diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        """1 / (F + δ) per parameter: the exact diagonal of (F + δI)⁻¹ for this diagonal F."""
        return {fqn: (f + self.damping).reciprocal_() for fqn, f in self.diagonal(context).items()}

    def inverse_product(self, context: FisherContext, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        """v / (F + δ) per parameter block (only the blocks given in ``vectors``: a diagonal couples nothing)."""
        missing = sorted(set(vectors) - set(context.parameters))
        if missing:
            raise KeyError(f"KroneckerFisher.inverse_product: vectors for unknown parameters {missing}")
        subset = FisherContext(
            model=context.model,
            parameters={fqn: context.parameters[fqn] for fqn in vectors},
            optimizer=context.optimizer,
            batch_size=context.batch_size,
            accumulate_grad_batches=context.accumulate_grad_batches,
            world_size=context.world_size,
        )
        fisher = self.diagonal(subset)
        products = {}
        for fqn, vector in vectors.items():
            if vector.shape != fisher[fqn].shape:
                raise ValueError(
                    f"{fqn}: vector shape {tuple(vector.shape)} != parameter shape {tuple(fisher[fqn].shape)}"
                )
            products[fqn] = vector.to(fisher[fqn]) / (fisher[fqn] + self.damping)
        return products

    def __repr__(self) -> str:
        return f"KroneckerFisher(damping={self.damping:g}, floor={self.floor:g})"
