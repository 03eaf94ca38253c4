"""``EarlyExit``: the Lightning adapter of :class:`lightning_fisher.compress.EarlyExitModel`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_fisher.compress.early_exit import EarlyExitModel, check_threshold, early_exit_loss
from lightning_fisher.compress.metrics import bit_operations

__all__ = ["EarlyExit"]

log = logging.getLogger(__name__)

TERM_NAME = "early_exit"


def _network(pl_module: L.LightningModule) -> nn.Module:
    net = getattr(pl_module, "net", None)
    return net if isinstance(net, nn.Module) else pl_module


class EarlyExit(Callback):
    """Train early-exit heads with the network and report how often and how cheaply samples leave.

    BranchyNet (Teerapittayanon et al., ICPR 2016); see :mod:`lightning_fisher.compress.early_exit`. In
    ``setup`` the heads (pool + Linear) are attached inside the network as ``net.exit_heads``, so the
    optimizer trains them and checkpoints hold them. Training adds ``loss_weight × Σ CE(head)`` through
    ``pl_module.add_loss_term("early_exit", ...)`` (logged as ``train/early_exit``).

    At each validation epoch the early-exit model (``self.model``, usable after ``fit``) runs on the
    validation batches and logs ``early_exit/fraction/<exit>`` (and ``.../final``), ``early_exit/acc``
    (accuracy of the early-exit predictions) and ``early_exit/bit_ops`` (average bit-operations per
    sample, measured on the first validation batch).

    Args:
        exits: stage FQNs in the network after which a head sits (``ResNet18``: ``layer1`` .. ``layer4``).
        threshold: max softmax probability at which a sample exits, ``>= 0``.
        loss_weight: weight of each head's cross-entropy in the training loss, ``>= 0``.
        num_classes: classes of the heads; ``None`` reads them from the network's last Linear.
    """

    def __init__(
        self,
        exits: Sequence[str] = ("layer2", "layer3"),
        threshold: float = 0.9,
        loss_weight: float = 0.3,
        num_classes: int | None = None,
    ) -> None:
        if isinstance(exits, str) or not exits or len(set(exits)) != len(exits):
            raise ValueError(f"exits={exits!r}: must be a non-empty list of distinct stage names")
        check_threshold(threshold)
        if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)) or not loss_weight >= 0:
            raise ValueError(f"loss_weight={loss_weight!r}: must be a number >= 0")
        self.exits = list(exits)
        self.threshold = float(threshold)
        self.loss_weight = float(loss_weight)
        self.num_classes = num_classes
        self.model: EarlyExitModel | None = None
        self._handle: Any = None
        self._correct = 0
        self._seen = 0
        self._bit_ops: float | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(exits=self.exits)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        net = _network(pl_module)
        if self.model is None or self.model.backbone is not net:
            if self.model is not None:
                self.model.remove_hooks()
            self.model = EarlyExitModel(net, self.exits, self.threshold, self.num_classes)
            # only the wrapper's own flag: the backbone's train/eval mode stays Lightning's to set
            self.model.training = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not callable(getattr(pl_module, "add_loss_term", None)):
            raise TypeError(f"{type(pl_module).__name__}: has no add_loss_term(name, fn); use ImageClassifier")
        self._remove_term()
        self._handle = pl_module.add_loss_term(TERM_NAME, self._make_term(pl_module))

    def _make_term(self, pl_module: L.LightningModule) -> Any:
        loss_fn = getattr(pl_module, "loss", None)
        loss_fn = loss_fn if callable(loss_fn) else F.cross_entropy

        def term(inputs: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
            assert self.model is not None  # set in setup
            exit_logits, self.model.exit_logits = self.model.exit_logits, {}
            return early_exit_loss(exit_logits, targets, self.loss_weight, loss_fn)

        return term

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.model is not None:
            self.model.reset_exit_counts()
        self._correct, self._seen, self._bit_ops = 0, 0, None

    @torch.no_grad()
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.model is None or trainer.sanity_checking:
            return
        inputs, targets = batch[0], batch[1]
        if self._bit_ops is None:
            counts = self.model.exit_counts.clone()  # bit_operations' forward must not count twice
            self._bit_ops = bit_operations(self.model, inputs)
            self.model.exit_counts.copy_(counts)
        logits = self.model(inputs)
        self._correct += int((logits.argmax(dim=-1) == targets).sum())
        self._seen += int(targets.numel())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.model is None or trainer.sanity_checking or not self._seen:
            return
        for name, fraction in self.model.exit_fractions().items():
            pl_module.log(f"early_exit/fraction/{name}", fraction, on_epoch=True)
        pl_module.log("early_exit/acc", self._correct / self._seen, on_epoch=True)
        if self._bit_ops is not None:
            pl_module.log("early_exit/bit_ops", self._bit_ops, on_epoch=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_term()

    def _remove_term(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
