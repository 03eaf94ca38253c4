"""lightning-fisher: prune networks with second-order (Fisher) information at first-order cost.

The public API is re-exported here. Names are imported on first use, so importing the plain-PyTorch
core (``lightning_fisher.fisher``, ``.pruning``, ``.sparse``, ``.optim``) does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ResNet18": "lightning_fisher.models",
    "resnet18_cifar": "lightning_fisher.models",
    "resnet18_tinyimagenet": "lightning_fisher.models",
    "CIFAR10DataModule": "lightning_fisher.data",
    "TinyImageNetDataModule": "lightning_fisher.data",
    "DigitsDataModule": "lightning_fisher.data",
    "ImageClassifier": "lightning_fisher.module",
    "FisherContext": "lightning_fisher.fisher",
    "FisherEstimator": "lightning_fisher.fisher",
    "Squisher": "lightning_fisher.fisher",
    "EmpiricalFisher": "lightning_fisher.fisher",
    "MonteCarloFisher": "lightning_fisher.fisher",
    "KroneckerFisher": "lightning_fisher.fisher",
    "FishLegFisher": "lightning_fisher.fisher",
    "FisherPruning": "lightning_fisher.callbacks",
    "SparsityMonitor": "lightning_fisher.callbacks",
    "sparsity_report": "lightning_fisher.pruning",
    "export_pruned": "lightning_fisher.pruning",
    "load_pruned": "lightning_fisher.pruning",
    "load_weights": "lightning_fisher.weights",
    "AdaFisher": "lightning_fisher.optim",
    "AdaFisherW": "lightning_fisher.optim",
    "to_sparse": "lightning_fisher.sparse",
    "to_dense": "lightning_fisher.sparse",
    "sparsify_": "lightning_fisher.sparse",
    "NMSparseLinear": "lightning_fisher.sparse",
    "NMSparseConv2d": "lightning_fisher.sparse",
    "SparseReport": "lightning_fisher.sparse",
    "KnowledgeDistillation": "lightning_fisher.callbacks",
    "QuantizationAware": "lightning_fisher.callbacks",
    "LowRank": "lightning_fisher.callbacks",
    "EarlyExit": "lightning_fisher.callbacks",
    "EarlyExitModel": "lightning_fisher.compress",
    "CompressionReport": "lightning_fisher.compress",
    "compression_report": "lightning_fisher.compress",
    "model_bits": "lightning_fisher.compress",
    "bit_operations": "lightning_fisher.compress",
    "run_pipeline": "lightning_fisher.compress.pipeline",
    "HostSyncCounter": "lightning_fisher.profiling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_fisher' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
