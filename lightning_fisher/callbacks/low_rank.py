"""``LowRank``: the Lightning adapter of :func:`lightning_fisher.compress.factorize`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_fisher.compress.low_rank import LowRankReport, check_rank_rule, factorize

__all__ = ["LowRank"]

log = logging.getLogger(__name__)

STATE_VERSION = 1
DEFAULT_ENERGY = 0.9


def _network(pl_module: L.LightningModule) -> nn.Module:
    net = getattr(pl_module, "net", None)
    return net if isinstance(net, nn.Module) else pl_module


class LowRank(Callback):
    """Factor the network's Linear/Conv2d layers by truncated SVD, then fine-tune the factors.

    Denton et al. (NeurIPS 2014) / Jaderberg et al. (BMVC 2014); see
    :mod:`lightning_fisher.compress.low_rank` for the factorisation and the rank rules. Layers where
    factoring saves no weights stay as they are (``report.skipped``).

    With ``start_epoch=0`` the swap happens in ``setup``, before the optimizer (and any DDP wrapper) is
    built. A later ``start_epoch`` swaps at the start of that training epoch and rebuilds the optimizer
    with ``trainer.strategy.setup_optimizers(trainer)`` (the factors are new Parameters); the LR
    schedulers keep their position and the current learning rates are carried over, but the optimizer
    state (momentum, Adam moments) starts fresh. That path is single-process only. A resumed run
    factors again (to the saved ranks) before the checkpoint's weights load; with ``start_epoch=0`` the
    setup-time factoring of the starting model must give the same ranks (resume from the same model).

    Args:
        energy: kept fraction of squared singular values per layer, in (0, 1]; 0.9 when no rule is given.
        rank_fraction: rank as a fraction of the full rank, in (0, 1].
        parameter_budget: the factors' weights as a fraction of the layer's, in (0, 1].
        start_epoch: epoch at whose start the layers are factored.
        exclude: ``fnmatch`` patterns of module FQNs in the network to leave alone (e.g. ``["conv1"]``).
    """

    def __init__(
        self,
        energy: float | None = None,
        rank_fraction: float | None = None,
        parameter_budget: float | None = None,
        start_epoch: int = 0,
        exclude: Sequence[str] = (),
    ) -> None:
        if energy is None and rank_fraction is None and parameter_budget is None:
            energy = DEFAULT_ENERGY
        self.rule, self.value = check_rank_rule(energy, rank_fraction, parameter_budget)
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch={start_epoch!r}: must be a non-negative integer")
        if isinstance(exclude, str):
            raise TypeError(f"exclude={exclude!r}: must be a list of patterns, not a string")
        self.start_epoch = start_epoch
        self.exclude = list(exclude)
        self.report: LowRankReport | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rule=self.rule, value=self.value)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.start_epoch > 0 and trainer.world_size > 1:
            raise ValueError(
                f"start_epoch={self.start_epoch}: factoring during training needs a single process "
                f"(world_size={trainer.world_size}); use start_epoch=0"
            )
        if self.start_epoch == 0:
            self._factorize(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.report is None and trainer.current_epoch >= self.start_epoch:
            self._factorize(pl_module)
            self._rebuild_optimizers(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.report is not None and self.report.params_before:
            ratio = self.report.params_after / self.report.params_before
            pl_module.log("low_rank/weight_ratio", ratio, on_epoch=True)
            pl_module.log("low_rank/layers", float(len(self.report.layers)), on_epoch=True)

    def restructure_from_checkpoint(self, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        ranks = state.get("ranks") if state else None
        if ranks is None:
            return
        if self.report is None:
            self.report = factorize(_network(pl_module), ranks=ranks)
        elif self.report.ranks != ranks:
            # start_epoch=0 factored in setup, before the checkpoint was known
            raise ValueError(
                f"LowRank: the model was factored to ranks {self.report.ranks} in setup, the checkpoint holds "
                f"ranks {ranks}; resume from the same starting model"
            )

    def _factorize(self, pl_module: L.LightningModule) -> None:
        if self.report is not None:
            return
        self.report = factorize(_network(pl_module), exclude=self.exclude, **{self.rule: self.value})
        rank_zero_info(f"LowRank: {self.report.summary()}")

    @staticmethod
    def _rebuild_optimizers(trainer: L.Trainer) -> None:
        old_optimizers = list(trainer.optimizers)
        old_schedulers = list(trainer.lr_scheduler_configs)
        trainer.strategy.setup_optimizers(trainer)
        for old, new in zip(old_optimizers, trainer.optimizers):
            if len(old.param_groups) == len(new.param_groups):
                for old_group, new_group in zip(old.param_groups, new.param_groups):
                    new_group["lr"] = old_group["lr"]
        for old, new in zip(old_schedulers, trainer.lr_scheduler_configs):
            new.scheduler.load_state_dict(old.scheduler.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "ranks": None if self.report is None else self.report.ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"LowRank state version {state_dict.get('version')!r}: expected {STATE_VERSION}")
        if state_dict.get("ranks") is not None and self.report is None:
            raise ValueError(
                "LowRank: the checkpoint holds a factored model but the model was not factored before loading "
                "(the module needs on_load_checkpoint -> restructure_from_checkpoint)"
            )
