"""KroneckerFisher: AdaFisher's factors read as a Fisher diagonal, its inverse, its errors, and pruning."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher.callbacks import FisherPruning
from lightning_fisher.fisher.base import FisherContext
from lightning_fisher.fisher.kronecker import KroneckerFisher
from lightning_fisher.optim import AdaFisher, AdaFisherW
from lightning_fisher.pruning.pruner import Pruner


def _trained(model: nn.Module, x: Tensor, y: Tensor, steps: int = 2, **kwargs) -> AdaFisher:
    optimizer = AdaFisher(model, **kwargs)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return optimizer


def _context(model: nn.Module, optimizer, *names: str) -> FisherContext:
    params = dict(model.named_parameters())
    return FisherContext(model, {n: params[n] for n in names}, optimizer)


@pytest.mark.parametrize(("kwargs", "match"), [({"damping": 0.0}, "damping=0.0"), ({"floor": -1.0}, "floor=-1.0")])
def test_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KroneckerFisher(**kwargs)


def test_check_names_the_optimizer_and_the_alternatives(small_net):
    estimator = KroneckerFisher()
    with pytest.raises(ValueError, match="optimizer=None"):
        estimator.check(None)
    for other in (torch.optim.SGD(small_net.parameters(), lr=0.1), torch.optim.Adam(small_net.parameters())):
        name = type(other).__name__
        with pytest.raises(TypeError, match=f"optimizer={name}: .*AdaFisher.*Squisher.*EmpiricalFisher"):
            estimator.check(other)

    class Wrapper:  # what Lightning hands to callbacks
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

    estimator.check(Wrapper(AdaFisherW(small_net)))
    assert estimator.supports_inverse and not estimator.requires_data and not estimator.needs_all_reduce
    assert estimator.state_dict() == {}


def test_one_sample_gives_the_squared_per_sample_gradient_of_a_linear_layer(small_net, small_data):
    # With one sample per step and γ = 0, diag H ⊗ diag S of a Linear layer is exactly g² (no approximation):
    # g = s aᵀ, so g² = s² (a²)ᵀ = S Hᵀ.
    small_net.eval()  # no dropout; BatchNorm on its running statistics
    x, y = small_data
    optimizer = _trained(small_net, x[:1], y[:1], steps=1, lr=0.0, gamma=0.0)
    fisher = KroneckerFisher().diagonal(_context(small_net, optimizer, "fc.weight", "fc.bias"))
    small_net.zero_grad()
    F.cross_entropy(small_net(x[:1]), y[:1]).backward()
    torch.testing.assert_close(fisher["fc.weight"], small_net.fc.weight.grad.square().clamp_min(1e-30))
    torch.testing.assert_close(fisher["fc.bias"], small_net.fc.bias.grad.square().clamp_min(1e-30))


def test_diagonal_is_the_kronecker_product_of_the_raw_factors(small_net, small_data):
    x, y = small_data
    optimizer = _trained(small_net, x, y, steps=3, lr=1e-3)
    names = ("conv.weight", "conv.bias", "bn.weight", "bn.bias")
    fisher = KroneckerFisher().diagonal(_context(small_net, optimizer, *names))
    conv = optimizer.factors()["conv"]
    h, s = conv["H"], conv["S"]
    torch.testing.assert_close(fisher["conv.weight"], (s[:, None] * h[None, :-1]).reshape(4, 3, 3, 3))
    torch.testing.assert_close(fisher["conv.bias"], s * h[-1])
    bn = optimizer.factors()["bn"]
    torch.testing.assert_close(fisher["bn.weight"], bn["H"] * bn["S"])
    torch.testing.assert_close(fisher["bn.bias"], bn["S"])
    assert all(f.shape == dict(small_net.named_parameters())[n].shape for n, f in fisher.items())


def test_inverse_is_the_reciprocal_of_the_damped_diagonal(small_net, small_data):
    x, y = small_data
    optimizer = _trained(small_net, x, y)
    estimator = KroneckerFisher(damping=1e-3)
    context = _context(small_net, optimizer, "conv.weight", "fc.weight")
    fisher = estimator.diagonal(context)
    inverse = estimator.inverse_diagonal(context)
    for name, f in fisher.items():
        torch.testing.assert_close(inverse[name], 1.0 / (f + 1e-3))
    vectors = {"fc.weight": torch.randn(5, 144)}
    product = estimator.inverse_product(context, vectors)
    assert set(product) == {"fc.weight"}
    torch.testing.assert_close(product["fc.weight"], vectors["fc.weight"] / (fisher["fc.weight"] + 1e-3))
    with pytest.raises(KeyError, match="unknown parameters"):
        estimator.inverse_product(context, {"bn.weight": torch.ones(4)})
    with pytest.raises(ValueError, match="vector shape"):
        estimator.inverse_product(context, {"fc.weight": torch.ones(3)})


def test_parameters_without_factors_and_missing_factors_are_errors(small_data):
    class WithFree(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3 * 6 * 6, 5)
            self.gain = nn.Parameter(torch.ones(5))

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x.flatten(1)) * self.gain

    x, y = small_data
    model = WithFree()
    optimizer = AdaFisher(model)
    with pytest.raises(RuntimeError, match="fc.weight: fc: no Kronecker factors yet"):
        KroneckerFisher().diagonal(_context(model, optimizer, "fc.weight"))
    optimizer = _trained(model, x, y)
    with pytest.raises(ValueError, match=r"no Kronecker factors for \['gain'\]"):
        KroneckerFisher().diagonal(_context(model, optimizer, "fc.weight", "gain"))


# ---------------------------------------------------------------------------------------------- pruning
class _Pruned(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Flatten(), nn.Linear(8 * 64, 16), nn.ReLU(), nn.Linear(16, 3),
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return AdaFisher(self, lr=1e-3)


@pytest.mark.parametrize("compensate", [False, True])
def test_fisher_pruning_with_the_kronecker_fisher_reaches_its_target(tmp_path, compensate):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=generator)
    loader = DataLoader(TensorDataset(x, torch.randint(0, 3, (32,), generator=generator)), batch_size=8)
    pruning = FisherPruning(
        target_sparsity=0.5, estimator=KroneckerFisher(), start_epoch=1, end_epoch=2, compensate=compensate,
        verbose=False,
    )
    module = _Pruned()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[pruning],
    )
    trainer.fit(module, loader)
    assert set(pruning.masks) == {"net.2.weight", "net.6.weight"}  # the stem and the classifier stay dense
    assert pruning.sparsity == pytest.approx(0.5, abs=1e-3)
    assert float((module.net[6].weight == 0).float().mean()) > 0.3


def test_obs_with_the_kronecker_inverse_moves_only_the_pruned_weights(small_net, small_data):
    # F is diagonal, so its inverse couples nothing: no bias blocks, and OBS is OBD for the survivors
    x, y = small_data
    optimizer = _trained(small_net, x, y, steps=3, lr=1e-3)
    pruner = Pruner(0.5, criterion="fisher", schedule="one_shot", compensate=True, keep_first_dense=False,
                    keep_last_dense=False)
    pruner.prepare(small_net)
    assert set(pruner.parameters) == {"conv.weight", "fc.weight"}
    assert {"conv.bias", "fc.bias", "bn.weight", "bn.bias"} <= set(pruner.coupled)
    estimator = KroneckerFisher(damping=1e-3)
    context = FisherContext(small_net, dict(pruner.parameters), optimizer)
    vectors = {n: torch.randn(p.shape) for n, p in pruner.parameters.items()}
    assert set(estimator.inverse_product(context, vectors)) == {"conv.weight", "fc.weight"}
    before = {n: p.detach().clone() for n, p in small_net.named_parameters()}
    pruner.step(0, inverse_diag=estimator.inverse_diagonal(context),
                inverse_product=lambda v: estimator.inverse_product(context, v))
    for name, param in small_net.named_parameters():
        if name in pruner.masks:
            mask = pruner.masks[name]
            assert (~mask).any() and (param[~mask] == 0).all()
            # θ − Q_jj·0 for the survivors: they do not move at all
            assert torch.equal(param.detach()[mask], before[name][mask]), name
        else:
            assert torch.equal(param.detach(), before[name]), name
