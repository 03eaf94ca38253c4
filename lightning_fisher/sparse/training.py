"""Fine-tune with the sparse modules in place: swap layers mid-training without losing optimizer state.

:func:`sparsify_` swaps a pruned model's N:M layers for :class:`NMSparseLinear`/:class:`NMSparseConv2d`,
whose trainable weight is ``values`` (the kept entries only). Doing that in the middle of training needs
two more things, both here and both plain PyTorch:

* :func:`sparsify_training_` moves each swapped weight's optimizer state onto the new ``values``
  parameter, in place: the parameter is replaced inside its existing param group, and every state
  tensor shaped like the dense weight (Adam's moments, say) is reduced to its kept entries. Nothing
  is re-created, so the learning-rate scheduler and the optimizer's step counts carry on unchanged;
  a fine-tuning run continues where the masked dense run was, not from fresh moments.
* :func:`densify_checkpoint_` writes a checkpoint as if the swap had not happened: ``values``/``codes``
  become the dense ``weight`` with zeros in place, and the optimizer state of ``values`` is scattered
  back to the dense shape. The checkpoint therefore loads into the plain model (no extra keys, no
  callback needed), and a resumed run re-applies the swap with :func:`sparsify_training_` and reaches
  the very state it had: the dense→compressed→dense→compressed round trip is exact.

Unsupported here: models wrapped for data parallelism (DDP registers parameters at wrap time).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fisher.sparse.convert import Backend, FilterFn, SparseReport, _clean, sparsify_
from lightning_fisher.sparse.format import decompress, gather_kept, to_reduction_matrix
from lightning_fisher.sparse.modules import NMSparseConv2d, NMSparseLinear

__all__ = ["densify_checkpoint_", "sparse_layers", "sparsify_training_"]

_SPARSE_TYPES = (NMSparseLinear, NMSparseConv2d)


def sparse_layers(model: nn.Module) -> dict[str, NMSparseLinear | NMSparseConv2d]:
    """``{module fqn: sparse module}`` (``torch.compile``'s ``_orig_mod`` segments removed)."""
    return {_clean(fqn): module for fqn, module in model.named_modules() if isinstance(module, _SPARSE_TYPES)}


def _weight_shape(module: NMSparseLinear | NMSparseConv2d) -> tuple[int, ...]:
    if isinstance(module, NMSparseConv2d):
        return module.weight_shape
    return (module.out_features, module.in_features)


def _compress_like(module: NMSparseLinear | NMSparseConv2d, dense: Tensor) -> Tensor:
    """The entries of a dense-weight-shaped tensor at ``module``'s kept positions (shaped like ``values``)."""
    return gather_kept(to_reduction_matrix(dense), module.codes.to(dense.device), module.n, module.m).contiguous()


def _decompress_like(module: NMSparseLinear | NMSparseConv2d, compressed: Tensor) -> Tensor:
    """A values-shaped tensor scattered to the dense weight's shape, zeros elsewhere."""
    return decompress(compressed, module.codes.to(compressed.device), module.n, module.m, _weight_shape(module))


def _replace_in_optimizer_(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
                           transform: Any) -> bool:
    """Put ``new`` where ``old`` is in ``optimizer``'s groups; move its state, mapping tensors shaped like
    ``old`` through ``transform``. Returns whether ``old`` was found."""
    for group in optimizer.param_groups:
        for i, param in enumerate(group["params"]):
            if param is old:
                group["params"][i] = new
                state = optimizer.state.pop(old, None)
                if state is not None:
                    optimizer.state[new] = {
                        key: transform(value) if isinstance(value, Tensor) and value.shape == old.shape else value
                        for key, value in state.items()
                    }
                return True
    return False


def sparsify_training_(
    model: nn.Module,
    optimizers: Iterable[torch.optim.Optimizer],
    pattern: str,
    backend: Backend = "auto",
    filter_fn: FilterFn | None = None,
) -> SparseReport:
    """:func:`sparsify_` ``model`` in place and move the swapped weights' optimizer state to the new modules.

    The bias of a swapped layer becomes a new parameter too; its state moves unchanged. A swapped
    weight that no optimizer holds is fine (a frozen layer stays frozen: ``values`` inherits
    ``requires_grad``).

    Returns:
        The :class:`SparseReport` of :func:`sparsify_`.
    """
    dense_layers = {_clean(fqn): module for fqn, module in model.named_modules()
                    if type(module) in (nn.Linear, nn.Conv2d)}
    report = sparsify_(model, pattern, backend, filter_fn)
    optimizers = list(optimizers)
    for fqn, sparse in sparse_layers(model).items():
        dense = dense_layers.get(fqn)
        if dense is None:  # already sparse before this call
            continue
        pairs = [(dense.weight, sparse.values, lambda t, s=sparse: _compress_like(s, t))]
        if dense.bias is not None and sparse.bias is not None:
            pairs.append((dense.bias, sparse.bias, lambda t: t))
        for old, new, transform in pairs:
            for optimizer in optimizers:
                if _replace_in_optimizer_(optimizer, old, new, transform):
                    break
    return report


def densify_checkpoint_(
    checkpoint: dict[str, Any],
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    state_dict_key: str = "state_dict",
    optimizer_states_key: str = "optimizer_states",
    prefix: str = "",
) -> list[str]:
    """Rewrite a checkpoint of ``model`` (which holds sparse modules) as the dense model's checkpoint.

    ``checkpoint[state_dict_key]`` loses ``<layer>.values``/``<layer>.codes`` and gains ``<layer>.weight``
    (zeros in place); in ``checkpoint[optimizer_states_key][i]`` (``optimizers[i].state_dict()``) every
    state tensor of a ``values`` parameter is scattered back to the dense weight's shape. ``prefix`` is
    what the state-dict keys carry before the model's own names (``"net."`` inside a LightningModule).

    Returns:
        The FQNs of the layers rewritten.
    """
    layers = sparse_layers(model)
    state = checkpoint.get(state_dict_key)
    if state is not None:
        for fqn, module in layers.items():
            base = f"{prefix}{fqn}."
            keys = [key for key in state if _clean(key) in (f"{base}values", f"{base}codes")]
            values_key = next((key for key in keys if key.endswith("values")), None)
            codes_key = next((key for key in keys if key.endswith("codes")), None)
            if values_key is None or codes_key is None:
                continue
            values, codes = state.pop(values_key), state.pop(codes_key)
            weight_key = values_key[: -len("values")] + "weight"
            state[weight_key] = decompress(values, codes.to(values.device), module.n, module.m, _weight_shape(module))
    values_params = {id(module.values): module for module in layers.values()}
    for index, optimizer in enumerate(optimizers):
        saved = checkpoint.get(optimizer_states_key, [])
        if index >= len(saved):
            break
        flat = [param for group in optimizer.param_groups for param in group["params"]]
        for position, param in enumerate(flat):
            module = values_params.get(id(param))
            entry = saved[index]["state"].get(position)
            if module is None or entry is None:
                continue
            saved[index]["state"][position] = {
                key: _decompress_like(module, value) if isinstance(value, Tensor) and value.shape == param.shape
                else value
                for key, value in entry.items()
            }
    return sorted(layers)
