"""The LightningModule the recipes train: any image classifier, its optimizer, its LR schedule."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import inspect

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["ImageClassifier"]

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class ImageClassifier(L.LightningModule):
    """Trains a classifier with cross-entropy and reports top-k accuracy on train/val/test.

    Args:
        net: any ``nn.Module`` mapping images to logits (torchvision-style).
        num_classes: number of classes, for the accuracy metrics.
        optimizer: a factory ``params -> Optimizer``, e.g. ``functools.partial(torch.optim.SGD, lr=0.1)``
            (Hydra's ``_partial_: true``). It receives two parameter groups: weights with decay, and
            norm/bias parameters with ``weight_decay=0`` (when ``decay_norm_and_bias`` is False).
            Factories that accept ``model=`` (AdaFisher, which hooks the network's layers) also get the net.
            Only ``fit`` needs it: a module loaded for inference may leave it ``None``.
        scheduler: a factory ``Optimizer -> LRScheduler`` stepped once per epoch, or ``None``.
        label_smoothing: cross-entropy label smoothing.
        top_k: accuracies to report; ``(1, 5)`` logs ``acc`` and ``acc_top5``.
        decay_norm_and_bias: apply weight decay to 1-D parameters (norm scales, biases) too.

    The network and the optimizer/scheduler factories are not stored in the hyper-parameters (a
    checkpoint holds only plain values, so it loads with ``weights_only=True``): reload one with
    ``ImageClassifier.load_from_checkpoint(path, net=resnet18_cifar(...))``.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        top_k: Sequence[int] = (1,),
        decay_norm_and_bias: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing}: must be in [0, 1)")
        top_k = tuple(top_k)
        if not top_k or any(not isinstance(k, int) or not 1 <= k <= num_classes for k in top_k):
            raise ValueError(f"top_k={top_k}: must be a non-empty list of integers in [1, num_classes={num_classes}]")
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.label_smoothing = label_smoothing
        metrics = MetricCollection(
            {_metric_name(k): MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro") for k in top_k}
        )
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy with this module's label smoothing (the Fisher estimators use it too)."""
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str, metrics: MetricCollection) -> Tensor:
        inputs, targets = batch
        logits = self(inputs)
        loss = self.loss(logits, targets)
        metrics.update(logits, targets)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage != "test", batch_size=len(targets))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train", self.train_metrics)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_metrics)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_metrics)

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for param in self.net.parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 and not self.hparams.decay_norm_and_bias else decay).append(param)
        groups = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        if self.optimizer_factory is None:
            raise ValueError("optimizer=None: an optimizer factory is needed to train (params -> torch.optim.Optimizer)")
        optimizer = self.optimizer_factory(groups, **_model_kwargs(self.optimizer_factory, self.net))
        if hasattr(optimizer, "attach_grad_scaler") and self._trainer is not None:
            optimizer.attach_grad_scaler(getattr(self.trainer.precision_plugin, "scaler", None))
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}}


def _metric_name(k: int) -> str:
    return "acc" if k == 1 else f"acc_top{k}"


def _model_kwargs(factory: OptimizerFactory, net: nn.Module) -> dict[str, nn.Module]:
    """Optimizers that hook the network (AdaFisher) take it as ``model=``."""
    try:
        accepts_model = "model" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepts_model = False
    return {"model": net} if accepts_model else {}
