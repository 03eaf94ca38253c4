"""FisherPruning with FishLegFisher in tiny Lightning runs on CPU, and the FishLeg recipe."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_fisher.train  # noqa: F401 - registers the primary config's schema for compose_config
from lightning_fisher.callbacks import FisherPruning
from lightning_fisher.data import DigitsDataModule
from lightning_fisher.fisher import EmpiricalFisher, FisherContext, FisherEstimator, FishLegFisher


class ZeroCheck(Callback):
    """Counts training batches and checks that every pruned weight is exactly zero before each."""

    def __init__(self, pruning: FisherPruning) -> None:
        self.pruning = pruning
        self.checked = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        for name, param in self.pruning.pruner.parameters.items():
            assert (param[~self.pruning.masks[name]] == 0).all(), (trainer.global_step, name)
        self.checked += 1


@pytest.mark.parametrize("obs_iterations", [0, 10])
def test_fishleg_surgeon_reaches_the_target_with_exact_zeros_and_logs(make_trainer, digits, make_module, obs_iterations):
    estimator = FishLegFisher(damping=0.1, conv_form="three_factor", update_every=2, pretrain_steps=3)
    pruning = FisherPruning(
        estimator=estimator, compensate=True, target_sparsity=0.8, pattern="unstructured", start_epoch=0, end_epoch=2,
        obs_iterations=obs_iterations,
    )
    zero_check = ZeroCheck(pruning)
    module = make_module()
    trainer = make_trainer([pruning, zero_check], max_epochs=3)
    trainer.fit(module, digits)
    assert zero_check.checked == 3 * len(digits.train_dataloader())
    assert pruning.sparsity == pytest.approx(0.8, abs=1 / 9920)  # to one weight of 576 + 1152 + 8192
    params = dict(module.named_parameters())
    for name, mask in pruning.masks.items():
        assert (params[name].detach()[~mask] == 0).all()
        assert (params[name].detach()[mask] != 0).all()
    # 12 optimizer steps, an update every 2 of them, and 3 pre-training updates at the first prune
    assert trainer.global_step == 12 and estimator.updates == 6 + 3 and estimator.pretrained
    assert {"fishleg/aux_loss", "fishleg/diag_agreement"} <= set(trainer.callback_metrics)
    assert torch.isfinite(trainer.callback_metrics["fishleg/aux_loss"])
    # BatchNorm-free blocks: conv1 (no bias) and conv2 (bias) three-factor, fc1 two-factor
    assert [type(f).__name__ for f in estimator.forms] == ["ThreeFactorConvForm", "ThreeFactorConvForm", "KroneckerForm"]


def test_hook_runs_only_after_real_optimizer_steps(make_trainer, digits, make_module):
    estimator = FishLegFisher(update_every=1)
    pruning = FisherPruning(estimator=estimator, target_sparsity=0.5, start_epoch=1, end_epoch=2)
    trainer = make_trainer([pruning], max_epochs=3, accumulate_grad_batches=2)
    trainer.fit(make_module(), digits)
    assert trainer.global_step == 6 and estimator.updates == 6  # 12 micro-batches, 6 steps


class _FirstBatchRecorder(FisherEstimator):
    """Records the first batch of every step hook's context, and how many samples the whole context holds."""

    requires_data = True

    def __init__(self) -> None:
        self.first: list[torch.Tensor] = []
        self.samples: list[int] = []

    def diagonal(self, context: FisherContext) -> dict[str, torch.Tensor]:
        return {n: torch.ones_like(p) for n, p in context.parameters.items()}

    def on_train_step(self, context: FisherContext, step: int) -> dict[str, float]:
        batches = context.iter_batches()
        self.first.append(next(batches)[0].clone())
        self.samples.append(len(self.first[-1]) + sum(len(x) for x, _ in batches))
        return {}


class _BatchSeen(Callback):
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.seen.append(batch[0].clone())


def test_the_step_hook_reads_the_step_batch_first_then_fresh_training_batches(make_trainer, digits, make_module):
    recorder, seen = _FirstBatchRecorder(), _BatchSeen()
    pruning = FisherPruning(estimator=recorder, target_sparsity=0.5, start_epoch=0, end_epoch=1)
    make_trainer([seen, pruning], max_epochs=2).fit(make_module(), digits)
    assert len(recorder.first) == len(seen.seen) == 2 * len(digits.train_dataloader())
    assert all(torch.equal(a, b) for a, b in zip(recorder.first, seen.seen))
    assert recorder.samples == [32 + 128] * len(recorder.first)  # the step's batch, then a whole epoch


class _SampleCountingEmpirical(EmpiricalFisher):
    """An EmpiricalFisher that records how many samples each estimate read."""

    def __init__(self, num_samples: int) -> None:
        super().__init__(num_samples=num_samples)
        self.samples: list[int] = []

    def diagonal(self, context: FisherContext) -> dict[str, torch.Tensor]:
        read: list[int] = []

        def batches():
            for x, y in context.iter_batches():
                read.append(len(x))
                yield x, y

        fisher = super().diagonal(dataclasses.replace(context, batches=batches))
        self.samples.append(min(sum(read), self.num_samples))
        return fisher


def test_q0_from_a_data_diagonal_source_reads_all_its_samples_at_the_first_update(make_trainer, digits, make_module):
    # Q is built at the first auxiliary update, inside the step hook, whose first batch is the step's own
    source = _SampleCountingEmpirical(num_samples=80)  # two and a half batches of 32
    estimator = FishLegFisher(update_every=2, pretrain_steps=1, refresh_diagonal=True, diagonal_source=source)
    pruning = FisherPruning(estimator=estimator, compensate=True, target_sparsity=0.5, start_epoch=1, end_epoch=2)
    make_trainer([pruning], max_epochs=3).fit(make_module(), digits)
    # Q₀ at step 2, then the refresh before epoch 2's prune (epoch 1's target is 0: nothing is scored); both
    # read 80 samples (Q₀ read the step's batch alone, 32, when the hook's context held nothing else)
    assert source.samples == [80, 80]


class _InputRecorder(Callback):
    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.inputs.append(batch[0].clone())


@pytest.mark.parametrize("estimator", ["empirical", "fishleg"])
def test_fisher_estimates_leave_the_training_stream_unchanged(make_trainer, make_module, estimator):
    # The estimates draw augmented training batches (at the prunes; FishLeg's Q₀ also in the step hook);
    # the augmentations training sees must be those of a run without them.
    def inputs_seen(callbacks: list) -> list[torch.Tensor]:
        recorder = _InputRecorder()
        data = DigitsDataModule(batch_size=32, max_per_class=10, seed=0)  # crop augmentation, 3 batches an epoch
        make_trainer([recorder, *callbacks], max_epochs=3).fit(make_module(), data)
        return recorder.inputs

    source = EmpiricalFisher(num_samples=40)
    fishleg = FishLegFisher(update_every=2, pretrain_steps=1, diagonal_source=source)
    chosen = source if estimator == "empirical" else fishleg
    pruning = FisherPruning(estimator=chosen, compensate=estimator == "fishleg", target_sparsity=0.5, start_epoch=1,
                            end_epoch=2)
    pruned, plain = inputs_seen([pruning]), inputs_seen([])
    assert pruning.sparsity == pytest.approx(0.5, abs=1e-3) and len(pruned) == len(plain) == 9
    assert all(torch.equal(a, b) for a, b in zip(pruned, plain))


def test_fisher_criterion_without_compensation_uses_the_implied_diagonal(make_trainer, digits, make_module):
    estimator = FishLegFisher(update_every=2)
    pruning = FisherPruning(estimator=estimator, target_sparsity=0.5, start_epoch=1, end_epoch=2)
    make_trainer([pruning], max_epochs=3).fit(make_module(), digits)
    assert pruning.sparsity == pytest.approx(0.5, abs=1 / 9920)


@pytest.mark.parametrize("augmented", [False, True])
def test_refreshed_fishleg_without_compensation_trains_as_damped_obd_on_the_same_diagonal(make_trainer, digits, make_module, augmented):
    # The ablation of FishLeg Surgeon's OBS update: refreshed from EmpiricalFisher with γ = δ·mean F̂, its
    # implied diagonal is F̂, so FisherPruning(fisher_damping=δ) must prune, prune after prune, exactly as
    # with EmpiricalFisher itself. Three prunes: from the second on, the mean F̂ covers pruned coordinates.
    # With augmentation, the refresh after the pre-training updates must see the batches a one-pass
    # estimate sees, and no pass may disturb the augmentations training sees afterwards.
    def fit(estimator: FisherEstimator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        pruning = FisherPruning(estimator=estimator, fisher_damping=1.0, target_sparsity=0.8, start_epoch=1, end_epoch=4)
        torch.manual_seed(0)
        module = make_module()
        data = DigitsDataModule(batch_size=32, max_per_class=20, seed=0) if augmented else digits
        make_trainer([pruning], max_epochs=5).fit(module, data)
        assert pruning.sparsity == pytest.approx(0.8, abs=1 / 9920)
        return dict(pruning.masks), {n: p.detach() for n, p in module.named_parameters()}

    fishleg = FishLegFisher(damping=1.0, relative_damping=True, fvp="ggn", lr=1e-3, refresh_diagonal=True,
                            update_every=2, pretrain_steps=3, diagonal_source=EmpiricalFisher(num_samples=128))
    (obd_masks, obd_weights), (fishleg_masks, fishleg_weights) = fit(EmpiricalFisher(num_samples=128)), fit(fishleg)
    assert fishleg.updates > 3
    assert all(torch.equal(obd_masks[n], fishleg_masks[n]) for n in obd_masks)
    assert all(torch.equal(obd_weights[n], fishleg_weights[n]) for n in obd_weights)


def _fit(module: L.LightningModule, data: L.LightningDataModule, callbacks: list, root: Path, epochs: int, ckpt_path: str | None = None) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        deterministic=True,
        num_sanity_val_steps=0,
        callbacks=[*callbacks, ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)],
    )
    # weights_only=False: ImageClassifier's hyper-parameters hold the optimizer factory (a functools.partial)
    trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=False)
    return trainer


def _fishleg_pruning(**options: Any) -> FisherPruning:
    return FisherPruning(
        estimator=FishLegFisher(update_every=2, pretrain_steps=4, **options),
        compensate=True,
        target_sparsity=0.8,
        start_epoch=2,
        end_epoch=4,
    )


def test_start_from_a_dense_checkpoint(tmp_path, make_module, make_digits):
    L.seed_everything(0)
    _fit(make_module(partial(torch.optim.AdamW, lr=1e-2)), make_digits(), [], tmp_path / "dense", epochs=2)
    ckpt = tmp_path / "dense" / "ckpt" / "last.ckpt"
    pruning = _fishleg_pruning()
    module = make_module(partial(torch.optim.AdamW, lr=1e-2))
    trainer = _fit(module, make_digits(), [pruning], tmp_path / "pruned", epochs=5, ckpt_path=str(ckpt))
    assert pruning.pruner.position.last_pruned == 4 and pruning.sparsity == pytest.approx(0.8, abs=1 / 9920)
    estimator = pruning.estimator
    assert isinstance(estimator, FishLegFisher) and estimator.pretrained
    # 8 steps restored, 12 more; updates at steps 10, 12, ..., 20 plus 4 pre-training updates
    assert trainer.global_step == 20 and estimator.updates == 6 + 4


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"fvp": "ggn", "refresh_diagonal": True},
        {"fvp": "ggn", "refresh_diagonal": True, "refresh_match": "fisher", "relative_damping": True, "damping": 1.0},
        {"refresh_diagonal": True, "relative_damping": True, "damping": 1.0, "diagonal_source": EmpiricalFisher(num_samples=32)},
    ],
    ids=["default", "ggn_refresh", "relative_fisher_match", "empirical_diagonal"],
)
def test_resume_continues_q_exactly(tmp_path, make_module, make_digits, options):
    def run(root: Path, epochs: int, ckpt_path: str | None = None) -> FisherPruning:
        L.seed_everything(0)
        pruning = _fishleg_pruning(**options)
        _fit(make_module(partial(torch.optim.AdamW, lr=1e-2)), make_digits(), [pruning], root, epochs, ckpt_path)
        return pruning

    uninterrupted = run(tmp_path / "a", 5)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "c", 5, str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    a, c = uninterrupted.estimator, resumed.estimator
    assert isinstance(a, FishLegFisher) and isinstance(c, FishLegFisher)
    assert a.updates == c.updates and a.gamma == c.gamma
    for fa, fc in zip(a.forms, c.forms):
        for (name, pa), pc in zip(fa.named_parameters(), fc.parameters()):
            torch.testing.assert_close(pa, pc, msg=name)
    assert all(torch.equal(uninterrupted.masks[n], resumed.masks[n]) for n in uninterrupted.masks)


def test_fishleg_recipe_composes_and_builds(compose_config):
    cfg = compose_config("recipe=cifar10_resnet18_fishleg95", "pruning.compensate=false", "+fisher.conv_form=two_factor")
    assert cfg.task_name == "cifar10_resnet18_fishleg95"
    estimator = instantiate(cfg.fisher)
    assert isinstance(estimator, FishLegFisher)
    assert estimator.conv_form == "two_factor" and estimator.pretrain_steps == 100
    pruning = instantiate(cfg.pruning, estimator=estimator)
    assert isinstance(pruning, FisherPruning) and pruning.pruner.compensate is False
    assert pruning.pruner.target_sparsity == 0.95
    default = compose_config("recipe=cifar10_resnet18_fishleg95")
    assert default.pruning.compensate is True and default.optimizer._target_ == "torch.optim.AdamW"
    joint = compose_config("recipe=cifar10_resnet18_fishleg95", "pruning.obs_iterations=20")
    assert instantiate(joint.pruning, estimator=estimator).pruner.obs_iterations == 20
    # the recipe's measured setting (conf/fisher/fishleg.yaml), not the constructor's defaults
    measured = instantiate(default.fisher)
    assert (measured.damping, measured.relative_damping, measured.fvp, measured.lr) == (1.0, True, "ggn", 1e-3)
    assert measured.refresh_diagonal is True and measured.refresh_match == "inverse" and measured.update_every == 50
    assert isinstance(measured.diagonal_source, EmpiricalFisher) and measured.diagonal_source.num_samples == 1024
    # the overrides its comment gives for the constructor's defaults
    paper = compose_config(
        "recipe=cifar10_resnet18_fishleg95", "fisher.damping=0.1", "~fisher.relative_damping", "~fisher.fvp", "~fisher.lr",
        "~fisher.refresh_diagonal", "~fisher.diagonal_source", "~fisher.update_every",
    )
    plain, constructed = instantiate(paper.fisher), FishLegFisher(pretrain_steps=100)
    assert repr(plain) == repr(constructed) and plain.diagonal_source is None
    matched = instantiate(compose_config("recipe=cifar10_resnet18_fishleg95", "+fisher.refresh_match=fisher").fisher)
    assert matched.refresh_match == "fisher"
