"""SparsityMonitor on a tiny module with known zeros, and the sparsity_report table behind it."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher.callbacks.sparsity_monitor import SparsityMonitor
from lightning_fisher.pruning.report import global_sparsity, prunable_parameter_names, sparsity_report

# hidden.weight: 8 of 32 entries zero; out.weight: 0 of 24; conv.weight: 3 of 18 (18 = 2·1·3·3).
HIDDEN_ZEROS, OUT_ZEROS, CONV_ZEROS = 8, 0, 3
ALL_WEIGHTS = 32 + 24 + 18


class ZerosModule(L.LightningModule):
    """Known zeros that stay put: the optimizer is SGD with lr=0, so the weights never change."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.hidden = nn.Linear(2 * 2 * 2, 4 * 1)  # 8 inputs -> 4 outputs: 32 weights
        self.out = nn.Linear(4, 6)  # 24 weights
        self.norm = nn.BatchNorm1d(4)  # not a Conv2d/Linear: never reported
        with torch.no_grad():
            for weight in (self.conv.weight, self.hidden.weight, self.out.weight):
                weight.copy_(torch.rand_like(weight) + 0.1)  # no accidental zeros
            self.hidden.weight.view(-1)[:HIDDEN_ZEROS] = 0.0
            self.conv.weight.view(-1)[:CONV_ZEROS] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv(x)).flatten(1)
        return self.out(self.norm(F.relu(self.hidden(x))))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return _loader()

    def val_dataloader(self) -> DataLoader:
        return _loader()


class NoValidation(ZerosModule):
    validation_step = None  # type: ignore[assignment]
    val_dataloader = None  # type: ignore[assignment]


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 2, 2, generator=generator), torch.randint(0, 6, (16,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


class FakePruning(Callback):
    """Stands in for FisherPruning: only the attributes the monitor reads."""

    def __init__(self) -> None:
        self.masks = {"hidden.weight": torch.ones(4, 8, dtype=torch.bool)}
        self.scheduled_sparsity = 0.3


def _trainer(tmp_path: Path, callbacks: list[Callback], **overrides: Any) -> L.Trainer:
    kwargs: dict[str, Any] = dict(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    kwargs.update(overrides)
    return L.Trainer(callbacks=callbacks, **kwargs)


def _epoch_metrics(trainer: L.Trainer) -> list[dict[str, str]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        return [row for row in csv.DictReader(handle) if row.get("sparsity/global")]


def _curve(directory: Path) -> list[dict[str, str]]:
    with open(directory / "sparsity_curve.csv") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------ report


def test_sparsity_report_counts_zeros_per_layer():
    rows = sparsity_report(ZerosModule())
    assert rows == [
        {"name": "conv.weight", "shape": (2, 1, 3, 3), "numel": 18, "zeros": 3, "sparsity": 3 / 18},
        {"name": "hidden.weight", "shape": (4, 8), "numel": 32, "zeros": 8, "sparsity": 0.25},
        {"name": "out.weight", "shape": (6, 4), "numel": 24, "zeros": 0, "sparsity": 0.0},
    ]
    assert global_sparsity(rows) == pytest.approx((CONV_ZEROS + HIDDEN_ZEROS) / ALL_WEIGHTS)
    assert global_sparsity([]) == 0.0


def test_sparsity_report_for_given_names_keeps_their_order():
    model = ZerosModule()
    rows = sparsity_report(model, ["out.weight", "hidden.bias", "hidden.weight"])
    assert [row["name"] for row in rows] == ["out.weight", "hidden.bias", "hidden.weight"]
    assert rows[2]["zeros"] == HIDDEN_ZEROS and rows[1]["numel"] == 4
    assert prunable_parameter_names(nn.Linear(2, 2)) == ["weight"]
    with pytest.raises(ValueError, match=r"parameter_names=\['missing.weight'\]: not parameters of the model"):
        sparsity_report(model, ["hidden.weight", "missing.weight"])


# ----------------------------------------------------------------------------------------- monitor


def test_logs_sparsity_every_epoch_and_writes_the_curve(tmp_path):
    monitor = SparsityMonitor()
    trainer = _trainer(tmp_path, [monitor])
    trainer.fit(ZerosModule())

    logged = _epoch_metrics(trainer)
    assert len(logged) == 2  # one row per validation epoch, none from the sanity check
    expected_global = (CONV_ZEROS + HIDDEN_ZEROS) / ALL_WEIGHTS  # no pruning callback: all weights
    for row in logged:
        assert float(row["sparsity/global"]) == pytest.approx(expected_global)
        assert float(row["sparsity/model"]) == pytest.approx(expected_global)
        assert float(row["sparsity/layer/hidden.weight"]) == pytest.approx(0.25)
        assert float(row["sparsity/layer/conv.weight"]) == pytest.approx(3 / 18)
        assert float(row["sparsity/layer/out.weight"]) == 0.0
    assert "sparsity/target" not in logged[0] and not any(k.startswith("sparsity/layer/norm") for k in logged[0])

    log_dir = Path(trainer.log_dir)
    curve = _curve(log_dir)
    assert list(curve[0]) == ["epoch", "step", "global_sparsity", "target", "accuracy"]
    assert [(row["epoch"], row["step"]) for row in curve] == [("0", "2"), ("1", "4")]
    assert [float(row["global_sparsity"]) for row in curve] == pytest.approx([expected_global] * 2)
    assert [row["target"] for row in curve] == ["", ""]
    val_acc = [float(row["val/acc"]) for row in csv.DictReader(open(log_dir / "metrics.csv")) if row["val/acc"]]
    assert [float(row["accuracy"]) for row in curve] == pytest.approx(val_acc)
    png = log_dir / "sparsity_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert [row["epoch"] for row in monitor.history] == [0, 1]


def test_reads_masks_and_scheduled_target_from_a_pruning_callback(tmp_path):
    trainer = _trainer(tmp_path, [FakePruning(), SparsityMonitor(log_per_layer=False)])
    trainer.fit(ZerosModule())
    logged = _epoch_metrics(trainer)
    assert float(logged[-1]["sparsity/global"]) == pytest.approx(0.25)  # over hidden.weight only
    assert float(logged[-1]["sparsity/model"]) == pytest.approx((CONV_ZEROS + HIDDEN_ZEROS) / ALL_WEIGHTS)
    assert float(logged[-1]["sparsity/target"]) == pytest.approx(0.3)
    assert not any(key.startswith("sparsity/layer/") for key in logged[-1])
    assert [float(row["target"]) for row in _curve(Path(trainer.log_dir))] == [0.3, 0.3]


def test_without_validation_records_at_train_epoch_end_and_warns_about_accuracy(tmp_path):
    monitor = SparsityMonitor(dirpath=str(tmp_path / "curves"))
    trainer = _trainer(tmp_path, [monitor])
    with pytest.warns(UserWarning, match=r"monitor='val/acc'\): no such metric"):
        trainer.fit(NoValidation())
    assert monitor.log_on_train_epoch_end is True
    curve = _curve(tmp_path / "curves")
    assert [row["epoch"] for row in curve] == ["0", "1"] and [row["accuracy"] for row in curve] == ["", ""]
    assert (tmp_path / "curves" / "sparsity_curve.png").exists()


def test_limit_val_batches_zero_also_means_train_epoch_end(tmp_path):
    monitor = SparsityMonitor(monitor="train_loss_absent")
    trainer = _trainer(tmp_path, [monitor], limit_val_batches=0)
    with pytest.warns(UserWarning, match="no such metric"):
        trainer.fit(ZerosModule())
    assert monitor.log_on_train_epoch_end is True and len(monitor.history) == 2


def test_fast_dev_run_writes_nothing(tmp_path):
    monitor = SparsityMonitor(dirpath=str(tmp_path / "curves"))
    trainer = _trainer(tmp_path, [monitor], fast_dev_run=True, logger=None)
    trainer.fit(ZerosModule())
    assert monitor.history == [] and not (tmp_path / "curves").exists()


def test_logs_table_and_image_to_wandb(tmp_path):
    wandb = mock.create_autospec(WandbLogger, instance=True)
    trainer = _trainer(tmp_path, [FakePruning(), SparsityMonitor()], logger=[CSVLogger(tmp_path, name="run"), wandb])
    trainer.fit(ZerosModule())
    wandb.log_table.assert_called_once()
    table = wandb.log_table.call_args.kwargs
    assert table["key"] == "sparsity_curve"
    assert table["columns"] == ["epoch", "step", "global_sparsity", "target", "accuracy"]
    assert [row[:4] for row in table["data"]] == [[0, 2, 0.25, 0.3], [1, 4, 0.25, 0.3]]
    wandb.log_image.assert_called_once_with(
        key="sparsity_curve_plot", images=[str(Path(trainer.log_dir) / "sparsity_curve.png")]
    )


def test_state_dict_round_trip():
    monitor = SparsityMonitor()
    monitor.history = [{"epoch": 0, "step": 5, "global_sparsity": 0.5, "target": 0.5, "accuracy": 0.9}]
    restored = SparsityMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.history == monitor.history and restored.history is not monitor.history
    assert monitor.state_dict()["version"] == 1
    restored.load_state_dict({"version": 1})  # an old checkpoint without history keeps the current one
    assert restored.history == monitor.history
    with pytest.raises(ValueError, match="SparsityMonitor state version 2: expected 1"):
        restored.load_state_dict({"version": 2, "history": []})


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resumed_run_writes_the_whole_curve(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer_a = L.Trainer(
        callbacks=[SparsityMonitor(dirpath=str(tmp_path / "a")), checkpoint], max_epochs=2, limit_train_batches=2,
        limit_val_batches=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer_a.fit(ZerosModule())
    resumed = SparsityMonitor(dirpath=str(tmp_path / "b"))
    trainer_b = L.Trainer(
        callbacks=[resumed], max_epochs=3, limit_train_batches=2, limit_val_batches=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )
    trainer_b.fit(ZerosModule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [row["epoch"] for row in _curve(tmp_path / "b")] == ["0", "1", "2"]
    assert [row["epoch"] for row in _curve(tmp_path / "a")] == ["0", "1"]


def test_misconfiguration(tmp_path):
    with pytest.raises(ValueError, match=r"monitor='': must be a non-empty metric name"):
        SparsityMonitor(monitor="")

    class NoWeights(ZerosModule):
        def __init__(self) -> None:
            super().__init__()
            self.conv = self.hidden = self.out = nn.Identity()

    with pytest.raises(ValueError, match="NoWeights has no Conv2d or Linear weights to monitor"):
        _trainer(tmp_path, [SparsityMonitor()]).fit(NoWeights())
