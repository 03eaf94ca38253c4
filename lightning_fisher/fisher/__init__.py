"""Fisher estimators: one interface (:mod:`.base`), one file per estimator."""

from lightning_fisher.fisher.base import FisherContext, FisherEstimator, LossFn
from lightning_fisher.fisher.empirical import EmpiricalFisher
from lightning_fisher.fisher.fishleg import FishLegFisher
from lightning_fisher.fisher.kronecker import KroneckerFisher
from lightning_fisher.fisher.monte_carlo import MonteCarloFisher
from lightning_fisher.fisher.passes import RepeatablePasses, stream_preserved
from lightning_fisher.fisher.squisher import SUPPORTED_OPTIMIZERS, Squisher

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "EmpiricalFisher",
    "FishLegFisher",
    "FisherContext",
    "FisherEstimator",
    "KroneckerFisher",
    "LossFn",
    "MonteCarloFisher",
    "RepeatablePasses",
    "Squisher",
    "stream_preserved",
]
