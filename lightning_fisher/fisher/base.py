"""The one interface every Fisher estimator implements.

An estimator turns what a training run already has (optimizer state, batches of data, the model) into a
per-parameter diagonal Fisher estimate, keyed by the parameter's fully qualified name (FQN). Estimators
that can also multiply by an (approximate, damped) inverse Fisher say so through
``supports_inverse`` and implement ``inverse_diagonal`` / ``inverse_product``: the FishLeg and Kronecker
estimators of later issues do; the diagonal ones here do not, and OBS compensation then falls back to
OBD (no compensation).

The core knows nothing of Lightning: the callback fills a :class:`FisherContext` from the trainer.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FisherContext", "FisherEstimator", "LossFn"]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(logits, targets) -> scalar`` mean loss over the batch, e.g. ``F.cross_entropy``."""


@dataclass
class FisherContext:
    """Everything an estimator may read when it is asked for a Fisher estimate.

    Attributes:
        model: the network, on its training device.
        parameters: the parameters to estimate, ``{fqn: parameter}`` (the ones being pruned).
        optimizer: the training optimizer, or ``None`` when there is none.
        batches: a zero-argument callable returning a fresh iterator of ``(inputs, targets)`` batches
            already on the model's device and already augmented/normalised like training batches, or
            ``None`` when no data is available.
        loss_fn: the per-batch mean loss; estimators that sample labels from the model use the
            model's categorical output distribution instead of ``targets``.
        batch_size: samples per optimizer micro-batch on one device (``None`` when unknown).
        accumulate_grad_batches: micro-batches accumulated into one optimizer step.
        world_size: data-parallel processes whose gradients are averaged before each step.
    """

    model: nn.Module
    parameters: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer | None = None
    batches: Callable[[], Iterable[tuple[Tensor, Tensor]]] | None = None
    loss_fn: LossFn | None = None
    batch_size: int | None = None
    accumulate_grad_batches: int = 1
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def effective_batch_size(self) -> int | None:
        """Samples averaged into one optimizer step: batch × accumulation × data-parallel ranks."""
        if self.batch_size is None:
            return None
        return self.batch_size * self.accumulate_grad_batches * self.world_size

    def iter_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.batches is None:
            raise ValueError("this estimator needs data, but the FisherContext has batches=None")
        return iter(self.batches())


class FisherEstimator(abc.ABC):
    """Base class of the Fisher estimators (diagonal now; inverse products for OBS-capable ones).

    Subclasses implement :meth:`diagonal`. They may override :meth:`check` to validate facts about the
    run (the optimizer type, say) once the trainer exists, before any training happens.
    """

    #: whether :meth:`diagonal` reads batches of data (the callback then provides ``batches``)
    requires_data: bool = False
    #: whether the estimate differs between data-parallel ranks and must be all-reduced (averaged)
    needs_all_reduce: bool = False

    def check(self, optimizer: torch.optim.Optimizer | None) -> None:  # noqa: B027 - optional hook
        """Raise a clear error if this estimator cannot work with ``optimizer``."""

    @abc.abstractmethod
    def diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        """The diagonal Fisher ``{fqn: tensor shaped like the parameter}``, non-negative and finite."""

    @property
    def supports_inverse(self) -> bool:
        """True when :meth:`inverse_diagonal` and :meth:`inverse_product` are implemented."""
        return False

    def inverse_diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        """diag((F + γI)⁻¹) per parameter; only for estimators with ``supports_inverse``."""
        raise NotImplementedError(f"{type(self).__name__} offers no inverse Fisher")

    def inverse_product(self, context: FisherContext, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        """(F + γI)⁻¹ v per parameter block; only for estimators with ``supports_inverse``.

        Returns a block for every key of ``vectors`` (the other parameters taken as zero in v), and may
        return blocks for further parameters coupled to the given ones by the inverse (a layer's bias,
        say), keyed by the model's parameter FQN without ``_orig_mod`` segments; OBS applies them too.
        """
        raise NotImplementedError(f"{type(self).__name__} offers no inverse Fisher")

    def on_train_step(self, context: FisherContext, step: int) -> dict[str, float]:
        """Optional hook, called after every optimizer step; ``context``'s batches start with the step's batch.

        ``FisherPruning``'s context goes on with fresh training batches after it, for estimates that need
        more samples than one batch (read ``next(context.iter_batches())`` for the step's batch alone).

        Estimators that learn during training (FishLeg) override it; ``step`` is the number of optimizer
        steps taken so far. Returns metrics to log (``{"name/key": value}``); the default does nothing.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Resumable state (plain Python and CPU tensors); stateless estimators return ``{}``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but got state keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
