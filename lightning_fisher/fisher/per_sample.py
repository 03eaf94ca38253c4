"""Mean squared per-sample gradients: the machinery shared by the empirical and Monte-Carlo Fishers.

Both estimators average g_r² over rows r, where a row is one sample with one label (its true label for
the empirical Fisher, a label drawn from the model for the Monte-Carlo one). Gradients are taken only
with respect to ``FisherContext.parameters``; every other parameter and buffer is held constant.

Batch normalisation decides what "the gradient of one sample" means (``bn_mode``):

- ``"eval"``: normalisation layers use their running statistics, so each sample's loss depends on that
  sample only and g_n is an ordinary per-sample gradient, computed with ``torch.func``
  (``vmap(grad(functional_call(...)))``) over chunks of ``chunk_size`` samples.
- ``"train"``: normalisation layers use the statistics of the whole mini-batch, as in a training step.
  Then ℓ_n depends on every sample of the batch through the statistics, and g_n = ∂ℓ_n/∂θ is taken
  through them: one forward of the batch, then one vector-Jacobian product per row (vmapped over
  ``chunk_size`` rows). The mean of these g_n over a batch is exactly the mini-batch gradient a
  training step (and hence the Squisher's accumulator) sees. Each row back-propagates through the whole
  batch, so this mode costs up to batch-size times more than ``"eval"`` (about 9× for ResNet18 with
  batches of 32 on CPU). Running statistics are not updated: during the forward the layers' running
  buffers are swapped for ``None``, which makes them normalise with batch statistics and track nothing.
  ``SyncBatchNorm`` would synchronise statistics across ranks here; use ``"eval"`` with it.

Two backends compute the same numbers. ``"vmap"`` vectorises over ``chunk_size`` rows; ``"loop"``
differentiates one row at a time with the same ``torch.func`` function. On CPU the loop is the faster
one for ResNet-sized models: vmap turns each per-sample convolution weight gradient into a grouped
convolution backward, which CPU kernels run slower than batch-1 backwards (full-width CIFAR ResNet18,
best of 4 on a shared 2-core machine: 0.13 s vs 0.08 s per sample in eval mode, 0.99 s vs 0.74 s in
train mode with batches of 32; at width 32 the two tie, and vmap wins on smaller models).
``"auto"`` picks ``"vmap"`` on CUDA and ``"loop"`` elsewhere.

In both modes every other module (dropout, ...) is in eval mode during the estimate, and all training
flags are restored afterwards. Parameters and buffers are never modified.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_fisher.fisher.base import FisherContext, LossFn

__all__ = [
    "BACKENDS",
    "BN_MODES",
    "Backend",
    "BNMode",
    "LabelSampler",
    "check_sampling_args",
    "estimation_mode",
    "mean_squared_gradients",
    "resolve_backend",
]

log = logging.getLogger(__name__)

BNMode = Literal["eval", "train"]
BN_MODES: tuple[str, ...] = ("eval", "train")
Backend = Literal["auto", "vmap", "loop"]
BACKENDS: tuple[str, ...] = ("auto", "vmap", "loop")

LabelSampler = Callable[[Tensor], Tensor]
"""``sampler(logits[b, C]) -> labels[b, L]``: the labels each sample is differentiated for."""


def check_sampling_args(num_samples: int, chunk_size: int | None, bn_mode: str, backend: str = "auto") -> None:
    """The argument rules shared by the per-sample estimators (``ValueError``/``TypeError``)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r}: must be an integer >= 1")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: must be an integer >= 1, or None for whole batches")
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode={bn_mode!r}: must be one of {BN_MODES}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of {BACKENDS}")


def resolve_backend(backend: Backend, device: torch.device) -> Literal["vmap", "loop"]:
    """``"auto"`` means ``"vmap"`` on CUDA and ``"loop"`` on every other device."""
    if backend == "auto":
        return "vmap" if device.type == "cuda" else "loop"
    return backend


@contextmanager
def estimation_mode(model: nn.Module, bn_mode: BNMode) -> Iterator[None]:
    """Eval mode for the whole model, batch-norm layers in train mode if ``bn_mode="train"``; restores flags."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        if bn_mode == "train":
            for module in model.modules():
                if isinstance(module, _BatchNorm):
                    module.train()
        yield
    finally:
        for module, training in flags:
            module.training = training


def mean_squared_gradients(
    context: FisherContext,
    *,
    num_samples: int,
    chunk_size: int | None,
    bn_mode: BNMode,
    loss_fn: LossFn,
    label_sampler: LabelSampler | None = None,
    backend: Backend = "auto",
    name: str = "estimator",
) -> dict[str, Tensor]:
    """(1/N) Σ_n (1/L) Σ_l g_{n,l}² over the first ``num_samples`` samples of ``context.iter_batches()``.

    Args:
        context: the model, the parameters to differentiate and the batches.
        num_samples: N, samples to use (fewer if the batches run out, with a warning).
        chunk_size: rows per vmapped call (bounds memory: one gradient per row is held at a time);
            unused by the ``"loop"`` backend.
        bn_mode: see the module docstring.
        loss_fn: ``loss_fn(logits[1, C], labels[1]) -> scalar``, called once per row.
        label_sampler: draws L labels per sample from the logits; ``None`` uses the batch's targets (L=1).
        backend: ``"vmap"`` (vectorised over rows), ``"loop"`` (one row at a time) or ``"auto"``
            (``"vmap"`` on CUDA, ``"loop"`` elsewhere; see the module docstring).
        name: the estimator's name, for messages.

    Returns:
        ``{fqn: float32 tensor shaped like the parameter}`` on the parameter's device.
    """
    model = context.model
    named = dict(model.named_parameters())
    unknown = sorted(set(context.parameters) - set(named))
    if unknown:
        raise ValueError(f"{name}: parameters {unknown} are not parameters of the model")
    if not context.parameters:
        raise ValueError(f"{name}: FisherContext.parameters is empty")
    fqns = list(context.parameters)
    device = named[fqns[0]].device
    backend = resolve_backend(backend, device)
    seen = 0
    # Lightning runs some hooks under inference mode; the estimate needs autograd.
    with torch.inference_mode(False), torch.enable_grad(), estimation_mode(model, bn_mode):
        sums = {fqn: torch.zeros(named[fqn].shape, dtype=torch.float32, device=named[fqn].device) for fqn in fqns}
        params = {fqn: named[fqn].detach() for fqn in fqns}
        frozen = {fqn: p.detach() for fqn, p in named.items() if fqn not in params}
        step = _eval_batch if bn_mode == "eval" else _train_batch
        for inputs, targets in context.iter_batches():
            if seen >= num_samples:
                break
            inputs, targets = _usable(inputs, device), _usable(targets, device)
            take = min(len(inputs), num_samples - seen)
            if take == 0:
                continue
            step(model, params, frozen, inputs, targets, take, sums, chunk_size, loss_fn, label_sampler, backend)
            seen += take
    if seen == 0:
        raise ValueError(f"{name}: the FisherContext's batches yielded no samples")
    if seen < num_samples:
        log.warning("%s: the batches ran out after %d of num_samples=%d samples; averaging over %d",
                    name, seen, num_samples, seen)
    return {fqn: total.div_(seen) for fqn, total in sums.items()}


def _usable(tensor: Tensor, device: torch.device) -> Tensor:
    tensor = tensor.to(device)
    return tensor.clone() if tensor.is_inference() else tensor


def _rows(
    logits: Tensor | None, targets: Tensor, take: int, label_sampler: LabelSampler | None
) -> tuple[Tensor, Tensor, float]:
    """(sample index per row, label per row, weight 1/L) for the first ``take`` samples."""
    if label_sampler is None:
        return torch.arange(take, device=targets.device), targets[:take], 1.0
    labels = label_sampler(logits[:take].detach())  # [take, L]
    per_sample = labels.shape[1]
    index = torch.arange(take, device=labels.device).repeat_interleave(per_sample)
    return index, labels.reshape(-1), 1.0 / per_sample


def _accumulate(sums: dict[str, Tensor], grads: dict[str, Tensor], weight: float, batched: bool = True) -> None:
    for fqn, g in grads.items():
        squared = g.float().square()
        sums[fqn].add_(squared.sum(0) if batched else squared, alpha=weight)


def _chunks(total: int, chunk_size: int | None) -> Iterator[slice]:
    size = total if chunk_size is None else chunk_size
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def _eval_batch(
    model: nn.Module,
    params: dict[str, Tensor],
    frozen: dict[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    take: int,
    sums: dict[str, Tensor],
    chunk_size: int | None,
    loss_fn: LossFn,
    label_sampler: LabelSampler | None,
    backend: str,
) -> None:
    inputs = inputs[:take]
    logits = None
    if label_sampler is not None:
        with torch.no_grad():
            logits = functional_call(model, (params, frozen), (inputs,))
    index, labels, weight = _rows(logits, targets, take, label_sampler)

    def row_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, (p, frozen), (x.unsqueeze(0),)), y.unsqueeze(0))

    if backend == "loop":
        row_grad = grad(row_loss)
        for row in range(len(labels)):
            _accumulate(sums, row_grad(params, inputs[index[row]], labels[row]), weight, batched=False)
        return
    per_row = vmap(grad(row_loss), in_dims=(None, 0, 0))
    for rows in _chunks(len(labels), chunk_size):
        _accumulate(sums, per_row(params, inputs[index[rows]], labels[rows]), weight)


def _train_batch(
    model: nn.Module,
    params: dict[str, Tensor],
    frozen: dict[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    take: int,
    sums: dict[str, Tensor],
    chunk_size: int | None,
    loss_fn: LossFn,
    label_sampler: LabelSampler | None,
    backend: str,
) -> None:
    # Batch statistics come from the whole batch (even when only `take` of its samples are used). The
    # batch-norm buffers are swapped for None during the call: the layer then normalises with batch
    # statistics and updates no running statistics (an in-place update cannot run under a grad transform).
    buffers = _no_running_stats(model)
    logits, pullback = vjp(lambda p: functional_call(model, (p, frozen, buffers), (inputs,)), params)
    index, labels, weight = _rows(logits, targets, take, label_sampler)

    # dℓ_r/dlogits is zero except in sample index[r]'s row, so each row's cotangent is that one row.
    def row_loss(row_logits: Tensor, y: Tensor) -> Tensor:
        return loss_fn(row_logits.unsqueeze(0), y.unsqueeze(0))

    row_grads = vmap(grad(row_loss))(logits.detach()[index], labels)
    if backend == "loop":
        for row in range(len(labels)):
            cotangent = logits.new_zeros(logits.shape)
            cotangent[index[row]] = row_grads[row]
            _accumulate(sums, pullback(cotangent)[0], weight, batched=False)
        return
    per_row = vmap(pullback)
    for rows in _chunks(len(labels), chunk_size):
        count = rows.stop - rows.start
        cotangents = logits.new_zeros((count, *logits.shape))
        cotangents[torch.arange(count, device=logits.device), index[rows]] = row_grads[rows]
        _accumulate(sums, per_row(cotangents)[0], weight)


def _no_running_stats(model: nn.Module) -> dict[str, None]:
    names = {}
    for prefix, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.training:
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(module, buffer, None) is not None:
                    names[f"{prefix}.{buffer}" if prefix else buffer] = None
    return names
