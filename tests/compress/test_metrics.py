"""Storage bits and bit-operations on layers small enough to count by hand."""

import pytest
import torch
from torch import nn

from lightning_fisher.compress import metrics
from lightning_fisher.compress.metrics import (
    CompressionReport,
    bit_operations,
    compression_report,
    model_bits,
    weight_storage_bits,
)
from lightning_fisher.compress.quantization import FakeQuantLinear


def _linear_with_zeros() -> nn.Linear:
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2, 0, 0], [0, 3, 4, 0], [5, 0, 0, 0], [0, 0, 0, 6]]))
    return layer


def test_all_exported_names_resolve():
    assert all(hasattr(metrics, name) for name in metrics.__all__)


def test_linear_with_zeros_is_stored_sparse_with_a_bitmap():
    # 6 non-zeros of 16: dense 16·32 = 512, bitmap 6·32 + 16 = 208, 2:4 (N=2) 8 slots · 34 = 272
    assert model_bits(_linear_with_zeros()) == 208


def test_dense_weight_costs_32_bits_each_plus_bias():
    layer = nn.Linear(3, 2)
    nn.init.constant_(layer.weight, 1.0)
    assert model_bits(layer) == 6 * 32 + 2 * 32


def test_one_of_four_pattern_is_stored_as_n_m():
    weight = torch.zeros(8, 8)
    weight[:, ::4] = 1.0  # one non-zero in every group of 4 along the input
    # bitmap 16·32 + 64 = 576; 1:4 keeps 64/4 = 16 slots of 32 + 2 index bits = 544
    assert weight_storage_bits(weight, 32) == 544


def test_batchnorm_counts_statistics_but_not_the_batch_counter():
    assert model_bits(nn.BatchNorm2d(3)) == 4 * 3 * 32


def test_fake_quant_weight_counts_declared_bits_plus_per_channel_scales():
    layer = FakeQuantLinear.from_float(nn.Linear(4, 4), weight_bits=8, activation_bits=8)
    nn.init.constant_(layer.weight, 0.5)
    # weights 16·8, scales 4·32, bias 4·32, activation range 2·32, observed flag 1
    assert model_bits(layer) == 16 * 8 + 4 * 32 + 4 * 32 + 2 * 32 + 1


def test_bit_operations_of_a_linear_count_only_nonzero_weights():
    layer = _linear_with_zeros()
    assert bit_operations(layer, torch.randn(5, 4)) == 6 * 32 * 32


def test_bit_operations_of_a_1x1_conv():
    conv = nn.Conv2d(2, 3, kernel_size=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0, 2, 3, 0, 0]).reshape(3, 2, 1, 1))
    # 25 output positions × 3 non-zero weights
    assert bit_operations(conv, torch.randn(2, 2, 5, 5)) == 25 * 3 * 32 * 32


def test_bit_operations_use_declared_bit_widths_and_restore_the_mode():
    layer = FakeQuantLinear.from_float(_linear_with_zeros(), weight_bits=4, activation_bits=8)
    layer.train()
    assert bit_operations(layer, torch.randn(3, 4)) == 6 * 4 * 8
    assert layer.training


def test_compression_report_against_a_model_and_against_numbers():
    dense = nn.Linear(4, 4, bias=False)
    nn.init.constant_(dense.weight, 1.0)
    inputs = torch.randn(2, 4)
    report = compression_report(_linear_with_zeros(), dense, inputs, accuracy=0.5)
    assert report.dense_bits == 512 and report.bits == 208
    assert report.compression_ratio == pytest.approx(512 / 208)
    assert report.bit_op_reduction == pytest.approx(16 / 6)
    assert report.to_dict()["accuracy"] == 0.5
    for reference in ({"bits": 512, "bit_ops": 16 * 1024}, (512, 16 * 1024), report):
        again = compression_report(_linear_with_zeros(), reference, inputs)
        assert isinstance(again, CompressionReport)
        assert again.compression_ratio == pytest.approx(512 / 208 if reference is not report else 1.0)


def test_bad_inputs():
    with pytest.raises(TypeError, match="dense_model_or_reference_numbers"):
        compression_report(nn.Linear(2, 2), "dense", torch.randn(1, 2))
    with pytest.raises(ValueError, match="accuracy=1.5"):
        compression_report(nn.Linear(2, 2), (1, 1.0), torch.randn(1, 2), accuracy=1.5)
    with pytest.raises(ValueError, match="inputs"):
        bit_operations(nn.Linear(2, 2), torch.empty(0, 2))
    with pytest.raises(ValueError, match="bits=0"):
        weight_storage_bits(torch.ones(2, 2), 0)


def test_compress_package_exports_resolve_and_import_without_lightning():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
        "import lightning_fisher.compress as c\n"
        "missing = [n for n in c.__all__ if not hasattr(c, n)]\n"
        "assert not missing, missing\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
