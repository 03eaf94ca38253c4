"""Swap a model's N:M layers for sparse modules (``to_sparse``/``sparsify_``) and back (``to_dense``).

The handoff from pruning is a dense weight with zeros in place: a Conv2d/Linear is swapped when its
weight already holds the N:M pattern along its input dimension, and every other layer stays dense with
the reason recorded in a :class:`SparseReport` (and one log line). Only modules whose type is exactly
``nn.Linear`` or ``nn.Conv2d`` are swapped: subclasses (e.g. the output projection of
``nn.MultiheadAttention``, which its owner reads as ``.weight``) are left alone.

Names are fully qualified module names with the ``_orig_mod`` segments of ``torch.compile`` removed.
Convert before compiling: a compiled graph keeps calling the modules it captured.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from lightning_fisher.sparse.auto import choose_backend
from lightning_fisher.sparse.format import nm_violation, parse_nm
from lightning_fisher.sparse.modules import NMSparseConv2d, NMSparseLinear

__all__ = ["BACKENDS", "Backend", "FilterFn", "SparseReport", "fqn_filter", "sparsify_", "to_dense", "to_sparse"]

log = logging.getLogger(__name__)

Backend = Literal["auto", "triton", "cusparselt"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "cusparselt")
FilterFn = Callable[[nn.Module, str], bool]
_SPARSE_TYPES = (NMSparseLinear, NMSparseConv2d)


@dataclass
class SparseReport:
    """What :func:`sparsify_` did: ``sparse`` maps swapped layers to their backend, ``dense`` maps every
    other Conv2d/Linear to the reason it stayed dense."""

    pattern: str
    sparse: dict[str, str] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        backends: dict[str, int] = {}
        for backend in self.sparse.values():
            backends[backend] = backends.get(backend, 0) + 1
        used = ", ".join(f"{name} {count}" for name, count in sorted(backends.items()))
        text = f"to_sparse {self.pattern}: {len(self.sparse)} layers sparse"
        text += f" ({used})" if used else ""
        text += f", {len(self.dense)} dense"
        if self.dense:
            text += ": " + "; ".join(f"{name}: {reason}" for name, reason in self.dense.items())
        return text

    def __str__(self) -> str:
        return self.summary()


def _clean(fqn: str) -> str:
    return ".".join(part for part in fqn.split(".") if part != "_orig_mod")


def fqn_filter(names: Iterable[str]) -> FilterFn:
    """A ``filter_fn`` accepting the layers named in ``names``: module FQNs (``"layer1.0.conv1"``) or
    parameter FQNs (``"layer1.0.conv1.weight"``), e.g. the keys of a pruning mask dict."""
    wanted = {_clean(name) for name in names}
    wanted |= {name.removesuffix(".weight") for name in wanted}

    def accept(module: nn.Module, fqn: str) -> bool:
        return _clean(fqn) in wanted

    return accept


def _dense_reason(module: nn.Module, n: int, m: int) -> str | None:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r}"
        if module.in_channels % m:
            return f"in_channels={module.in_channels} is not a multiple of M={m}"
    elif module.in_features % m:
        return f"in_features={module.in_features} is not a multiple of M={m}"
    return nm_violation(module.weight, n, m)


def _replace_modules_(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Put ``replacements[id(old)]`` wherever ``old`` is a child (shared modules are replaced everywhere)."""
    for parent in model.modules():
        # _modules, not named_children(): the latter skips a module's second appearance under one parent
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, name, replacements[id(child)])


def sparsify_(
    model: nn.Module,
    pattern: str = "2:4",
    backend: Backend = "auto",
    filter_fn: FilterFn | None = None,
    *,
    batch_size: int | None = None,
    table: str | os.PathLike[str] | Sequence[dict] | None = None,
) -> SparseReport:
    """Swap, in place, every eligible ``nn.Linear``/``nn.Conv2d`` of ``model`` for its N:M sparse module.

    Eligible: ``filter_fn(module, fqn)`` accepts it (all do when ``None``), its reduction groups fit
    (input features/channels a multiple of M, ``groups=1``, zero padding), and its weight already holds
    the pattern. The model itself is never swapped, only its submodules.

    Args:
        model: the network, weights with zeros in place (the output of pruning).
        pattern: ``"N:M"``.
        backend: ``"triton"``, ``"cusparselt"`` (2:4 on CUDA; a layer whose shape or dtype it cannot take
            stays dense) or ``"auto"`` (per layer, see :mod:`lightning_fisher.sparse.auto`).
        filter_fn: ``(module, fqn) -> bool``; see :func:`fqn_filter`.
        batch_size: the batch size ``auto`` should optimise for (default: every measured batch size).
        table: measured entries for ``auto`` (default: :mod:`lightning_fisher.sparse.measured`).

    Returns:
        The :class:`SparseReport` (also logged as one line).

    Raises:
        ValueError: a bad ``pattern``/``backend``, or ``backend="cusparselt"`` with a pattern other
            than 2:4 or with a layer that is not on a GPU.
    """
    n, m = parse_nm(pattern)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of {BACKENDS}")
    if backend == "cusparselt" and (n, m) != (2, 4):
        raise ValueError(f"backend='cusparselt': supports pattern '2:4' only, got {pattern!r}")
    report = SparseReport(pattern=f"{n}:{m}")
    candidates: list[tuple[str, nn.Module]] = []
    for fqn, module in model.named_modules():
        name = _clean(fqn)
        if isinstance(module, _SPARSE_TYPES):
            report.sparse[name] = f"{module.backend} (already)"
        elif type(module) in (nn.Linear, nn.Conv2d) and module is not model:
            candidates.append((name, module))
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            report.dense[name] = (f"{type(module).__name__} is a subclass, not swapped" if module is not model
                                  else "the model itself is not swapped (use NMSparse*.from_dense)")

    replacements: dict[int, nn.Module] = {}
    for name, module in candidates:
        if filter_fn is not None and not filter_fn(module, name):
            report.dense[name] = "excluded by filter_fn"
            continue
        reason = _dense_reason(module, n, m)
        if reason is not None:
            report.dense[name] = reason
            continue
        chosen: str | None = backend
        if backend == "auto":
            chosen, why = choose_backend(module, n, m, table=table, batch_size=batch_size)
            if chosen is None:
                report.dense[name] = why
                continue
        if chosen == "cusparselt" and not module.weight.is_cuda:  # raised before any swap: the model is unchanged
            raise ValueError(f"backend='cusparselt': runs on CUDA only; {name} is on {module.weight.device}: "
                             "move the model to the GPU first")
        sparse_type = NMSparseConv2d if isinstance(module, nn.Conv2d) else NMSparseLinear
        try:
            replacements[id(module)] = sparse_type.from_dense(module, n, m, backend=chosen)
        except ValueError as error:  # a shape cuSPARSELt does not take: this layer stays dense
            report.dense[name] = str(error)
            continue
        report.sparse[name] = chosen
    _replace_modules_(model, replacements)
    log.info("%s", report.summary())
    return report


def to_sparse(
    model: nn.Module,
    pattern: str = "2:4",
    backend: Backend = "auto",
    filter_fn: FilterFn | None = None,
    *,
    inplace: bool = False,
    batch_size: int | None = None,
    table: str | os.PathLike[str] | Sequence[dict] | None = None,
) -> nn.Module:
    """A copy of ``model`` (``model`` itself when ``inplace``) with its N:M layers swapped for sparse modules.

    The same as :func:`sparsify_` on a deep copy; the report goes to the log (call :func:`sparsify_` to
    get it as an object). ``to_dense(to_sparse(model))`` gives back ``model``'s parameters exactly.
    """
    target = model if inplace else copy.deepcopy(model)
    sparsify_(target, pattern, backend, filter_fn, batch_size=batch_size, table=table)
    return target


def to_dense(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``model`` itself when ``inplace``) with every sparse module back to dense."""
    target = model if inplace else copy.deepcopy(model)
    if isinstance(target, _SPARSE_TYPES):
        return target.to_dense()
    replacements = {id(module): module.to_dense() for module in target.modules() if isinstance(module, _SPARSE_TYPES)}
    _replace_modules_(target, replacements)
    return target
