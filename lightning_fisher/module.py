"""The LightningModule the recipes train: any image classifier, its optimizer, its LR schedule."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["ImageClassifier", "LossTerm", "LossTermHandle"]

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
LossTerm = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``fn(inputs, logits, targets) -> scalar Tensor``, added to the training loss."""


class LossTermHandle:
    """Returned by :meth:`ImageClassifier.add_loss_term`; ``remove()`` takes the term out again."""

    def __init__(self, terms: dict[str, LossTerm], name: str, fn: LossTerm) -> None:
        self._terms = terms
        self.name = name
        self._fn = fn

    def remove(self) -> None:
        """Remove the term (a no-op when it is already gone or was replaced under the same name)."""
        if self._terms.get(self.name) is self._fn:
            del self._terms[self.name]

    def __repr__(self) -> str:
        return f"LossTermHandle(name={self.name!r})"


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

    Extra loss terms (distillation, early-exit heads, ...) join the training loss through
    :meth:`add_loss_term`. With terms present, ``train/loss`` logs the total that is optimised,
    ``train/task_loss`` the cross-entropy alone, and ``train/<name>`` each term; validation and test
    losses stay the plain cross-entropy.

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
        # A plain dict, not a module: terms are neither hyper-parameters nor checkpoint state.
        self._loss_terms: dict[str, LossTerm] = {}

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy with this module's label smoothing (the Fisher estimators use it too)."""
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def add_loss_term(self, name: str, fn: LossTerm) -> LossTermHandle:
        """Add ``fn(inputs, logits, targets) -> scalar`` to the training loss, logged as ``train/<name>``.

        Terms run in the order they were added, after the cross-entropy, on every training step (not in
        validation or test). They are not saved in the hyper-parameters or checkpoints: whoever adds a
        term (a callback) adds it again after a restart. ``handle.remove()`` removes it.

        Raises:
            ValueError: ``name`` is empty, contains ``/``, or is already taken.
            TypeError: ``fn`` is not callable.
        """
        if not isinstance(name, str) or not name or "/" in name or name in ("loss", "task_loss"):
            raise ValueError(f"name={name!r}: must be a non-empty string without '/', other than 'loss'/'task_loss'")
        if name in self._loss_terms:
            raise ValueError(f"name={name!r}: a loss term of that name is already added (remove it first)")
        if not callable(fn):
            raise TypeError(f"fn={fn!r}: must be callable as fn(inputs, logits, targets) -> Tensor")
        self._loss_terms[name] = fn
        return LossTermHandle(self._loss_terms, name, fn)

    @property
    def loss_terms(self) -> dict[str, LossTerm]:
        """The added loss terms by name (a copy)."""
        return dict(self._loss_terms)

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str, metrics: MetricCollection) -> Tensor:
        inputs, targets = batch
        logits = self(inputs)
        loss = self.loss(logits, targets)
        metrics.update(logits, targets)
        on_step = stage == "train"
        if stage == "train" and self._loss_terms:
            task_loss = loss
            for name, fn in list(self._loss_terms.items()):
                term = fn(inputs, logits, targets)
                if not isinstance(term, Tensor) or term.numel() != 1:
                    raise ValueError(f"loss term {name!r}: must return a scalar Tensor, got {term!r}")
                term = term.reshape(())
                self.log(f"train/{name}", term, on_step=True, on_epoch=True, batch_size=len(targets))
                loss = loss + term
            self.log("train/task_loss", task_loss, on_step=True, on_epoch=True, batch_size=len(targets))
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage != "test", batch_size=len(targets))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train", self.train_metrics)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_metrics)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_metrics)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Before the weights load, let callbacks that change the network's structure (quantization,
        low rank) rebuild it from their saved state, so a resumed run loads into matching modules.

        A callback takes part by defining ``restructure_from_checkpoint(pl_module, checkpoint)``.
        """
        trainer = self._trainer
        if trainer is None:
            return
        for callback in trainer.callbacks:
            restructure = getattr(callback, "restructure_from_checkpoint", None)
            if callable(restructure):
                restructure(self, checkpoint)

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
