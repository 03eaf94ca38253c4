"""The Squisher: the diagonal Fisher read for free from the optimizer's squared-gradient accumulator.

How each supported optimizer's state becomes a Fisher estimate (read from PyTorch's own update code,
``torch/optim/{adam,adamw,nadam,radam,rmsprop,adagrad}.py``; ḡ_t is the mini-batch gradient the step
saw, B the effective batch size, t the per-parameter ``state["step"]``):

=========================  =====================================  ========================================
optimizer                  state recurrence                       Fisher diagonal returned
=========================  =====================================  ========================================
Adam, AdamW, NAdam, RAdam  ``exp_avg_sq``: v ← β2·v + (1−β2)·ḡ²    B · v / (1 − β2^t)
RMSprop (centered or not)  ``square_avg``: v ← α·v + (1−α)·ḡ²      B · v / (1 − α^t)
Adagrad                    ``sum``: s ← s + ḡ², s₀ = init          B · (s − init) / t
=========================  =====================================  ========================================

- Every EMA above starts at zero and PyTorch stores it raw, so 1/(1 − β^t) removes the start-up bias:
  after t steps the weights of the EMA sum to 1 − β^t, not 1. Adam applies the same correction inside
  its update; RMSprop never does, but its ``square_avg`` has the same bias, so we correct it too.
- Adagrad's ``sum`` is a running sum, so its average per step is (s − init)/t; ``bias_correction`` does
  not apply to it.
- AMSGrad (``amsgrad=True``) also keeps ``max_exp_avg_sq``, the running maximum of v. We read the EMA
  ``exp_avg_sq``: it estimates E[ḡ²]; the maximum is an upper envelope kept for the convergence proof
  and is biased upwards by every noisy spike the run ever saw.
- RMSprop ``centered=True`` also keeps ``grad_avg`` (an EMA of ḡ) and divides by v − ḡ_avg²; we read
  ``square_avg`` (the raw second moment, which is what the Fisher is), not the variance.
- Why B: ḡ is a mean over B samples, so B·E[ḡ²] ≈ E[g²] for the per-sample gradients g ("Fishers for
  Free?", Li et al., ICML 2025). Under data parallelism the gradient is averaged over the ranks before
  the step, so B counts every rank (:attr:`FisherContext.effective_batch_size`).
- What v holds: gradients after AMP unscaling (``GradScaler`` unscales before the step) and after any
  gradient clipping (clipping happens before the step, so the Squisher sees clipped gradients). With
  coupled weight decay (Adam, NAdam/RAdam without ``decoupled_weight_decay``, RMSprop, Adagrad)
  ``weight_decay·θ`` is added to the gradient before v is updated, so v includes it; AdamW's
  decoupled decay does not touch v.
- The estimate is an EMA over roughly the last 1/(1 − β2) steps (1,000 at β2 = 0.999) of the joint
  (sum-then-square) mini-batch Fisher, not an average over the data set at the current weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_fisher.fisher.base import FisherContext, FisherEstimator

__all__ = ["Squisher", "SUPPORTED_OPTIMIZERS"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Rule:
    state_key: str
    kind: Literal["ema", "sum"]
    decay_key: str | None = None  # the param-group entry holding the EMA decay


_ADAM_RULE = _Rule("exp_avg_sq", "ema", "betas")
# Looked up along the optimizer's MRO, so subclasses (AdamW is an Adam in torch >= 2.6) are covered.
_RULES: dict[type[torch.optim.Optimizer], _Rule] = {
    torch.optim.Adam: _ADAM_RULE,
    torch.optim.AdamW: _ADAM_RULE,
    torch.optim.NAdam: _ADAM_RULE,
    torch.optim.RAdam: _ADAM_RULE,
    torch.optim.RMSprop: _Rule("square_avg", "ema", "alpha"),
    torch.optim.Adagrad: _Rule("sum", "sum"),
}

SUPPORTED_OPTIMIZERS: tuple[str, ...] = ("Adam", "AdamW", "NAdam", "RAdam", "RMSprop", "Adagrad")
"""Optimizers whose state the Squisher can read (and their subclasses)."""


def _unwrap(optimizer: Any) -> Any:
    # Lightning hands callbacks a ``LightningOptimizer`` wrapper; it exposes the real one as ``.optimizer``.
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _rule_for(optimizer: Any) -> _Rule:
    for cls in type(optimizer).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    raise TypeError(
        f"optimizer={type(optimizer).__name__}: the Squisher reads the optimizer's squared-gradient "
        f"accumulator, and {type(optimizer).__name__} keeps none. Use EmpiricalFisher (or "
        f"MonteCarloFisher), which compute the Fisher from data, or train with one of {SUPPORTED_OPTIMIZERS}."
    )


class Squisher(FisherEstimator):
    """Diagonal Fisher from the optimizer's second moment, at no cost per step.

    Implements the "Squisher" of Li, Dangel, Tam and Raffel, "Fishers for Free? Approximating the Fisher
    Information Matrix by Recycling the Squared Gradient Accumulator" (ICML 2025, arXiv 2507.18807):
    F ≈ B · v̂, with v̂ the bias-corrected squared-gradient EMA of Adam-family optimizers. The module
    docstring gives the exact rule per optimizer and what v contains under AMP, clipping and weight decay.
    State is read only when :meth:`diagonal` is called; nothing is hooked into training.

    Args:
        floor: lower bound of every returned entry (must be > 0 and finite). Parameters the optimizer
            has no state for yet (never stepped, or not in the optimizer) get exactly ``floor``; entries
            whose gradient was always zero would otherwise be 0. A tiny positive floor keeps scores
            θ²F/2 and inverses 1/F finite without changing any ranking between entries that had
            gradients. The default 1e-30 is far below any real Fisher value and representable in fp32
            (the returned dtype).
        bias_correction: divide EMA accumulators by 1 − β^t (Adam-family β2, RMSprop α). Turn off only
            to reproduce the raw B·v of the paper's code; Adagrad's division by t is always applied.
        scale_by_batch_size: multiply by the effective batch size (batch × accumulation × data-parallel
            ranks). The scale cancels in pruning rankings; it matters when the Fisher's magnitude is used
            (EWC-style penalties, comparing estimators). When True the context must know the batch size.

    Raises:
        ValueError: ``floor`` not positive and finite.

    Example::

        estimator = Squisher()
        estimator.check(optimizer)  # at setup: raises TypeError for e.g. SGD
        fisher = estimator.diagonal(FisherContext(model, dict(model.named_parameters()), optimizer, batch_size=128))
    """

    requires_data = False
    # Every rank holds the same v: gradients are all-reduced before each optimizer step.
    needs_all_reduce = False

    def __init__(self, floor: float = 1e-30, bias_correction: bool = True, scale_by_batch_size: bool = True) -> None:
        if not (isinstance(floor, (int, float)) and 0.0 < floor < float("inf")):
            raise ValueError(f"floor={floor!r}: must be a positive finite number")
        if torch.tensor(float(floor), dtype=torch.float32).item() == 0.0:
            raise ValueError(f"floor={floor!r}: must be representable in float32 (>= 1.4e-45)")
        self.floor = float(floor)
        self.bias_correction = bool(bias_correction)
        self.scale_by_batch_size = bool(scale_by_batch_size)

    def check(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Raise ``ValueError`` without an optimizer, ``TypeError`` for one that keeps no second moment."""
        if optimizer is None:
            raise ValueError(
                "optimizer=None: the Squisher reads the optimizer's state; use EmpiricalFisher or "
                "MonteCarloFisher when there is no optimizer"
            )
        _rule_for(_unwrap(optimizer))

    def diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        self.check(context.optimizer)
        optimizer = _unwrap(context.optimizer)
        rule = _rule_for(optimizer)
        scale = 1.0
        if self.scale_by_batch_size:
            if context.effective_batch_size is None:
                raise ValueError(
                    "FisherContext.batch_size=None: the Squisher scales by the effective batch size; "
                    "give the batch size or use Squisher(scale_by_batch_size=False)"
                )
            scale = float(context.effective_batch_size)
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        # Ordinary tensors even when called from a hook that runs under inference mode.
        with torch.inference_mode(False):
            return self._read(context, optimizer, rule, group_of, scale)

    def _read(
        self, context: FisherContext, optimizer: torch.optim.Optimizer, rule: _Rule, group_of: dict, scale: float
    ) -> dict[str, Tensor]:
        fisher: dict[str, Tensor] = {}
        floored: list[str] = []
        read: list[str] = []
        for fqn, param in context.parameters.items():
            state = optimizer.state.get(param) if id(param) in group_of else None
            step = float(state["step"]) if state and "step" in state else 0.0
            if not state or rule.state_key not in state or step <= 0:
                floored.append(fqn)
                fisher[fqn] = torch.full(param.shape, self.floor, dtype=torch.float32, device=param.device)
                continue
            accumulator = state[rule.state_key].detach().to(device=param.device, dtype=torch.float32)
            if accumulator.shape != param.shape:
                raise ValueError(
                    f"{fqn}: optimizer state {rule.state_key!r} has shape {tuple(accumulator.shape)} but the "
                    f"parameter has {tuple(param.shape)} (a sharded optimizer such as ZeRO is not supported)"
                )
            estimate = self._average(accumulator, rule, group_of[id(param)], step)
            fisher[fqn] = estimate.mul_(scale).clamp_min_(self.floor)
            read.append(fqn)
        # one host read for every layer (a device sync on a GPU), not one per layer
        if read and not bool(torch.stack([torch.isfinite(fisher[fqn]).all() for fqn in read]).all()):
            bad = [fqn for fqn in read if not bool(torch.isfinite(fisher[fqn]).all())]
            raise ValueError(f"{bad[0]}: the optimizer's {rule.state_key!r} holds non-finite values")
        if floored:
            log.debug(
                "Squisher: %d of %d parameters have no %s state yet and get floor=%g: %s",
                len(floored), len(fisher), type(optimizer).__name__, self.floor, ", ".join(floored),
            )
        return fisher

    def _average(self, accumulator: Tensor, rule: _Rule, group: dict[str, Any], step: float) -> Tensor:
        """Per-step mean squared gradient (before the batch-size scale) from one accumulator."""
        if rule.kind == "sum":
            initial = float(group.get("initial_accumulator_value", 0.0))
            return (accumulator - initial).div_(step)
        if not self.bias_correction:
            return accumulator.clone()
        decay = group[rule.decay_key]
        decay = float(decay[1] if rule.decay_key == "betas" else decay)
        return accumulator / (1.0 - decay**step)

    def __repr__(self) -> str:
        return (
            f"Squisher(floor={self.floor:g}, bias_correction={self.bias_correction}, "
            f"scale_by_batch_size={self.scale_by_batch_size})"
        )
