"""FisherPruning in real (tiny) Lightning runs on CPU."""

from __future__ import annotations

import copy
import logging
import os
import re
import warnings
from functools import partial
from pathlib import Path
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn

from lightning_fisher.callbacks import FisherPruning, SparsityMonitor
from lightning_fisher.fisher import FishLegFisher
from lightning_fisher.fisher.base import FisherContext, FisherEstimator
from lightning_fisher.module import ImageClassifier
from lightning_fisher.pruning.masks import export_pruned, load_pruned
from lightning_fisher.pruning.patterns import to_reduction_layout

# TinyNet (conftest) pruned by default, stem and classifier dense: conv1 576, conv2 1152, fc1 8192 weights.
# aot_eager runs dynamo and AOTAutograd (what sees the in-place mask updates of the parameters) without
# inductor's C++ code generation, which is what makes compiling slow on CPU.
BACKEND = os.environ.get("LIGHTNING_FISHER_TEST_COMPILE_BACKEND", "aot_eager")
PRUNED_BY_DEFAULT = ["net.conv1.weight", "net.conv2.weight", "net.fc1.weight"]


class ConstantFisher(FisherEstimator):
    """Test-only estimator: F = 1 everywhere (OBD then ranks like magnitude)."""

    requires_data = False

    def diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        return {name: torch.ones_like(p) for name, p in context.parameters.items()}


class ZeroCheck(Callback):
    """Asserts before every training forward that every pruned weight is exactly zero."""

    def __init__(self, pruning: FisherPruning) -> None:
        self.pruning = pruning
        self.checked = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        for name, param in self.pruning.pruner.parameters.items():
            assert (param[~self.pruning.masks[name]] == 0).all(), (trainer.global_step, name)
        self.checked += 1


def _params(module: L.LightningModule) -> dict[str, Tensor]:
    return dict(module.named_parameters())


def _assert_zero_where_pruned(module: L.LightningModule, masks: dict[str, Tensor]) -> None:
    params = _params(module)
    for name, mask in masks.items():
        assert (params[name].detach()[~mask] == 0).all(), name


# ---------------------------------------------------------------- exact zeros, sparsity, patterns


def test_exact_zeros_after_every_step_with_adam_decay_accumulation_and_clipping(make_trainer, digits, make_module):
    pruning = FisherPruning(target_sparsity=0.8, criterion="magnitude", start_epoch=0, end_epoch=2)
    zero_check = ZeroCheck(pruning)
    module = make_module(partial(torch.optim.Adam, lr=3e-2, weight_decay=1e-2))
    trainer = make_trainer([pruning, zero_check], max_epochs=5, accumulate_grad_batches=2, gradient_clip_val=0.5)
    trainer.fit(module, digits)
    batches = len(digits.train_dataloader())
    assert trainer.global_step == 5 * batches // 2
    assert zero_check.checked == 5 * batches
    _assert_zero_where_pruned(module, pruning.masks)
    # and the weights that survive did train (the masks are not just zeroing everything)
    assert all(bool((_params(module)[n][m] != 0).all()) for n, m in pruning.masks.items())


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_achieved_sparsity_equals_the_target(make_trainer, digits, scope, make_module):
    pruning = FisherPruning(
        target_sparsity=0.9, estimator=ConstantFisher(), scope=scope, start_epoch=1, end_epoch=3
    )
    trainer = make_trainer([pruning], max_epochs=4)
    trainer.fit(make_module(), digits)
    assert list(pruning.masks) == PRUNED_BY_DEFAULT
    counts = {n: int((~m).sum()) for n, m in pruning.masks.items()}
    sizes = {n: m.numel() for n, m in pruning.masks.items()}
    if scope == "global":
        assert sum(counts.values()) == round(0.9 * sum(sizes.values()))
    else:
        assert all(counts[n] == round(0.9 * sizes[n]) for n in counts)
    assert pruning.scheduled_sparsity == 0.9
    assert trainer.callback_metrics["pruning/target_sparsity"].item() == pytest.approx(0.9)
    assert trainer.callback_metrics["pruning/sparsity"].item() == pytest.approx(0.9, abs=3 / sum(sizes.values()))


def test_nm_gradual_reaches_every_group_at_end_epoch(make_trainer, digits, make_module):
    held_by_epoch: dict[int, float] = {}

    class Held(Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            groups = torch.cat([to_reduction_layout(m).reshape(-1, 4).sum(1) for m in pruning.masks.values()])
            assert (groups >= 2).all()  # never more than 2 pruned in a group of 4
            held_by_epoch[trainer.current_epoch] = (groups == 2).float().mean().item()

    pruning = FisherPruning(pattern="2:4", criterion="magnitude", scope="layer", start_epoch=0, end_epoch=3)
    trainer = make_trainer([pruning, Held()], max_epochs=5)
    trainer.fit(make_module(), digits)
    assert held_by_epoch[0] == 0.0 and 0.0 < held_by_epoch[1] < held_by_epoch[2] < 1.0
    assert held_by_epoch[3] == held_by_epoch[4] == 1.0
    for mask in pruning.masks.values():
        assert (to_reduction_layout(mask).reshape(-1, 4).sum(1) == 2).all()  # every group valid and at 2:4
    assert pruning.sparsity == 0.5 and pruning.scheduled_sparsity == 0.5


def test_nm_ineligible_layer_is_warned_once_and_stays_dense(make_trainer, digits, make_module):
    pruning = FisherPruning(pattern="2:4", criterion="magnitude", schedule="one_shot", start_epoch=0, keep_first_dense=False)
    trainer = make_trainer([pruning], max_epochs=1)
    with pytest.warns(UserWarning, match=r"stay dense.*\['net.stem.weight'\]") as record:
        trainer.fit(make_module(), digits)
    assert len([w for w in record if "stay dense" in str(w.message)]) == 1
    assert list(pruning.masks) == PRUNED_BY_DEFAULT


def test_iterative_schedule_reaches_the_target(make_trainer, digits, make_module):
    pruning = FisherPruning(
        target_sparsity=0.8, criterion="random", schedule="iterative", iterative_fraction=0.5, start_epoch=1, frequency=1
    )
    trainer = make_trainer([pruning], max_epochs=5)
    trainer.fit(make_module(), digits)
    total = sum(m.numel() for m in pruning.masks.values())
    assert sum(int((~m).sum()) for m in pruning.masks.values()) == round(0.8 * total)
    assert pruning.pruner.position.state_dict() == {"last_pruned": 3, "num_prunes": 3}  # 0.5, 0.75, 0.8


def test_step_unit_prunes_on_optimizer_steps(make_trainer, digits, make_module):
    seen: list[tuple[int, float]] = []

    class Record(Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
            seen.append((trainer.global_step, pruning.scheduled_sparsity))

    pruning = FisherPruning(target_sparsity=0.5, criterion="magnitude", unit="step", start_epoch=2, end_epoch=6, frequency=2)
    trainer = make_trainer([pruning, Record()], max_epochs=4, accumulate_grad_batches=2)
    trainer.fit(make_module(), digits)
    assert trainer.global_step == 8
    by_step = dict(seen)
    # prunes at optimizer steps 2, 4, 6 (cubic: 0, 0.4375, 0.5); accumulation does not double-count
    assert by_step[1] == 0.0 and by_step[2] == 0.0
    assert by_step[4] == pytest.approx(0.5 * (1 - 0.5**3)) and by_step[6] == 0.5
    assert pruning.pruner.position.state_dict() == {"last_pruned": 6, "num_prunes": 3}


def test_squisher_fisher_prunes_and_logs_a_greppable_line(make_trainer, digits, caplog, make_module, make_digits):
    pruning = FisherPruning(target_sparsity=0.7, start_epoch=1, end_epoch=2)  # criterion="fisher", Squisher()
    magnitude = FisherPruning(target_sparsity=0.7, criterion="magnitude", start_epoch=1, end_epoch=2)
    L.seed_everything(0)
    module = make_module()
    L.seed_everything(0)
    twin = make_module()
    with caplog.at_level(logging.INFO):
        make_trainer([pruning], max_epochs=3).fit(module, digits)
    make_trainer([magnitude], max_epochs=3).fit(twin, make_digits())
    assert type(pruning.estimator).__name__ == "Squisher"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("FisherPruning: ")]
    lines = [line for line in lines if "criterion=fisher" in line]
    assert len(lines) == 2
    pattern = r"FisherPruning: epoch=(\d+) target_sparsity=([\d.]+) sparsity=([\d.]+) pruned=(\d+)/(\d+) criterion=fisher"
    assert [re.match(pattern, line).group(1, 2) for line in lines] == [("1", "0.0000"), ("2", "0.7000")]
    # the Fisher ranking is not the magnitude ranking
    differ = sum(int((pruning.masks[n] != magnitude.masks[n]).sum()) for n in pruning.masks)
    assert differ > 0


# ---------------------------------------------------------------- resume, DDP, compile, copies, checkpoints


def _resume_run(
    make_module: Callable[..., L.LightningModule],
    data: L.LightningDataModule,
    tmp_path: Path,
    epochs: int,
    ckpt_path: str | None = None,
    save: bool = False,
) -> tuple[FisherPruning, L.Trainer]:
    L.seed_everything(7)
    pruning = FisherPruning(target_sparsity=0.85, start_epoch=1, end_epoch=5, frequency=1)  # Squisher
    random_pruning = FisherPruning(target_sparsity=0.5, criterion="random", include=["net.fc1"], start_epoch=1, end_epoch=4, seed=5)
    callbacks: list[Callback] = [pruning, random_pruning]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0))
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=save,
        default_root_dir=tmp_path,
        deterministic=True,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    # weights_only=False: ImageClassifier's hyper-parameters hold the optimizer factory (a functools.partial)
    trainer.fit(make_module(partial(torch.optim.AdamW, lr=1e-2)), data, ckpt_path=ckpt_path, weights_only=False)
    return pruning, trainer


def test_resume_from_checkpoint_prunes_exactly_like_an_uninterrupted_run(tmp_path, make_module, make_digits):
    run = partial(_resume_run, make_module)
    uninterrupted, trainer_a = run(make_digits(), tmp_path / "a", epochs=6)
    run(make_digits(), tmp_path / "b", epochs=3, save=True)
    ckpt = tmp_path / "b" / "ckpt" / "last.ckpt"
    assert ckpt.exists()
    _, trainer_c = run(make_digits(), tmp_path / "c", epochs=6, ckpt_path=str(ckpt))
    for a, c in zip(trainer_a.callbacks, trainer_c.callbacks):
        if isinstance(a, FisherPruning):
            assert a.pruner.position.state_dict() == c.pruner.position.state_dict()
            assert list(a.masks) == list(c.masks)
            assert all(torch.equal(a.masks[n], c.masks[n]) for n in a.masks)
    assert uninterrupted.pruner.position.last_pruned == 5
    # the checkpoint holds each instance's state under its own key
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    keys = [k for k in state if k.startswith("FisherPruning")]
    assert len(keys) == 2 and all(state[k]["pruner"]["position"]["last_pruned"] == 2 for k in keys)


class RankDependentFisher(FisherEstimator):
    """Differs on every rank; with ``needs_all_reduce=False`` only the broadcast makes masks agree."""

    requires_data = False

    def __init__(self, all_reduce: bool) -> None:
        self.needs_all_reduce = all_reduce

    def diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        generator = torch.Generator().manual_seed(100 + rank)
        return {n: torch.rand(p.shape, generator=generator) for n, p in context.parameters.items()}


class RankDependentInverse(RankDependentFisher):
    """An inverse Fisher that differs on every rank and couples each layer's bias to its weight: OBS
    moves the biases differently on each rank unless the callback re-syncs what compensation moved."""

    supports_inverse = True

    def inverse_diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        return {n: d + 1.0 for n, d in self.diagonal(context).items()}

    def inverse_product(self, context: FisherContext, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        out = {n: 0.1 * (1 + rank) * v for n, v in vectors.items()}
        for name, v in vectors.items():
            bias = name.removesuffix("weight") + "bias"
            out[bias] = torch.full((v.shape[0],), 0.01 * (1 + rank)) * v.flatten(1).sum(1)
        return out


class SaveMasks(Callback):
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        masks = {
            f"{i}/{n}": m.cpu()
            for i, cb in enumerate(c for c in trainer.callbacks if isinstance(c, FisherPruning))
            for n, m in cb.masks.items()
        }
        weights = {n: p.detach().cpu() for n, p in pl_module.named_parameters()}
        estimators = [cb.estimator.state_dict() for cb in trainer.callbacks if isinstance(cb, FisherPruning) and cb.estimator]
        torch.save(
            {"masks": masks, "weights": weights, "estimators": estimators}, self.directory / f"rank{trainer.global_rank}.pt"
        )


@pytest.mark.distributed
def test_ddp_ranks_hold_identical_masks_and_weights(tmp_path, make_module, digits, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks: one thread each on a 2-core machine
    # Everything sent to the spawned ranks must be importable there by name: the conftest's TinyNet and
    # DigitsData are not (another conftest.py shadows the module name), so: torch layers and DataLoaders.
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10),
    )
    # each rank's own Fisher differs: the convs' estimate is not all-reduced (rank 0's masks are broadcast,
    # and with OBS compensation rank 0's weights and the biases it moved), fc1's is all-reduced (averaged)
    broadcast_only = FisherPruning(
        target_sparsity=0.6, estimator=RankDependentInverse(False), compensate=True, include=["net.2", "net.4"],
        start_epoch=1, end_epoch=2,
    )
    reduced = FisherPruning(
        target_sparsity=0.7, estimator=RankDependentFisher(True), include=["net.7"], start_epoch=1, end_epoch=2
    )
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[broadcast_only, reduced, SaveMasks(tmp_path)],
    )
    trainer.fit(make_module(net=net), digits.train_dataloader(), digits.val_dataloader())
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert list(rank0["masks"]) == ["0/net.2.weight", "0/net.4.weight", "1/net.7.weight"]
    convs = [m for n, m in rank0["masks"].items() if n.startswith("0/")]
    assert sum(int((~m).sum()) for m in convs) == round(0.6 * sum(m.numel() for m in convs))
    assert int((~rank0["masks"]["1/net.7.weight"]).sum()) == round(0.7 * 32 * 256)
    for name in rank0["masks"]:
        assert torch.equal(rank0["masks"][name], rank1["masks"][name]), name
    for name in rank0["weights"]:  # a rank pruning with its own masks first would diverge here
        torch.testing.assert_close(rank0["weights"][name], rank1["weights"][name], rtol=0, atol=0)


@pytest.mark.distributed
def test_ddp_ranks_learn_the_same_fishleg_q_from_a_rank_dependent_diagonal(tmp_path, make_module, digits, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    # Q₀, γ and every refresh come from a source that differs on every rank and asks to be all-reduced;
    # λ's gradients are averaged. Q must come out identical on both ranks, bit for bit.
    estimator = FishLegFisher(
        damping=1.0, relative_damping=True, fvp="ggn", lr=1e-3, update_every=1, pretrain_steps=2,
        refresh_diagonal=True, diagonal_source=RankDependentFisher(True),
    )
    pruning = FisherPruning(target_sparsity=0.6, estimator=estimator, compensate=True, start_epoch=1, end_epoch=2)
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
        limit_train_batches=2, limit_val_batches=1, callbacks=[pruning, SaveMasks(tmp_path)],
    )
    trainer.fit(make_module(net=net), digits.train_dataloader(), digits.val_dataloader())
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    (q0,), (q1,) = rank0["estimators"], rank1["estimators"]
    assert q0["updates"] == q1["updates"] == 2 + 6  # 2 pre-training updates, one per optimizer step (3 epochs × 2)
    assert q0["gamma"] == q1["gamma"] > 0
    for block0, block1 in zip(q0["blocks"], q1["blocks"], strict=True):
        for key, value in block0["lambda"].items():
            torch.testing.assert_close(value, block1["lambda"][key], rtol=0, atol=0, msg=f"{block0['names']} {key}")
    for name in rank0["weights"]:
        torch.testing.assert_close(rank0["weights"][name], rank1["weights"][name], rtol=0, atol=0)


def test_compiled_net_masks_use_the_original_names(make_trainer, digits, make_module, tiny_net):
    net = tiny_net()
    module = make_module(net=torch.compile(net, backend=BACKEND))
    pruning = FisherPruning(target_sparsity=0.5, criterion="magnitude", start_epoch=0, end_epoch=1)
    make_trainer([pruning, ZeroCheck(pruning)], max_epochs=2, limit_train_batches=3).fit(module, digits)
    assert list(pruning.masks) == PRUNED_BY_DEFAULT
    for name, mask in pruning.masks.items():
        weight = dict(net.named_parameters())[name.removeprefix("net.")]
        assert (weight[~mask] == 0).all()
        assert int((~mask).sum()) > 0


def test_deepcopy_of_the_module_at_any_point(make_trainer, digits, make_module):
    copies: list[L.LightningModule] = []

    class CopyModule(Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            copies.append(copy.deepcopy(pl_module))

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            if trainer.global_step == 10:
                copies.append(copy.deepcopy(pl_module))

    pruning = FisherPruning(target_sparsity=0.6, criterion="magnitude", start_epoch=0, end_epoch=2)
    module = make_module()
    make_trainer([pruning, CopyModule()], max_epochs=3).fit(module, digits)
    copies.append(copy.deepcopy(module))
    keys = set(make_module().state_dict())
    assert len(copies) == 5
    for clone in copies:
        assert set(clone.state_dict()) == keys  # no mask buffers, no extra state
        assert not clone._forward_pre_hooks and not any(m._forward_pre_hooks for m in clone.modules())
    _assert_zero_where_pruned(copies[-1], pruning.masks)
    # a copy keeps training as a plain module
    clone = copies[-1]
    clone.net(torch.zeros(2, 1, 8, 8)).sum().backward()


def test_checkpoints_load_without_the_callback(make_trainer, digits, tmp_path, make_module, tiny_net):
    pruning = FisherPruning(target_sparsity=0.75, criterion="magnitude", start_epoch=0, end_epoch=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", save_top_k=2, save_last=True)
    module = make_module()
    make_trainer([pruning, checkpoint], max_epochs=4, enable_checkpointing=True).fit(module, digits)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "last.ckpt" in files and len(files) == 3
    # strict loading; weights_only=False only because the hyper-parameters hold a functools.partial
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", net=tiny_net(), weights_only=False)
    assert set(restored.state_dict()) == set(module.state_dict())
    _assert_zero_where_pruned(restored, pruning.masks)
    payload = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(payload["state_dict"]) == set(module.state_dict())
    (key,) = [k for k in payload["callbacks"] if k.startswith("FisherPruning")]
    assert key == pruning.state_key
    # the callback's own state is plain enough for torch.load(weights_only=True)
    torch.save(payload["callbacks"][key], tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["pruner"]["position"] == {"last_pruned": 2, "num_prunes": 3}


def test_two_instances_with_different_include_patterns(make_trainer, digits, tmp_path, make_module):
    convs = FisherPruning(target_sparsity=0.5, criterion="magnitude", include=["net.conv*"], start_epoch=0, end_epoch=1)
    linear = FisherPruning(target_sparsity=0.9, criterion="random", include=["net.fc1"], start_epoch=0, end_epoch=2)
    assert convs.state_key != linear.state_key
    trainer = make_trainer([convs, linear], max_epochs=3)
    trainer.fit(make_module(), digits)
    assert list(convs.masks) == ["net.conv1.weight", "net.conv2.weight"]
    assert list(linear.masks) == ["net.fc1.weight"]
    assert convs.sparsity == pytest.approx(0.5, abs=1e-3) and linear.sparsity == pytest.approx(0.9, abs=1e-3)
    metrics = trainer.callback_metrics
    assert metrics["pruning/0/sparsity"].item() == pytest.approx(0.5, abs=1e-3)
    assert metrics["pruning/1/sparsity"].item() == pytest.approx(0.9, abs=1e-3)


def test_sparsity_monitor_reads_the_pruning_callback(make_trainer, digits, tmp_path, make_module):
    pruning = FisherPruning(target_sparsity=0.9, criterion="magnitude", start_epoch=0, end_epoch=2)
    monitor = SparsityMonitor(dirpath=str(tmp_path / "curve"))
    make_trainer([pruning, monitor], max_epochs=3).fit(make_module(), digits)
    last = monitor.history[-1]
    assert last["target"] == pytest.approx(0.9) and last["global_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert (tmp_path / "curve" / "sparsity_curve.csv").exists()


def test_export_and_reload_a_pruned_model(make_trainer, digits, tmp_path, make_module):
    pruning = FisherPruning(target_sparsity=0.8, criterion="magnitude", start_epoch=0, end_epoch=1)
    module = make_module()
    make_trainer([pruning], max_epochs=2).fit(module, digits)
    state_file, masks_file = export_pruned(module, pruning.masks, tmp_path / "pruned.pt")
    fresh = make_module()
    masks = load_pruned(fresh, state_file)
    assert masks_file.exists() and list(masks) == list(pruning.masks)
    assert all(torch.equal(masks[n], pruning.masks[n]) for n in masks)
    for name, value in module.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value)


# ---------------------------------------------------------------- estimators, data, compensation


class RecordingData(FisherEstimator):
    """Reads one batch through the context, to check it arrives like a training batch."""

    requires_data = True

    def __init__(self) -> None:
        self.context: FisherContext | None = None
        self.first: tuple[Tensor, Tensor] | None = None

    def diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        self.context = context
        self.first = next(context.iter_batches())
        return {n: torch.ones_like(p) for n, p in context.parameters.items()}


def test_fisher_context_carries_training_batches_and_run_facts(make_trainer, make_module, make_digits):
    class MarkedData(make_digits):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            x, y = batch
            return x * 0 + 3, y

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            x, y = batch
            return x * 2 + 1, y

    estimator = RecordingData()
    pruning = FisherPruning(target_sparsity=0.5, estimator=estimator, schedule="one_shot", start_epoch=0)
    module = make_module()
    make_trainer([pruning], max_epochs=1, accumulate_grad_batches=2).fit(module, MarkedData(batch_size=16))
    context = estimator.context
    assert context is not None and estimator.first is not None
    x, y = estimator.first
    assert torch.equal(x, torch.full_like(x, 7.0)) and y.shape == (16,)  # both transfer hooks applied
    assert context.batch_size == 16 and context.accumulate_grad_batches == 2 and context.world_size == 1
    assert context.effective_batch_size == 32
    assert context.loss_fn == module.loss and context.optimizer is not None
    assert list(context.parameters) == PRUNED_BY_DEFAULT


@pytest.mark.parametrize("estimator_cls", ["EmpiricalFisher", "MonteCarloFisher"])
def test_data_estimators_prune_through_the_training_data(make_trainer, digits, make_module, estimator_cls):
    import lightning_fisher.fisher as fisher

    estimator = getattr(fisher, estimator_cls)(num_samples=64)
    # a data estimator may prune the initial model: one_shot at epoch 0 is allowed (not for the Squisher)
    pruning = FisherPruning(estimator=estimator, pattern="2:4", schedule="one_shot", start_epoch=0)
    magnitude = FisherPruning(criterion="magnitude", pattern="2:4", schedule="one_shot", start_epoch=0)
    module = make_module()
    twin = copy.deepcopy(module)
    make_trainer([pruning], max_epochs=1, limit_train_batches=1).fit(module, digits)
    make_trainer([magnitude], max_epochs=1, limit_train_batches=1).fit(twin, digits)
    for mask in pruning.masks.values():
        assert (to_reduction_layout(mask).reshape(-1, 4).sum(1) == 2).all()
    # the Fisher ranking differs from magnitude on the same initial weights
    assert any(not torch.equal(pruning.masks[n], magnitude.masks[n]) for n in pruning.masks)


class ExactInverseFisher(FisherEstimator):
    """Test-only estimator with an exact diagonal inverse Q = 1/F (so OBS equals OBD)."""

    requires_data = False

    @property
    def supports_inverse(self) -> bool:
        return True

    def diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        return {n: 1.0 + p.detach().abs() for n, p in context.parameters.items()}

    def inverse_diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        return {n: 1.0 / f for n, f in self.diagonal(context).items()}

    def inverse_product(self, context: FisherContext, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        inverse = self.inverse_diagonal(context)
        return {n: inverse[n] * v for n, v in vectors.items()}


def test_compensation_with_an_inverse_capable_estimator(make_trainer, digits, make_module, make_digits):
    runs = {}
    for compensate in (False, True):
        L.seed_everything(0)
        pruning = FisherPruning(
            target_sparsity=0.6, estimator=ExactInverseFisher(), compensate=compensate, schedule="one_shot", start_epoch=1
        )
        module = make_module()
        make_trainer([pruning], max_epochs=2).fit(module, make_digits())
        runs[compensate] = (pruning.masks, module.state_dict())
    # a diagonal Q moves no survivor: OBS and OBD runs coincide
    for name in runs[False][0]:
        assert torch.equal(runs[False][0][name], runs[True][0][name])
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(target_sparsity=1.0, end_epoch=5), ValueError, r"target_sparsity=1.0: must be in \[0, 1\)"),
        (dict(target_sparsity=-0.5, end_epoch=5), ValueError, r"target_sparsity=-0.5: must be in \[0, 1\)"),
        (dict(pattern="4:4", end_epoch=5), ValueError, r"pattern='4:4': N must be smaller than M"),
        (dict(pattern="0:4", end_epoch=5), ValueError, r"pattern='0:4': N and M must be at least 1"),
        (dict(pattern="2:0", end_epoch=5), ValueError, r"pattern='2:0': N and M must be at least 1"),
        (dict(pattern="two:four", end_epoch=5), ValueError, r"pattern='two:four': must be 'unstructured' or 'N:M'"),
        (dict(target_sparsity=0.5, start_epoch=5, end_epoch=5), ValueError, r"end_epoch=5: must be an integer greater than start_epoch=5"),
        (dict(target_sparsity=0.5, start_epoch=5, end_epoch=2), ValueError, r"end_epoch=2: must be an integer greater than start_epoch=5"),
        (dict(target_sparsity=0.5), ValueError, r"end_epoch=None: the gradual schedule needs end_epoch > start_epoch"),
        (dict(target_sparsity=0.5, start_epoch=-1, end_epoch=2), ValueError, r"start_epoch=-1: must be a non-negative integer"),
        (dict(target_sparsity=0.5, end_epoch=2, criterion="hessian"), ValueError, r"criterion='hessian': must be one of"),
        (dict(target_sparsity=0.5, end_epoch=2, scope="model"), ValueError, r"scope='model': must be one of"),
        (dict(target_sparsity=0.5, end_epoch=2, schedule="linear"), ValueError, r"schedule='linear': must be one of"),
        (dict(target_sparsity=0.5, end_epoch=2, unit="batch"), ValueError, r"unit='batch': must be one of"),
        (dict(target_sparsity=0.5, end_epoch=2, frequency=0), ValueError, r"frequency=0: must be a positive integer"),
        (dict(target_sparsity=0.5, end_epoch=2, include="net.fc1"), TypeError, r"must be lists of patterns"),
        (dict(target_sparsity=0.5, end_epoch=2, estimator="squisher"), TypeError, r"estimator='squisher': must be a FisherEstimator"),
        (
            dict(target_sparsity=0.5, end_epoch=2, compensate=True),
            ValueError,
            r"compensate=True: estimator=Squisher\(.*\) offers no inverse Fisher; "
            r"diagonal estimators prune with OBD and no compensation",
        ),
        (dict(target_sparsity=0.5, end_epoch=2, criterion="magnitude", compensate=True), ValueError, r"compensate=True: needs criterion='fisher'"),
        (dict(target_sparsity=0.5, end_epoch=2, criterion="magnitude", estimator=ConstantFisher()), ValueError,
         r"estimator=ConstantFisher\(\): only criterion='fisher' uses an estimator, got criterion='magnitude'"),
        (dict(target_sparsity=0.8, pattern="2:4", end_epoch=2), ValueError, r"target_sparsity=0.8: pattern='2:4' prunes exactly"),
        (dict(target_sparsity=0.5, end_epoch=2, fisher_damping=-0.1), ValueError, r"fisher_damping=-0.1: must be a finite float >= 0"),
        (dict(target_sparsity=0.5, end_epoch=2, criterion="random", fisher_damping=1.0), ValueError,
         r"fisher_damping=1.0: only the OBD score \(criterion='fisher', compensate=False\) uses it, got criterion='random'"),
        (dict(target_sparsity=0.5, end_epoch=2, obs_iterations=10), ValueError,
         r"obs_iterations=10: only the OBS update uses it; set compensate=True or leave it 0"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        FisherPruning(**kwargs)


class StepCounter(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches += 1


@pytest.mark.parametrize(
    ("pruning", "optimizer", "error", "match"),
    [
        (
            partial(FisherPruning, target_sparsity=0.5, criterion="magnitude", include=["net.fc1", "net.nothing*"], end_epoch=2),
            None,
            ValueError,
            r"include=\['net.nothing\*'\]: matches no Conv2d/Linear module or weight",
        ),
        (
            partial(FisherPruning, target_sparsity=0.5, start_epoch=1, end_epoch=2),  # Squisher with SGD
            partial(torch.optim.SGD, lr=0.1),
            TypeError,
            r"optimizer=SGD: the Squisher reads the optimizer's squared-gradient accumulator",
        ),
        (
            partial(FisherPruning, target_sparsity=0.5, schedule="one_shot", start_epoch=0),  # Squisher at epoch 0
            None,
            ValueError,
            r"start_epoch=0: criterion='fisher' with Squisher\(.*\) would prune at epoch 0, before any optimizer step",
        ),
    ],
)
def test_bad_run_facts_fail_before_any_training(make_trainer, digits, pruning, optimizer, error, match, make_module):
    counter = StepCounter()
    with pytest.raises(error, match=match):
        make_trainer([pruning(), counter], max_epochs=1).fit(make_module(optimizer), digits)
    assert counter.batches == 0


def test_gradual_squisher_from_epoch_zero_is_fine(make_trainer, digits, make_module):
    # initial_sparsity=0: nothing is removed at start_epoch=0, the first real prune follows a training epoch
    pruning = FisherPruning(target_sparsity=0.5, start_epoch=0, end_epoch=1)
    make_trainer([pruning], max_epochs=2).fit(make_module(), digits)
    assert pruning.sparsity == pytest.approx(0.5, abs=1e-3)


def test_schedule_longer_than_training_warns(make_trainer, digits, make_module):
    pruning = FisherPruning(target_sparsity=0.5, criterion="magnitude", start_epoch=0, end_epoch=3)
    with pytest.warns(UserWarning, match="the last prune is at epoch 3 but training stops at max_epochs=3"):
        make_trainer([pruning], max_epochs=3, limit_train_batches=1, limit_val_batches=0).fit(make_module(), digits)



@pytest.mark.parametrize(
    ("end_step", "limits", "match"),
    [
        (8, {}, "the last prune is at step 8 but training stops at 8 optimizer steps \\(max_epochs=4\\)"),
        (5, {"max_steps": 5}, "the last prune is at step 5 but training stops at max_steps=5"),
        (6, {}, None),  # ends inside the 8 steps: no warning
    ],
)
def test_step_schedule_longer_than_training_warns(make_trainer, digits, make_module, end_step, limits, match):
    pruning = FisherPruning(target_sparsity=0.5, criterion="magnitude", unit="step", start_epoch=2, end_epoch=end_step)
    trainer = make_trainer([pruning], max_epochs=4, accumulate_grad_batches=2, limit_val_batches=0, **limits)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_module(), digits)
    last_prune = [str(w.message) for w in caught if "the last prune" in str(w.message)]
    if match is None:
        assert last_prune == [] and pruning.sparsity == pytest.approx(0.5, abs=1e-3)
    else:
        assert len(last_prune) == 1 and re.search(match, last_prune[0]), last_prune

# ---------------------------------------------------------------- layer-collapse guard (min_layer_density)


@pytest.mark.parametrize(("density", "fc1_kept"), [(0.01, 82), (0.0, 0)])  # ceil(0.01·8192) = 82
def test_global_guard_keeps_a_layer_that_one_threshold_would_empty(make_trainer, digits, make_module, caplog, density, fc1_kept):
    module = make_module()
    with torch.no_grad():
        module.net.fc1.weight.mul_(1e-3)  # fc1 holds the 8192 lowest magnitudes of the 9920 pruned weights
    initial = module.net.fc1.weight.detach().abs().clone()
    pruning = FisherPruning(
        target_sparsity=0.9, criterion="magnitude", schedule="one_shot", start_epoch=0, min_layer_density=density
    )
    with caplog.at_level(logging.INFO, logger="lightning_fisher.pruning.patterns"):
        make_trainer([pruning], max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(module, digits)
    kept = pruning.masks["net.fc1.weight"]
    assert int(kept.sum()) == fc1_kept
    assert sum(int((~m).sum()) for m in pruning.masks.values()) == round(0.9 * 9920)
    held = [r.getMessage() for r in caplog.records if "held at their min_layer_density" in r.getMessage()]
    if density:
        assert initial[kept].min() > initial[~kept].max()  # the floor is fc1's top magnitudes at the prune
        assert held == [
            "global pruning to sparsity=0.9: layers held at their min_layer_density=0.01 floor (kept/numel): "
            "net.fc1.weight (82/8192)"
        ]
    else:
        assert held == []


def test_unreachable_layer_floors_fail_before_any_training(make_trainer, digits, make_module):
    counter = StepCounter()
    # floors ceil(0.2·576) + ceil(0.2·1152) + ceil(0.2·8192) = 116 + 231 + 1639 = 1986 > 9920 − 8928 = 992
    pruning = FisherPruning(target_sparsity=0.9, criterion="magnitude", end_epoch=2, min_layer_density=0.2)
    with pytest.raises(ValueError, match=r"min_layer_density=0.2: the per-layer floors keep 1986 of 9920 weights"):
        make_trainer([pruning, counter], max_epochs=1).fit(make_module(), digits)
    assert counter.batches == 0
    # per layer the guard does not apply: the same density is fine
    layer = FisherPruning(target_sparsity=0.9, criterion="magnitude", scope="layer", end_epoch=1, min_layer_density=0.2)
    make_trainer([layer], max_epochs=2, limit_train_batches=1, limit_val_batches=0).fit(make_module(), digits)
    assert layer.sparsity == pytest.approx(0.9, abs=1e-3)


@pytest.mark.parametrize("value", [-0.1, 1.0, 3, "0.01", None, True])
def test_bad_min_layer_density_fails_at_construction(value):
    with pytest.raises(ValueError, match=re.escape(f"min_layer_density={value!r}: must be a float in [0, 1)")):
        FisherPruning(target_sparsity=0.5, end_epoch=2, min_layer_density=value)
