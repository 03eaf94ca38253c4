"""N:M sparsity that runs faster: the compressed format, sparse modules and the model swap.

``to_sparse(model, pattern="2:4")`` swaps every Conv2d/Linear whose weight already holds the pattern
for :class:`NMSparseConv2d`/:class:`NMSparseLinear`, which run Triton kernels on a GPU (the kernels live
in :mod:`lightning_fisher.sparse.kernels`, imported on first use) and a torch fallback elsewhere.
``to_dense`` swaps back. This package never imports :mod:`lightning_fisher.pruning`: the handoff is a
dense weight with zeros in place.
"""

from __future__ import annotations

from lightning_fisher.sparse.auto import AUTO_MIN_SPEEDUP, choose_backend, layer_key, load_measurements, pick_backend
from lightning_fisher.sparse.convert import BACKENDS, SparseReport, fqn_filter, sparsify_, to_dense, to_sparse
from lightning_fisher.sparse.format import (
    NMWeight,
    code_bits,
    compress,
    decompress,
    gather_kept,
    nm_violation,
    pack_codes,
    parse_nm,
    unpack_codes,
    validate_nm,
)
from lightning_fisher.sparse.functional import kernels_available
from lightning_fisher.sparse.modules import MODULE_BACKENDS, NMSparseConv2d, NMSparseLinear

__all__ = [
    "AUTO_MIN_SPEEDUP",
    "BACKENDS",
    "MODULE_BACKENDS",
    "NMSparseConv2d",
    "NMSparseLinear",
    "NMWeight",
    "SparseReport",
    "choose_backend",
    "code_bits",
    "compress",
    "decompress",
    "fqn_filter",
    "gather_kept",
    "kernels_available",
    "layer_key",
    "load_measurements",
    "nm_violation",
    "pack_codes",
    "pick_backend",
    "parse_nm",
    "sparsify_",
    "to_dense",
    "to_sparse",
    "unpack_codes",
    "validate_nm",
]
