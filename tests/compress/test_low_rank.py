"""SVD factorisation: exact truncation error, the rank rules, and the LowRank callback."""

from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher.callbacks import LowRank
from lightning_fisher.compress.low_rank import LowRankConv2d, LowRankLinear, check_rank_rule, factorize
from lightning_fisher.models.resnet import ResNet18
from lightning_fisher.module import ImageClassifier


def _loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)), batch_size=16)


def _trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    return L.Trainer(callbacks=callbacks, max_epochs=kwargs.pop("max_epochs", 1), accelerator="cpu", devices=1,
                     logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, num_sanity_val_steps=0, **kwargs)


def test_linear_truncation_error_equals_the_dropped_singular_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16))
    weight = model[0].weight.detach().clone()
    s = torch.linalg.svdvals(weight)
    report = factorize(model, rank_fraction=0.25)
    factored = model[0]
    assert isinstance(factored, LowRankLinear) and factored.rank == 4 == report.layers["0"].rank
    error = torch.linalg.matrix_norm(weight - factored.up.weight @ factored.down.weight)
    assert torch.isclose(error, s[4:].pow(2).sum().sqrt(), rtol=1e-4)
    assert report.layers["0"].kept_energy == pytest.approx(float(s[:4].pow(2).sum() / s.pow(2).sum()), rel=1e-5)


def test_conv_factors_reproduce_the_truncated_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=True)
    model = nn.Sequential(conv)
    weight = conv.weight.detach().reshape(8, -1).clone()
    s = torch.linalg.svdvals(weight)
    x = torch.randn(2, 6, 9, 9)
    factorize(model, rank_fraction=0.5)
    factored = model[0]
    assert isinstance(factored, LowRankConv2d) and factored.down.kernel_size == (3, 3) and factored.up.kernel_size == (1, 1)
    product = factored.up.weight.reshape(8, 4) @ factored.down.weight.reshape(4, -1)
    assert torch.isclose(torch.linalg.matrix_norm(weight - product), s[4:].pow(2).sum().sqrt(), rtol=1e-4)
    expected = nn.functional.conv2d(x, product.reshape(conv.weight.shape), conv.bias, stride=2, padding=1)
    assert torch.allclose(factored(x), expected, atol=1e-5)


def test_energy_picks_the_smallest_sufficient_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    s = torch.linalg.svdvals(model[0].weight.detach())
    layer = factorize(model, energy=0.5).layers["0"]
    share = s.double().pow(2).cumsum(0) / s.double().pow(2).sum()
    assert layer.kept_energy >= 0.5 > share[layer.rank - 2]


def test_parameter_budget_and_layers_that_stay():
    torch.manual_seed(0)
    model = ResNet18(10, width=4)
    report = factorize(model, parameter_budget=0.5)
    for name, layer in report.layers.items():
        assert layer.params_after <= 0.5 * layer.params_before, name
    # with at least rank 1 every layer of ResNet18(width=4) saves weights: all 21 are factored
    assert len(report.layers) == 21 and report.skipped == {}
    assert report.params_after <= 0.5 * report.params_before  # measured 44012 -> 21085


def test_small_layers_stay_and_are_listed():
    model = nn.Sequential(nn.Linear(4, 4))
    report = factorize(model, energy=1.0)
    assert type(model[0]) is nn.Linear and "would not save weights" in report.skipped["0"]


def test_fixed_ranks_rebuild_the_same_shapes():
    torch.manual_seed(0)
    first, second = ResNet18(10, width=4), ResNet18(10, width=4)
    ranks = factorize(first, energy=0.8).ranks
    factorize(second, ranks=ranks)
    assert second.load_state_dict(first.state_dict()) is not None
    with pytest.raises(ValueError, match="no Linear/Conv2d layers named"):
        factorize(ResNet18(10, width=4), ranks={"nope": 2})


def test_callback_rebuilds_the_optimizer_and_fine_tunes(tmp_path):
    torch.manual_seed(0)
    module = ImageClassifier(ResNet18(10, width=4), num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.05))
    callback = LowRank(energy=0.8, start_epoch=1)
    trainer = _trainer(tmp_path, [callback], max_epochs=3, enable_checkpointing=False)
    factored_weights = {}

    class Snapshot(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                factored_weights.update({n: p.detach().clone() for n, p in pl_module.net.named_parameters()})

    trainer.callbacks.append(Snapshot())
    trainer.fit(module, _loader())
    assert callback.report is not None and len(callback.report.layers) > 0
    net_params = {id(p) for p in module.net.parameters()}
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == net_params  # the factors are what the optimizer updates
    name = next(iter(callback.report.layers))
    assert isinstance(module.net.get_submodule(name), (LowRankConv2d, LowRankLinear))
    assert not torch.equal(factored_weights[f"{name}.up.weight"], module.net.get_submodule(name).up.weight)
    assert 0 < trainer.callback_metrics["low_rank/weight_ratio"] < 1


def test_callback_resumes_into_the_factored_model(tmp_path):
    torch.manual_seed(0)
    module = ImageClassifier(ResNet18(10, width=4), num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.05))
    trainer = _trainer(tmp_path, [LowRank(energy=0.8, start_epoch=1)], max_epochs=2)
    trainer.fit(module, _loader())
    ckpt = trainer.checkpoint_callback.best_model_path
    resumed = ImageClassifier(ResNet18(10, width=4), num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.05))
    callback = LowRank(energy=0.8, start_epoch=1)
    _trainer(tmp_path, [callback], max_epochs=3).fit(resumed, _loader(), ckpt_path=ckpt)
    assert callback.report is not None and callback.report.ranks == trainer.callbacks[0].report.ranks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"energy": 0.9, "rank_fraction": 0.5}, "exactly one"),
        ({"energy": 0.0}, "energy=0.0"),
        ({"parameter_budget": 1.5}, "parameter_budget=1.5"),
        ({"start_epoch": -1}, "start_epoch=-1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRank(**kwargs)


def test_default_rule_is_energy():
    assert check_rank_rule(0.9, None, None) == ("energy", 0.9)
    callback = LowRank()
    assert (callback.rule, callback.value) == ("energy", 0.9)
