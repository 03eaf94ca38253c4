"""Passes over an estimate's batches that all draw the same augmentations."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

import torch
from torch import Tensor

__all__ = ["RepeatablePasses", "stream_preserved"]


class RepeatablePasses:
    """``FisherContext.batches`` whose every pass starts from the same random state.

    Each call starts a pass over ``batches()`` inside its own ``preserve()`` block, a context manager that
    puts back on exit the random state the batches draw from (augmentation, shuffling). A pass still
    open when the next one starts is closed first, which puts the state back, so every pass starts from
    the state of the first; :meth:`close` closes the last one. Call it when the estimate is done: a
    pass left open would put the state back later, whenever it is garbage-collected.

    So an estimate that reads its batches more than once (FishLeg's pre-training updates, then its
    refreshed diagonal) sees in each pass the augmented batches that an estimator reading them once
    sees, and two criteria compared on one model are estimated from the same samples.

    Args:
        batches: a zero-argument callable returning a fresh iterator of ``(inputs, targets)``.
        preserve: a zero-argument callable returning the context manager that saves and restores the
            random state ``batches`` draws from (:func:`stream_preserved`, or FisherPruning's, which
            adds the datamodule's own).
    """

    def __init__(
        self,
        batches: Callable[[], Iterator[tuple[Tensor, Tensor]]],
        preserve: Callable[[], AbstractContextManager[None]],
    ) -> None:
        self._batches = batches
        self._preserve = preserve
        self._open: Generator[tuple[Tensor, Tensor], None, None] | None = None

    def __call__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.close()
        self._open = self._pass()
        return self._open

    def close(self) -> None:
        """Close the open pass, if any, putting the random state back to where the pass started."""
        if self._open is not None:
            self._open.close()
            self._open = None

    def _pass(self) -> Generator[tuple[Tensor, Tensor], None, None]:
        with self._preserve():
            yield from self._batches()


@contextmanager
def stream_preserved(device: torch.device, *others: Callable[[], AbstractContextManager[None]]) -> Iterator[None]:
    """torch's global generators (the CPU's, and ``device``'s when it is a GPU) restored on exit, and
    inside each of ``others()`` too (a datamodule's ``preserved_rng``, say)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), ExitStack() as stack:
        for other in others:
            stack.enter_context(other())
        yield
