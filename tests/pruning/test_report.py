"""sparsity_report: per-layer zeros, for dense layers and for layers already swapped to N:M modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fisher.pruning.report import global_sparsity, prunable_parameter_names, sparsity_report
from lightning_fisher.sparse import to_sparse


def _half_zero_model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 33.0).reshape(4, 8))
        model[0].weight[:, 0::4] = 0  # 2:4 along the input: two zeros in every group of four
        model[0].weight[:, 1::4] = 0
        model[2].weight.fill_(1.0)
        model[2].weight[0, 0] = 0
    return model


def test_counts_exact_zeros_per_layer() -> None:
    rows = sparsity_report(_half_zero_model())
    assert [row["name"] for row in rows] == ["0.weight", "2.weight"]
    assert [row["zeros"] for row in rows] == [16, 1]
    assert rows[0]["sparsity"] == 0.5 and rows[1]["sparsity"] == 1 / 8
    assert global_sparsity(rows) == pytest.approx(17 / 40)


def test_a_layer_swapped_for_a_sparse_module_keeps_its_name_and_its_zeros() -> None:
    model = _half_zero_model()
    before = sparsity_report(model)
    sparse = to_sparse(model, "2:4", backend="triton")
    assert type(sparse[0]).__name__ == "NMSparseLinear"  # swapped: no `weight` parameter any more
    assert prunable_parameter_names(sparse) == ["0.weight", "2.weight"]
    assert sparsity_report(sparse) == before
    assert sparsity_report(sparse, ["0.weight"]) == before[:1]


def test_unknown_names_are_an_error() -> None:
    with pytest.raises(ValueError, match="not parameters"):
        sparsity_report(_half_zero_model(), ["0.bias_typo"])
