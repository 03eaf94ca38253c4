"""Per-layer sparsity of a model: the table behind ``sparsity/*`` metrics and the sparsity curve."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["PRUNABLE_MODULES", "global_sparsity", "prunable_parameter_names", "sparsity_report"]

PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
"""Module types whose ``weight`` counts as prunable when no parameter names are given."""


def _is_compressed(module: nn.Module) -> bool:
    """A sparse module of :mod:`lightning_fisher.sparse` (duck-typed: this package never imports it)."""
    return callable(getattr(module, "dense_weight", None)) and isinstance(getattr(module, "values", None), torch.Tensor)


def prunable_parameter_names(model: nn.Module) -> list[str]:
    """FQNs of the ``weight`` of every Conv2d and Linear module, in module order.

    A layer already swapped for an N:M sparse module (``lightning_fisher.sparse``) keeps its name
    ``<layer>.weight``: the report reads its dense weight, zeros in place.
    """
    return [
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if (isinstance(module, PRUNABLE_MODULES) and isinstance(getattr(module, "weight", None), torch.Tensor))
        or _is_compressed(module)
    ]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by FQN, plus ``<layer>.weight`` (dense, zeros in place) of every compressed layer."""
    weights: dict[str, torch.Tensor] = dict(model.named_parameters())
    for name, module in model.named_modules():
        if _is_compressed(module):
            weights[f"{name}.weight" if name else "weight"] = module.dense_weight().detach()
    return weights


def sparsity_report(model: nn.Module, parameter_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per parameter: ``{"name", "shape", "numel", "zeros", "sparsity"}``.

    Args:
        model: the network.
        parameter_names: FQNs of the parameters to report, in this order; ``None`` reports the weight of
            every Conv2d and Linear module (and every layer already swapped for an N:M sparse module,
            as ``<layer>.weight``). Zeros are counted in the weights themselves (exact ``== 0``),
            so the table shows what the model holds, masked or not.

    Returns:
        rows with the FQN, the shape as a tuple, the element count, the number of zeros and
        ``zeros / numel``.

    Raises:
        ValueError: a name that is not a parameter of ``model``.

    Example::

        >>> rows = sparsity_report(nn.Sequential(nn.Linear(2, 2, bias=False)))
        >>> sorted(rows[0])
        ['name', 'numel', 'shape', 'sparsity', 'zeros']
    """
    with torch.no_grad():
        params = _weights(model)
    names = prunable_parameter_names(model) if parameter_names is None else list(parameter_names)
    unknown = [name for name in names if name not in params]
    if unknown:
        raise ValueError(f"parameter_names={unknown}: not parameters of the model")
    if not names:
        return []
    with torch.no_grad():
        counts = [(params[name] == 0).sum() for name in names]
        # One host sync for the whole table when the model sits on one device.
        same_device = len({count.device for count in counts}) == 1
        zeros = torch.stack(counts).tolist() if same_device else [int(count) for count in counts]
    rows = []
    for name, count in zip(names, zeros):
        numel = params[name].numel()
        rows.append(
            {
                "name": name,
                "shape": tuple(params[name].shape),
                "numel": numel,
                "zeros": int(count),
                "sparsity": count / numel if numel else 0.0,
            }
        )
    return rows


def global_sparsity(rows: Iterable[dict[str, Any]]) -> float:
    """Zeros over elements across the rows of :func:`sparsity_report` (0.0 for no elements)."""
    rows = list(rows)
    total = sum(row["numel"] for row in rows)
    return sum(row["zeros"] for row in rows) / total if total else 0.0
