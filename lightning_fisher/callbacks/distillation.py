"""``KnowledgeDistillation``: the Lightning adapter of :mod:`lightning_fisher.compress.distillation`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_fisher.compress.distillation import check_distillation_args, load_teacher, soft_kl

__all__ = ["KnowledgeDistillation"]

log = logging.getLogger(__name__)

TERM_NAME = "distillation"


class KnowledgeDistillation(Callback):
    """Train the student against a frozen teacher's soft targets (Hinton, Vinyals & Dean, 2015).

    The training loss becomes ``α·T²·KL(teacher_T ‖ student_T) + (1 − α)·CE``. How the CE part is
    weighed: the module's own cross-entropy (``pl_module.loss``, with its label smoothing) stays in the
    loss with weight 1, and this callback adds the term ``α·T²·KL − α·CE`` through
    ``pl_module.add_loss_term("distillation", ...)``, so the sum is exactly the loss above (its gradient
    too). ``train/distillation`` logs that term (it can be negative); ``distillation/kl`` logs the KL
    itself (no ``T²``), the number that shows the student moving toward the teacher.

    The teacher runs in eval mode without gradients on the student's device. It is held by this
    callback, not by the module, so it is not in the student's checkpoint.

    Args:
        teacher: the teacher module, or a path (see :func:`~lightning_fisher.compress.load_teacher`): a
            pickled module, or a checkpoint / state dict loaded into ``teacher_net``.
        temperature: softmax temperature ``T`` (> 0).
        alpha: weight of the soft loss, in [0, 1].
        teacher_net: the teacher's architecture when ``teacher`` is a checkpoint path.

    The module must offer ``add_loss_term`` (``ImageClassifier`` does).
    """

    def __init__(
        self,
        teacher: nn.Module | str | Path,
        temperature: float = 4.0,
        alpha: float = 0.9,
        teacher_net: nn.Module | None = None,
    ) -> None:
        check_distillation_args(temperature, alpha)
        if isinstance(teacher, (str, Path)):
            if not Path(teacher).is_file():
                raise ValueError(f"teacher={str(teacher)!r}: no such file")
        elif not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher={teacher!r}: must be an nn.Module or a checkpoint path")
        self.teacher_source = teacher
        self.teacher_net = teacher_net
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.teacher: nn.Module | None = None
        self._handle: Any = None
        self._last_kl: Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not callable(getattr(pl_module, "add_loss_term", None)):
            raise TypeError(f"{type(pl_module).__name__}: has no add_loss_term(name, fn); use ImageClassifier")
        if self.teacher is None:
            self.teacher = load_teacher(self.teacher_source, self.teacher_net)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.teacher is not None  # set in setup
        self.teacher.to(pl_module.device).eval()
        self._remove_term()
        self._handle = pl_module.add_loss_term(TERM_NAME, self._make_term(pl_module))
        rank_zero_info(f"KnowledgeDistillation: temperature={self.temperature:g} alpha={self.alpha:g}")

    def _make_term(self, pl_module: L.LightningModule) -> Any:
        hard_loss = getattr(pl_module, "loss", None)
        if not callable(hard_loss):
            hard_loss = torch.nn.functional.cross_entropy

        def term(inputs: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
            assert self.teacher is not None
            self.teacher.eval()  # a stray .train() elsewhere must not touch the teacher's BatchNorm
            with torch.no_grad():
                teacher_logits = self.teacher(inputs)
            kl = soft_kl(logits, teacher_logits, self.temperature)
            self._last_kl = kl.detach()
            return self.alpha * (self.temperature**2 * kl - hard_loss(logits, targets))

        return term

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._last_kl is not None:
            pl_module.log("distillation/kl", self._last_kl, on_step=True, on_epoch=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_term()

    def _remove_term(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
