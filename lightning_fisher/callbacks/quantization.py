"""``QuantizationAware``: the Lightning adapter of :mod:`lightning_fisher.compress.quantization`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_fisher.compress.quantization import check_bits, prepare_qat_

__all__ = ["QuantizationAware"]

log = logging.getLogger(__name__)

STATE_VERSION = 1


def _network(pl_module: L.LightningModule) -> nn.Module:
    """The network a compression callback works on: ``pl_module.net`` when there is one."""
    net = getattr(pl_module, "net", None)
    return net if isinstance(net, nn.Module) else pl_module


class QuantizationAware(Callback):
    """Quantization-aware training (Jacob et al., CVPR 2018) from ``start_epoch`` on.

    Swaps every Conv2d/Linear of the network (``pl_module.net``) for a fake-quant version: symmetric
    per-output-channel weights, per-tensor activations with an EMA range, straight-through gradients
    (see :mod:`lightning_fisher.compress.quantization`). The swap keeps the Parameters, so the optimizer
    is untouched and pruning masks keep applying: zeros stay zero. After training, call
    :func:`lightning_fisher.compress.convert` on the network for integer weights.

    With ``start_epoch=0`` the swap happens in ``setup`` (before the optimizer and any DDP wrapper are
    built); later it happens at the start of that training epoch. A resumed run swaps again before the
    checkpoint's weights load (through ``ImageClassifier.on_load_checkpoint``).

    Args:
        weight_bits, activation_bits: bit widths, integers in [2, 16].
        start_epoch: first epoch trained with fake quantization.
        exclude: ``fnmatch`` patterns of module FQNs in the network to keep in float (e.g. ``["fc"]``).
        momentum: EMA momentum of the activation range observers, in (0, 1].
    """

    def __init__(
        self,
        weight_bits: int = 8,
        activation_bits: int = 8,
        start_epoch: int = 0,
        exclude: Sequence[str] = (),
        momentum: float = 0.1,
    ) -> None:
        check_bits("weight_bits", weight_bits)
        check_bits("activation_bits", activation_bits)
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch={start_epoch!r}: must be a non-negative integer")
        if isinstance(exclude, str):
            raise TypeError(f"exclude={exclude!r}: must be a list of patterns, not a string")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum={momentum!r}: must be in (0, 1]")
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.start_epoch = start_epoch
        self.exclude = list(exclude)
        self.momentum = momentum
        self.layers: list[str] = []
        self.prepared = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(weight_bits=self.weight_bits, activation_bits=self.activation_bits)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.start_epoch == 0:
            self._prepare(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.start_epoch:
            self._prepare(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("quantization/layers", float(len(self.layers) if self.prepared else 0), on_epoch=True)

    def restructure_from_checkpoint(self, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state and state.get("prepared"):
            self._prepare(pl_module)

    def _prepare(self, pl_module: L.LightningModule) -> None:
        if self.prepared:
            return
        self.layers = prepare_qat_(
            _network(pl_module), self.weight_bits, self.activation_bits, exclude=self.exclude, momentum=self.momentum
        )
        self.prepared = True
        rank_zero_info(
            f"QuantizationAware: {len(self.layers)} layers fake-quantized "
            f"(weight_bits={self.weight_bits}, activation_bits={self.activation_bits})"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "prepared": self.prepared, "layers": list(self.layers)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"QuantizationAware state version {state_dict.get('version')!r}: expected {STATE_VERSION}")
        if state_dict.get("prepared") and not self.prepared:
            raise ValueError(
                "QuantizationAware: the checkpoint was trained with fake quantization but the model was not "
                "swapped before loading (the module needs on_load_checkpoint -> restructure_from_checkpoint)"
            )
