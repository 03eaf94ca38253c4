"""Compression stages beyond pruning, in plain PyTorch: distillation, quantization, low rank, early exit.

Each stage is a core module here and a thin Lightning callback in :mod:`lightning_fisher.callbacks`;
:mod:`lightning_fisher.compress.metrics` measures any of their results in storage bits and
bit-operations, the units of "Order of Compression" (Shen et al., arXiv 2403.17447).
"""

from lightning_fisher.compress.distillation import distillation_loss, load_teacher, soft_kl
from lightning_fisher.compress.early_exit import EarlyExitModel, early_exit_loss
from lightning_fisher.compress.low_rank import LayerRank, LowRankConv2d, LowRankLinear, LowRankReport, factorize
from lightning_fisher.compress.metrics import (
    CompressionReport,
    bit_operations,
    compression_report,
    model_bits,
    weight_storage_bits,
)
from lightning_fisher.compress.quantization import (
    FakeQuantConv2d,
    FakeQuantLinear,
    QuantizedConv2d,
    QuantizedLinear,
    convert,
    prepare_qat_,
    quantize_weight,
)

__all__ = [
    "CompressionReport",
    "EarlyExitModel",
    "FakeQuantConv2d",
    "FakeQuantLinear",
    "LayerRank",
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankReport",
    "QuantizedConv2d",
    "QuantizedLinear",
    "bit_operations",
    "compression_report",
    "convert",
    "distillation_loss",
    "early_exit_loss",
    "factorize",
    "load_teacher",
    "model_bits",
    "prepare_qat_",
    "quantize_weight",
    "soft_kl",
    "weight_storage_bits",
]
