"""A run resumed from an end-of-epoch checkpoint trains on the batches an uninterrupted run trains on.

With the bundled datamodules each epoch's shuffle and augmentations are drawn from (seed, epoch), and a
Fisher estimate that reads training batches puts the augmentation sequence back: so the resumed run's
weights, not only its masks and schedule, are bit-identical to the uninterrupted run's.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_fisher import FisherPruning
from lightning_fisher.data import DigitsDataModule
from lightning_fisher.fisher import EmpiricalFisher


def _fit(make_module, root: Path, epochs: int, ckpt_path: str | None = None) -> tuple[L.LightningModule, FisherPruning]:
    L.seed_everything(0, verbose=False)
    module = make_module()
    pruning = FisherPruning(estimator=EmpiricalFisher(num_samples=64, chunk_size=32), target_sparsity=0.7,
                            start_epoch=1, end_epoch=4, scope="global")
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, deterministic=True,
        default_root_dir=root, callbacks=[pruning, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)],
    )
    data = DigitsDataModule(batch_size=64, seed=3, max_per_class=40)  # crop augmentation, 6 steps per epoch
    trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=False)
    return module, pruning


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_a_run_resumed_at_an_epoch_boundary_ends_with_the_uninterrupted_runs_weights(tmp_path, make_module):
    uninterrupted, pruning_a = _fit(make_module, tmp_path / "a", epochs=5)
    _fit(make_module, tmp_path / "b", epochs=2)  # stopped after epoch 1: one prune done, three to come
    resumed, pruning_c = _fit(make_module, tmp_path / "c", epochs=5, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert all(torch.equal(pruning_a.masks[n], pruning_c.masks[n]) for n in pruning_a.masks)
    expected, got = uninterrupted.state_dict(), resumed.state_dict()
    assert list(expected) == list(got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
