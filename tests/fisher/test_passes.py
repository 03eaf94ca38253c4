"""RepeatablePasses and stream_preserved: every pass over an estimate's batches draws the same numbers."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch

from lightning_fisher.fisher import RepeatablePasses, stream_preserved

CPU = torch.device("cpu")


def _noisy_batches(count: int = 3) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for _ in range(count):
        yield torch.rand(2), torch.zeros(2)  # draws from torch's global generator, as augmentation would


def test_every_pass_starts_from_the_state_of_the_first() -> None:
    torch.manual_seed(0)
    expected = [x for x, _ in _noisy_batches()]
    torch.manual_seed(0)
    passes = RepeatablePasses(_noisy_batches, partial(stream_preserved, CPU))
    partial_pass, _ = next(passes())  # left open: the next call closes it first
    full = [x for x, _ in passes()]
    passes.close()
    assert torch.equal(partial_pass, expected[0])
    assert all(torch.equal(a, b) for a, b in zip(full, expected, strict=True))
    assert torch.equal(torch.rand(2), expected[0])  # closed: the state is back where the passes began


def test_stream_preserved_restores_torch_and_the_others() -> None:
    entered: list[str] = []

    class Other:
        def __enter__(self) -> None:
            entered.append("in")

        def __exit__(self, *exc: object) -> None:
            entered.append("out")

    torch.manual_seed(1)
    before = torch.random.get_rng_state()
    with stream_preserved(CPU, Other, Other):
        torch.rand(5)
        assert entered == ["in", "in"]
    assert entered == ["in", "in", "out", "out"]
    assert torch.equal(torch.random.get_rng_state(), before)
