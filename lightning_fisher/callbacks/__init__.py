"""Lightning callbacks: thin adapters around the plain-PyTorch core."""

from lightning_fisher.callbacks.distillation import KnowledgeDistillation
from lightning_fisher.callbacks.early_exit import EarlyExit
from lightning_fisher.callbacks.fisher_pruning import FisherPruning
from lightning_fisher.callbacks.low_rank import LowRank
from lightning_fisher.callbacks.quantization import QuantizationAware
from lightning_fisher.callbacks.sparsity_monitor import SparsityMonitor

__all__ = ["EarlyExit", "FisherPruning", "KnowledgeDistillation", "LowRank", "QuantizationAware", "SparsityMonitor"]
