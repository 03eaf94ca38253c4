"""The shared per-sample machinery: backend choice, mode switching, argument rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fisher.fisher.per_sample import check_sampling_args, estimation_mode, resolve_backend


def test_auto_backend_is_vmap_on_cuda_and_loop_elsewhere():
    assert resolve_backend("auto", torch.device("cuda", 0)) == "vmap"
    assert resolve_backend("auto", torch.device("cpu")) == "loop"
    assert resolve_backend("vmap", torch.device("cpu")) == "vmap"
    assert resolve_backend("loop", torch.device("cuda")) == "loop"


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_estimation_mode_sets_and_restores_every_flag(bn_mode):
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(), nn.Sequential(nn.BatchNorm1d(2)))
    model.train()
    model[3].eval()  # a nested module in a different mode than its parent
    before = [m.training for m in model.modules()]
    with estimation_mode(model, bn_mode):
        assert not model[2].training and not model[0].training  # dropout and the rest: eval
        assert model[1].training == (bn_mode == "train") and model[3][0].training == (bn_mode == "train")
    assert [m.training for m in model.modules()] == before


def test_estimation_mode_restores_flags_after_an_error():
    model = nn.Sequential(nn.BatchNorm1d(2))
    with pytest.raises(RuntimeError, match="boom"), estimation_mode(model, "eval"):
        raise RuntimeError("boom")
    assert model.training and model[0].training


def test_argument_rules():
    check_sampling_args(1, None, "eval", "loop")
    for args, message in [
        ((True, 1, "eval"), r"num_samples=True"),
        ((1, False, "eval"), r"chunk_size=False"),
        ((1, 1, "EVAL"), r"bn_mode='EVAL'"),
        ((1, 1, "eval", "auto "), r"backend='auto '"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_sampling_args(*args)
