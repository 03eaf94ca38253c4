"""FisherPruning resumed from checkpoints written in the middle of an epoch.

The callback keeps its masks and schedule position in its own ``state_dict``, so a run resumed from any
checkpoint, mid-epoch included, must prune exactly as an uninterrupted one. Here one uninterrupted run
writes a checkpoint every few optimizer steps (``ModelCheckpoint(every_n_train_steps=...)``, written in
``on_train_batch_end``), and a second ``Trainer`` resumes from one of them with ``ckpt_path=``.

What Lightning 2.6 does on a mid-epoch resume (``loops/training_epoch_loop.py``, ``fit_loop.py``): it
restores ``global_step``, ``current_epoch`` and the batch counters, does not call ``on_train_epoch_start``
again for the interrupted epoch, and runs only the epoch's remaining number of batches. It restores the
position *in the data* only for a loader with ``state_dict``/``load_state_dict``; a plain ``DataLoader``
starts over at its first batch (Lightning warns: "resuming from a checkpoint that ended before the
epoch ended and your dataloader is not resumable"). So:

- with :class:`ResumableLoader` (below) the resumed run sees the very batches of the uninterrupted run,
  and masks, weights and schedule position all come out bit-identical;
- with a plain ``DataLoader`` the batches after the resume differ, hence the weights differ too;
  with the ``random`` criterion the masks depend only on the schedule and the generator state, both
  in the callback's state, so the masks, the prune positions and the schedule state are still
  identical (and only those are compared).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from lightning_fisher.callbacks import FisherPruning

BATCHES_PER_EPOCH = 8  # 128 digits, batch size 16


class EpochSeededSampler(Sampler[int]):
    """A new, seeded permutation every epoch (Lightning calls ``set_epoch`` before each epoch)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:  # a generator: the order is drawn at the first batch, after set_epoch
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        yield from torch.randperm(self.size, generator=generator).tolist()

    def __len__(self) -> int:
        return self.size


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose position within the epoch goes into Lightning's checkpoint.

    Lightning has no prefetch when the loader has a length, so at a checkpoint written in
    ``on_train_batch_end`` the batches yielded so far are exactly the batches trained on.
    """

    _yielded = 0
    _skip = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._skip = self._skip, 0
        self._yielded = 0
        for index, batch in enumerate(super().__iter__()):
            if index < skip:  # already trained on before the checkpoint
                self._yielded += 1
                continue
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["yielded"])


class Record(Callback):
    """After the pruning hooks of each batch: the position, and the prunes done so far."""

    def __init__(self, pruning: FisherPruning) -> None:
        self.pruning = pruning
        self.rows: list[tuple[int, int, int | None, int]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        position = self.pruning.pruner.position
        self.rows.append((trainer.current_epoch, trainer.global_step, position.last_pruned, position.num_prunes))


def _train_loader(digits: L.LightningDataModule, resumable: bool) -> DataLoader:
    if resumable:
        return ResumableLoader(digits.train_set, batch_size=16, sampler=EpochSeededSampler(len(digits.train_set), seed=3))
    generator = torch.Generator().manual_seed(3)
    return DataLoader(digits.train_set, batch_size=16, shuffle=True, generator=generator)


def _run(
    make_trainer: Any,
    make_module: Any,
    digits: L.LightningDataModule,
    root: Path,
    pruning: FisherPruning,
    max_epochs: int,
    every: int,
    resumable: bool = True,
    ckpt_path: Path | None = None,
) -> tuple[L.Trainer, Record, L.LightningModule]:
    L.seed_everything(11)
    module = make_module(partial(torch.optim.AdamW, lr=1e-2))
    record = Record(pruning)
    checkpoint = ModelCheckpoint(
        dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1, save_on_train_epoch_end=False
    )
    trainer = make_trainer(
        [pruning, record, checkpoint], max_epochs=max_epochs, default_root_dir=root, enable_checkpointing=True,
        limit_val_batches=0,
    )
    # weights_only=False: ImageClassifier's hyper-parameters hold the optimizer factory (a functools.partial)
    trainer.fit(module, _train_loader(digits, resumable), ckpt_path=ckpt_path, weights_only=False)
    return trainer, record, module


def _weights(module: L.LightningModule) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _assert_same_masks(a: FisherPruning, b: FisherPruning) -> None:
    assert list(a.masks) == list(b.masks)
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name


def _step_pruning(criterion: str = "magnitude") -> FisherPruning:
    # prunes before optimizer steps 2, 5, 8, 11, 14: 8 and 16 are epoch starts, the others mid-epoch
    return FisherPruning(
        target_sparsity=0.8, criterion=criterion, unit="step", start_epoch=2, end_epoch=14, frequency=3, seed=4
    )


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
@pytest.mark.parametrize(
    ("step", "done_before"),
    [
        (5, 1),  # at a prune step: written when step 5 is reached, before the prune due there; the resumed run does it
        (6, 2),  # right after the prune at step 5 (done at the start of the batch that the checkpoint ends)
        (10, 3),  # between the prunes at steps 8 and 11, in the middle of epoch 1
    ],
)
def test_step_unit_resumed_mid_epoch_prunes_and_trains_like_an_uninterrupted_run(
    tmp_path, make_trainer, make_module, digits, step, done_before
):
    pruning_a = _step_pruning()
    trainer_a, record_a, module_a = _run(
        make_trainer, make_module, digits, tmp_path / "a", pruning_a, max_epochs=3, every=1
    )
    assert trainer_a.global_step == 3 * BATCHES_PER_EPOCH
    ckpt = tmp_path / "a" / "ckpt" / f"epoch={step // BATCHES_PER_EPOCH}-step={step}.ckpt"
    assert ckpt.exists() and step % BATCHES_PER_EPOCH != 0  # the checkpoint is mid-epoch
    state = next(v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if k.startswith("FisherPruning"))
    assert state["pruner"]["position"]["num_prunes"] == done_before

    pruning_b = _step_pruning()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_b, record_b, module_b = _run(
            make_trainer, make_module, digits, tmp_path / "b", pruning_b, max_epochs=3, every=1, ckpt_path=ckpt
        )
    assert not [w for w in caught if "not resumable" in str(w.message)]  # Lightning restored the loader position
    # the resumed run picks up at the checkpoint's step and does every later prune once, at the same step
    assert record_b.rows[0][1] == step
    assert record_b.rows == [row for row in record_a.rows if row[1] >= step]
    assert pruning_a.pruner.position.state_dict() == pruning_b.pruner.position.state_dict() == {
        "last_pruned": 14,
        "num_prunes": 5,
    }
    assert trainer_b.global_step == trainer_a.global_step
    _assert_same_masks(pruning_a, pruning_b)
    weights_a, weights_b = _weights(module_a), _weights(module_b)
    for name in weights_a:  # same batches, same masks, same optimizer state: bit-identical
        assert torch.equal(weights_a[name], weights_b[name]), name


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_step_unit_with_a_plain_loader_restores_masks_and_positions(tmp_path, make_trainer, make_module, digits):
    # A plain DataLoader restarts at its first batch after a mid-epoch resume (see the module docstring):
    # weights differ from the uninterrupted run; masks (random criterion), prune steps and schedule do not.
    pruning_a = _step_pruning("random")
    _, record_a, _ = _run(
        make_trainer, make_module, digits, tmp_path / "a", pruning_a, max_epochs=3, every=5, resumable=False
    )
    ckpt = tmp_path / "a" / "ckpt" / "epoch=1-step=10.ckpt"
    pruning_b = _step_pruning("random")
    with pytest.warns(UserWarning, match="your dataloader is not resumable"):
        _, record_b, _ = _run(
            make_trainer, make_module, digits, tmp_path / "b", pruning_b, max_epochs=3, every=5, resumable=False, ckpt_path=ckpt
        )
    assert record_b.rows == [row for row in record_a.rows if row[1] >= 10]
    assert pruning_a.pruner.position.state_dict() == pruning_b.pruner.position.state_dict()
    _assert_same_masks(pruning_a, pruning_b)


def _epoch_pruning() -> FisherPruning:
    return FisherPruning(target_sparsity=0.8, criterion="magnitude", start_epoch=1, end_epoch=3, frequency=1)


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
@pytest.mark.parametrize("step", [10, 20])  # epoch 1 after its second batch; epoch 2 after its fourth
def test_epoch_unit_resumed_mid_epoch_neither_repeats_nor_skips_a_prune(
    tmp_path, make_trainer, make_module, digits, step
):
    pruning_a = _epoch_pruning()
    _, record_a, module_a = _run(
        make_trainer, make_module, digits, tmp_path / "a", pruning_a, max_epochs=4, every=5
    )
    epoch = step // BATCHES_PER_EPOCH
    ckpt = tmp_path / "a" / "ckpt" / f"epoch={epoch}-step={step}.ckpt"
    state = next(v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if k.startswith("FisherPruning"))
    # the epoch's prune happened at its start, before the checkpoint
    assert state["pruner"]["position"] == {"last_pruned": epoch, "num_prunes": epoch}

    pruning_b = _epoch_pruning()
    seen: list[int] = []
    original_step = pruning_b.pruner.step

    def counting_step(position: int, *args: Any, **kwargs: Any) -> Any:
        event = original_step(position, *args, **kwargs)
        if event is not None:
            seen.append(event.position)
        return event

    pruning_b.pruner.step = counting_step  # type: ignore[method-assign]
    _, record_b, module_b = _run(
        make_trainer, make_module, digits, tmp_path / "b", pruning_b, max_epochs=4, every=5, ckpt_path=ckpt
    )
    # no second prune in the interrupted epoch, and every later epoch's prune exactly once
    assert seen == list(range(epoch + 1, 4))
    assert record_b.rows == [row for row in record_a.rows if row[1] >= step]
    assert pruning_a.pruner.position.state_dict() == pruning_b.pruner.position.state_dict() == {
        "last_pruned": 3,
        "num_prunes": 3,
    }
    _assert_same_masks(pruning_a, pruning_b)
    weights_a, weights_b = _weights(module_a), _weights(module_b)
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
