"""FishLeg's learned inverse Fisher: layer forms (:mod:`.forms`), Fisher-vector products on sampled
labels or exact (:mod:`.products`) and the estimator used by FishLeg Surgeon pruning (:mod:`.estimator`)."""

from lightning_fisher.fisher.fishleg.estimator import INITS, PROBES, REFRESH_MATCHES, FishLegFisher
from lightning_fisher.fisher.fishleg.forms import (
    CONV_FORMS,
    DiagonalForm,
    KroneckerForm,
    LayerForm,
    ThreeFactorConvForm,
    forms_for,
)
from lightning_fisher.fisher.fishleg.products import FVP_METHODS, fisher_vector_product

__all__ = [
    "CONV_FORMS",
    "FVP_METHODS",
    "INITS",
    "PROBES",
    "REFRESH_MATCHES",
    "DiagonalForm",
    "FishLegFisher",
    "KroneckerForm",
    "LayerForm",
    "ThreeFactorConvForm",
    "fisher_vector_product",
    "forms_for",
]
