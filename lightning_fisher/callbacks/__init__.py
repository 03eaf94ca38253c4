"""Lightning callbacks: thin adapters around the plain-PyTorch core."""

from lightning_fisher.callbacks.fisher_pruning import FisherPruning
from lightning_fisher.callbacks.sparsity_monitor import SparsityMonitor

__all__ = ["FisherPruning", "SparsityMonitor"]
