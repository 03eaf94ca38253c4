import functools

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher.module import ImageClassifier


def _module(**kwargs) -> ImageClassifier:
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    defaults = {"num_classes": 3, "optimizer": functools.partial(torch.optim.SGD, lr=0.1, weight_decay=1e-2)}
    return ImageClassifier(net, **{**defaults, **kwargs})


def test_norm_and_bias_parameters_get_no_weight_decay():
    optimizer = _module().configure_optimizers()
    decayed, undecayed = optimizer.param_groups
    assert decayed["weight_decay"] == 1e-2 and all(p.ndim == 2 for p in decayed["params"])
    assert undecayed["weight_decay"] == 0.0 and all(p.ndim == 1 for p in undecayed["params"])


def test_scheduler_is_stepped_per_epoch():
    config = _module(scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1)).configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "epoch"


def test_trains_and_logs_top_k(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    module = _module(top_k=(1, 2))
    trainer = L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader, loader)
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/acc", "val/acc", "val/acc_top2"} <= set(metrics)
    assert metrics["val/acc_top2"] >= metrics["val/acc"]
    assert metrics["val/acc"] > 0.6  # a linearly separable toy problem: chance is 1/3


@pytest.mark.parametrize(("kwargs", "match"), [({"label_smoothing": 1.0}, "label_smoothing"), ({"top_k": (4,)}, "top_k")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _module(**kwargs)
