"""AdaFisher under Lightning's automatic optimization: accumulation, AMP with a GradScaler, resuming."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher.optim import AdaFisher, AdaFisherW


class _Classifier(L.LightningModule):
    """A user's module: ``configure_optimizers`` builds AdaFisher on the module itself."""

    def __init__(self, attach_scaler: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 64, 3)
        )
        self.attach_scaler = attach_scaler
        self.losses: list[float] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = AdaFisherW(self, lr=0.01)
        if self.attach_scaler:
            optimizer.attach_grad_scaler(self.trainer.precision_plugin.scaler)
        return optimizer


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=generator)
    return DataLoader(TensorDataset(x, (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()), batch_size=8)


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


def test_accumulation_in_lightning_matches_a_manual_loop(tmp_path):
    module = _Classifier()
    manual = copy.deepcopy(module.net)
    _trainer(tmp_path, accumulate_grad_batches=2).fit(module, _loader())
    optimizer = module.trainer.optimizers[0]
    assert optimizer.steps == 2
    reference = AdaFisherW(manual, lr=0.01)
    batches = list(_loader())
    for window in (batches[:2], batches[2:]):
        reference.zero_grad()
        for x, y in window:
            (F.cross_entropy(manual(x), y) / 2).backward()
        reference.step()
    for p, q in zip(manual.parameters(), module.net.parameters()):
        torch.testing.assert_close(p, q)
    for name, entry in reference.factors().items():
        got = optimizer.factors()[f"net.{name}"]
        assert got["refreshes"] == entry["refreshes"] == 2
        torch.testing.assert_close(got["S"], entry["S"])


def test_fp16_amp_with_a_grad_scaler_trains(tmp_path):
    module = _Classifier(attach_scaler=True)
    before = [p.detach().clone() for p in module.parameters()]
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    _trainer(tmp_path, plugins=[precision], max_epochs=3).fit(module, _loader())
    optimizer = module.trainer.optimizers[0]
    assert optimizer.steps == 12
    assert all(torch.isfinite(torch.tensor(module.losses)))
    assert all(not torch.equal(p, q) for p, q in zip(before, module.parameters()))
    # the scaler is attached: S is in unscaled units. Measured: largest entry 5.7 (9.5e7 without the
    # scaler attached, the loss scale squared), and the same final loss either way
    assert max(float(entry["S"].max()) for entry in optimizer.factors().values()) < 100.0


def test_resuming_from_a_checkpoint_continues_exactly(tmp_path):
    straight = _Classifier()
    _trainer(tmp_path / "a", max_epochs=2).fit(straight, _loader())

    first = _Classifier()
    trainer = _trainer(tmp_path / "b", max_epochs=1)
    trainer.fit(first, _loader())
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = _Classifier()
    _trainer(tmp_path / "c", max_epochs=2).fit(resumed, _loader(), ckpt_path=tmp_path / "half.ckpt")

    assert resumed.trainer.optimizers[0].steps == straight.trainer.optimizers[0].steps == 8
    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("optimizer_cls", [AdaFisher, AdaFisherW])
def test_a_lightning_module_can_pass_itself(optimizer_cls):
    module = _Classifier()
    optimizer = optimizer_cls(module, lr=1e-3)
    assert all(optimizer.covers(p) for p in module.parameters())
