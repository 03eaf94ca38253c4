"""FisherPruning(sparse_kernels=True): fine-tuning through the N:M sparse modules, checkpoints, resume."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_fisher.callbacks import FisherPruning, SparsityMonitor
from lightning_fisher.module import ImageClassifier
from lightning_fisher.sparse import NMSparseConv2d, NMSparseLinear

PRUNED = ["net.conv1", "net.conv2", "net.fc1"]  # TinyNet's layers FisherPruning prunes by default


def _pruning(**overrides) -> FisherPruning:
    kwargs = dict(pattern="2:4", criterion="magnitude", scope="layer", start_epoch=0, end_epoch=2,
                  sparse_kernels=True, sparse_backend="triton")
    return FisherPruning(**{**kwargs, **overrides})


class Snapshot(Callback):
    """Records, at the start of every epoch, which layers are sparse modules and the fc1 weights."""

    def __init__(self) -> None:
        self.sparse_at: dict[int, list[str]] = {}
        self.fc1_at: dict[int, torch.Tensor] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        modules = dict(pl_module.named_modules())
        self.sparse_at[trainer.current_epoch] = [
            name for name in PRUNED if isinstance(modules[name], (NMSparseLinear, NMSparseConv2d))
        ]
        fc1 = modules["net.fc1"]
        weight = fc1.dense_weight() if isinstance(fc1, NMSparseLinear) else fc1.weight
        self.fc1_at[trainer.current_epoch] = weight.detach().clone()


def test_layers_swap_after_the_last_prune_and_keep_training_in_the_pattern(make_trainer, digits, make_module, tmp_path):
    pruning, snapshot = _pruning(), Snapshot()
    monitor = SparsityMonitor(monitor="train/acc", log_on_train_epoch_end=True, dirpath=str(tmp_path))
    module = make_module(partial(torch.optim.AdamW, lr=1e-2))
    trainer = make_trainer([pruning, snapshot, monitor], max_epochs=4)
    trainer.fit(module, digits)

    # the swap comes right after the last prune (start of epoch 2); fine-tuning then runs the sparse modules
    assert snapshot.sparse_at == {0: [], 1: [], 2: PRUNED, 3: PRUNED}
    modules = dict(module.named_modules())
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    for name in PRUNED:
        assert id(modules[name].values) in held and not hasattr(modules[name], "weight")
    # fine-tuning changed the kept weights and nothing else: still exactly 2 of every 4 may be non-zero
    before, after = snapshot.fc1_at[2], modules["net.fc1"].dense_weight().detach()
    assert not torch.equal(before, after)
    groups = (after.reshape(after.shape[0], -1, 4) != 0).sum(-1)
    assert int(groups.max()) <= 2
    assert monitor.history[-1]["global_sparsity"] == pytest.approx(0.5, abs=0.01)


def _run(make_module, make_digits, root: Path, epochs: int, ckpt_path: str | None = None, save: bool = False):
    L.seed_everything(3)
    callbacks: list[Callback] = [_pruning(end_epoch=2)]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=save, default_root_dir=root,
                        deterministic=True, num_sanity_val_steps=0, callbacks=callbacks)
    module = make_module(partial(torch.optim.AdamW, lr=1e-2))
    trainer.fit(module, make_digits(), ckpt_path=ckpt_path, weights_only=False)
    return module


def test_resume_after_the_swap_is_exact_and_the_checkpoint_is_dense(make_module, make_digits, tiny_net, tmp_path):
    uninterrupted = _run(make_module, make_digits, tmp_path / "a", epochs=5)
    _run(make_module, make_digits, tmp_path / "b", epochs=4, save=True)  # swapped at epoch 2, saved after 4
    ckpt = tmp_path / "b" / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert "net.fc1.weight" in state["state_dict"]
    assert not any(key.endswith((".values", ".codes")) for key in state["state_dict"])
    # the dense layout loads into the plain model, without the callback
    plain = ImageClassifier.load_from_checkpoint(ckpt, net=tiny_net(), weights_only=False)
    assert (plain.net.fc1.weight.reshape(32, -1, 4) != 0).sum(-1).max() <= 2

    resumed = _run(make_module, make_digits, tmp_path / "c", epochs=5, ckpt_path=str(ckpt))
    for name in PRUNED:
        a, c = dict(uninterrupted.named_modules())[name], dict(resumed.named_modules())[name]
        assert isinstance(c, (NMSparseLinear, NMSparseConv2d))
        assert torch.equal(a.codes, c.codes)
        torch.testing.assert_close(a.values, c.values, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(pattern="unstructured", target_sparsity=0.5), ValueError, "needs an 'N:M' pattern"),
        (dict(sparse_backend="cuda"), ValueError, "sparse_backend='cuda'"),
        (dict(sparse_kernels="yes"), TypeError, "sparse_kernels='yes'"),
    ],
)
def test_bad_sparse_kernel_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _pruning(**kwargs)
