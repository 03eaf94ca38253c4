"""Counting the points where the host waits for the device, to keep them out of per-step code."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "SYNC_OPS"]

_aten = torch.ops.aten

SYNC_OPS: frozenset[Any] = frozenset(
    {
        _aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t), `if t:`
        _aten.is_nonzero.default,
        _aten.equal.default,
        _aten.nonzero.default,  # boolean indexing t[mask], t[mask] = v, torch.nonzero
        _aten.masked_select.default,
        _aten._unique2.default,
        _aten.unique_consecutive.default,
        _aten.repeat_interleave.Tensor,
    }
)
"""aten ops whose result the host must read (a value, or an output shape that depends on the data): on
CUDA each makes the host wait until the device has finished all the work queued before it. Indexing
(``t[mask]``, ``t[mask] = v``) syncs too when an index is a boolean mask (counted as ``index``/``index_put_``)."""

# Boolean indexing calls nonzero inside the indexing kernel, where a dispatch mode does not see it.
_INDEXING_OPS: frozenset[Any] = frozenset(
    {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
)


def _boolean_indices(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class HostSyncCounter(TorchDispatchMode):
    """Count the host-device synchronisations (:data:`SYNC_OPS`) in a block of PyTorch code, by op.

    A ``TorchDispatchMode``: every aten call made inside ``with HostSyncCounter() as counter:`` goes
    through it (the calls an op makes inside its own kernel do not), so the count is exact and the same
    on CPU as on CUDA; on the CPU it shows where a GPU run would stall. A read of a CPU tensor is no sync
    on a GPU (optimizers keep their ``step`` counters there), so ``devices`` restricts the count to
    tensors on those device types, and ``ignore`` leaves out reads of the given tensors (say an
    optimizer's ``state[p]["step"]``) when everything is on the CPU.

    Args:
        devices: device types (``"cuda"``, ``"cpu"``) whose tensors count; ``None`` counts every device.
        ignore: tensors whose reads are not counted (matched by identity).

    Example::

        with HostSyncCounter(devices=("cuda",)) as counter:
            estimator.on_train_step(context, step)
        print(counter.total, dict(counter.counts))
    """

    def __init__(self, devices: Iterable[str] | None = None, ignore: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self.devices = None if devices is None else frozenset(devices)
        self._ignored_refs = list(ignore)  # kept alive, so that their ids stay theirs
        self._ignored = {id(t) for t in self._ignored_refs}
        self.counts: Counter[str] = Counter()
        self.ops = 0
        """Every aten call seen, syncing or not."""

    @property
    def total(self) -> int:
        """Synchronisations counted."""
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (the dispatch protocol)
        kwargs = kwargs or {}
        self.ops += 1
        if func in SYNC_OPS or (func in _INDEXING_OPS and _boolean_indices(args)):
            first = next((a for a in args if isinstance(a, Tensor)), None)
            counted = first is None or (
                id(first) not in self._ignored and (self.devices is None or first.device.type in self.devices)
            )
            if counted:
                self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)
