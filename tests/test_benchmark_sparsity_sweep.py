"""benchmarks/sparsity_sweep.py: arguments, the ModelPruning amount, the table, the one-shot path, tiny runs."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lightning_fisher.callbacks import FisherPruning
from lightning_fisher.data import CIFAR10DataModule
from lightning_fisher.fisher import EmpiricalFisher, FisherContext, FisherEstimator, FishLegFisher
from lightning_fisher.pruning.schedules import cubic_sparsity
from lightning_fisher.sparse import nm_violation

TINY = ["--width", "4", "--max-per-class", "0", "--batch-size", "20", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("restore_lightning_log_levels")


@pytest.fixture(scope="module")
def sweep(load_benchmark) -> Iterator[ModuleType]:
    # one thread: tiny models; measured 71 s for this file with 2 threads on 2 busy cores, 10 s with 1
    with load_benchmark("sparsity_sweep", threads=1) as module:
        yield module


# ------------------------------------------------------------------------------------------ arguments
def test_defaults(sweep: ModuleType) -> None:
    args = sweep.parse_args([])
    assert args.mode == "gradual"
    assert (args.fishleg_pretrain, args.fishleg_update_every, args.bn_recalibrate) == (50, 10, 0)
    assert args.methods == list(sweep.METHODS) and {"fishleg", "fishleg_obs"} <= set(args.methods)
    assert args.sparsities == [0.9, 0.95, 0.98] and args.patterns == ["2:4"]
    assert (args.prune_start, args.prune_end) == (1, 6)  # epochs 8: 8 // 5, 8 * 3 // 4


def test_flags(sweep: ModuleType) -> None:
    args = sweep.parse_args(["--mode", "oneshot", "--sparsities", "0.8,0.9,0.95,0.98", "--patterns", "2:4,1:4",
                             "--methods", "fishleg, fishleg_obs", "--fishleg-pretrain", "0",
                             "--fishleg-update-every", "3", "--bn-recalibrate", "2", "--epochs", "1"])
    assert args.mode == "oneshot" and args.sparsities == [0.8, 0.9, 0.95, 0.98]
    assert args.patterns == ["2:4", "1:4"] and args.methods == ["fishleg", "fishleg_obs"]
    assert (args.fishleg_pretrain, args.fishleg_update_every, args.bn_recalibrate) == (0, 3, 2)
    estimator = sweep.fishleg_estimator(args)
    assert (estimator.pretrain_steps, estimator.update_every) == (0, 3)
    assert sweep.parse_args(["--patterns", ""]).patterns == []
    assert sweep.fishleg_estimator(sweep.parse_args(["--fishleg-damping", "1e-5"])).damping == 1e-5
    assert sweep.fishleg_estimator(sweep.parse_args([])).damping == FishLegFisher().damping


def test_fisher_scale(sweep: ModuleType) -> None:
    diagonal = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([[10.0]])}
    assert sweep.fisher_scale(diagonal) == "F mean 4.00e+00 median 2.00e+00 max 1.00e+01"


@pytest.mark.parametrize("argv", [
    ["--methods", "fishleg,nope"],
    ["--sparsities", "0.9,1.0"],
    ["--mode", "sometimes"],
    ["--fishleg-update-every", "0"],
    ["--fishleg-pretrain", "-1"],
    ["--bn-recalibrate", "-1"],
    ["--fisher-damping", "-1"],
    ["--fisher-damping", "nan"],
    ["--fishleg-damping", "0"],
    ["--fishleg-lr", "0"],
    ["--fishleg-lr", "inf"],
    ["--fishleg-fvp", "exact"],
    ["--fishleg-refresh-match", "hessian", "--fishleg-refresh"],
    ["--fishleg-refresh-match", "fisher"],  # without --fishleg-refresh it would match nothing
    ["--fishleg-diagonal", "squisher"],
    ["--obs-iterations", "-1"],
    ["--fishleg-heldout", "-1", "--mode", "oneshot"],
    ["--fishleg-heldout", "2"],  # gradual: Q learns during training, no before/after
    ["--epochs", "1"],  # gradual: no room for a prune followed by training
    ["--epochs", "4", "--prune-start", "1", "--prune-end", "4"],
    ["--prune-every-steps", "-1"],
    ["--prune-every-steps", "10", "--methods", "fishleg,lightning_l1"],  # ModelPruning prunes at epoch ends
    ["--prune-every-steps", "10", "--methods", "fishleg", "--mode", "oneshot"],
])
def test_bad_arguments(sweep: ModuleType, argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        sweep.parse_args(argv)


# ---------------------------------------------------------------------------------- ModelPruning amount
@pytest.mark.parametrize(("final", "start", "end"), [(0.9, 1, 6), (0.98, 0, 3), (0.5, 2, 3)])
def test_lightning_amount_follows_the_cubic_level(sweep: ModuleType, final: float, start: int, end: int) -> None:
    amount = sweep.lightning_amount(final, start, end)
    remaining = 1.0
    for epoch in range(end + 3):
        remaining *= 1.0 - amount(epoch)  # ModelPruning prunes this fraction of what remains at epoch's end
        expected = 0.0 if epoch + 1 < start else cubic_sparsity(epoch + 1, 0.0, final, start, end)
        assert 1.0 - remaining == pytest.approx(expected, abs=1e-12)
    assert amount(end) == 0.0 and amount(end + 5) == 0.0


# ----------------------------------------------------------------------------------------------- table
def test_format_table(sweep: ModuleType) -> None:
    Run = sweep.Run
    runs = [
        Run("dense", "dense", 0.9), Run("dense_adafisher", "dense", 0.85),
        Run("magnitude_layer", "0.9", 0.5), Run("magnitude_layer", "2:4", 0.7),
        Run("fishleg_obs", "0.9", 0.625), Run("fishleg_obs", "2:4", 0.6),
        Run("lightning_l1", "0.9", 0.25), Run("lightning_l1", "2:4"),
    ]
    table = sweep.format_table(runs, ["0.9", "2:4"], ["magnitude_layer", "lightning_l1", "fishleg_obs", "kronecker"])
    assert table.splitlines() == [
        "| method | 0.9 | 2:4 |",
        "|---|---:|---:|",
        "| dense (no pruning) | 0.9000 | 0.9000 |",
        "| dense, AdaFisherW (no pruning) | 0.8500 | 0.8500 |",
        "| magnitude_layer | 0.5000 | 0.7000 |",
        "| lightning_l1 | 0.2500 (-0.2500) | n/a |",
        "| fishleg_obs | 0.6250 (+0.1250) | 0.6000 (-0.1000) |",
        "| kronecker | n/a | n/a |",
    ]


# ------------------------------------------------------------------------------------ gradual callbacks
@pytest.mark.parametrize(("method", "compensate"), [("fishleg", False), ("fishleg_obs", True)])
@pytest.mark.parametrize("target", ["0.9", "2:4"])
def test_fishleg_callbacks(sweep: ModuleType, method: str, compensate: bool, target: str) -> None:
    args = sweep.parse_args(["--fishleg-pretrain", "7", "--fishleg-update-every", "4", "--fishleg-lr", "3e-4",
                             "--fishleg-fvp", "ggn", "--fishleg-refresh", "--fishleg-relative-damping",
                             "--fishleg-refresh-match", "fisher", "--fishleg-diagonal", "empirical",
                             "--fisher-samples", "64"])
    model = sweep._model(method, sweep.parse_args(["--width", "4"]))
    (callback,) = sweep._callbacks(method, target, model, args)
    assert isinstance(callback, FisherPruning) and isinstance(callback.estimator, FishLegFisher)
    estimator = callback.estimator
    assert (estimator.pretrain_steps, estimator.update_every, estimator.lr, estimator.fvp) == (7, 4, 3e-4, "ggn")
    default = sweep.fishleg_estimator(sweep.parse_args([]))
    assert estimator.refresh_diagonal and not default.refresh_diagonal
    assert estimator.relative_damping and not default.relative_damping
    assert (estimator.refresh_match, default.refresh_match) == ("fisher", "inverse")
    assert isinstance(estimator.diagonal_source, EmpiricalFisher) and estimator.diagonal_source.num_samples == 64
    assert default.diagonal_source is None
    assert callback.pruner.compensate is compensate and callback.pruner.scope == "global"
    assert callback.pattern == ("unstructured" if target == "0.9" else "2:4")
    assert callback.pruner.target_sparsity == (0.9 if target == "0.9" else 0.5)


@pytest.mark.parametrize("method", ["magnitude_global", "squisher", "fishleg_obs"])
def test_prune_every_steps_spans_the_same_epochs_in_steps(sweep: ModuleType, method: str) -> None:
    args = sweep.parse_args(["--prune-every-steps", "10", "--methods", method])
    args.steps_per_epoch = 40  # main sets it from the training loader
    model = sweep._model(method, sweep.parse_args(["--width", "4"]))
    (callback,) = sweep._callbacks(method, "0.95", model, args)
    schedule = callback.pruner.schedule
    assert callback.unit == "step" and (schedule.start, schedule.end, schedule.frequency) == (40, 240, 10)
    assert schedule.positions() == list(range(40, 241, 10)) and schedule.level_at(240) == 0.95
    (per_epoch,) = sweep._callbacks(method, "0.95", model, sweep.parse_args(["--methods", method]))
    assert per_epoch.unit == "epoch" and per_epoch.pruner.schedule.positions() == [1, 2, 3, 4, 5, 6]
    # at an epoch boundary both reach the same level
    assert schedule.level_at(3 * 40) == pytest.approx(per_epoch.pruner.schedule.level_at(3))


@pytest.mark.parametrize(("method", "damped"), [("squisher", True), ("empirical", True), ("fishleg_obs", False)])
def test_fisher_damping_reaches_the_obd_methods_only(sweep: ModuleType, method: str, damped: bool) -> None:
    args = sweep.parse_args(["--fisher-damping", "0.5"])
    model = sweep._model(method, sweep.parse_args(["--width", "4"]))
    (callback,) = sweep._callbacks(method, "0.95", model, args)
    assert callback.pruner.fisher_damping == (0.5 if damped else 0.0)
    assert sweep.parse_args([]).fisher_damping == 0.0


@pytest.mark.parametrize(("method", "iterations"), [("fishleg_obs", 8), ("fishleg", 0), ("squisher", 0)])
def test_obs_iterations_reach_fishleg_surgeon_only(sweep: ModuleType, method: str, iterations: int) -> None:
    args = sweep.parse_args(["--obs-iterations", "8"])
    model = sweep._model(method, sweep.parse_args(["--width", "4"]))
    (callback,) = sweep._callbacks(method, "0.95", model, args)
    assert callback.pruner.obs_iterations == iterations
    assert sweep.parse_args([]).obs_iterations == 0


# ------------------------------------------------------------------------------------- one-shot core
@pytest.fixture(scope="module")
def trained(sweep: ModuleType, cifar_dir: Path) -> tuple[object, CIFAR10DataModule, object]:
    args = sweep.parse_args(["--mode", "oneshot", "--epochs", "2", "--fishleg-pretrain", "3", *TINY])
    data = CIFAR10DataModule(data_dir=cifar_dir, download=False, batch_size=args.batch_size, eval_batch_size=500,
                             seed=0, max_per_class=None)
    data.setup("fit")
    return args, data, sweep.train_dense("dense", data, args)


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("options", [[], ["--fishleg-diagonal", "empirical", "--fisher-samples", "64",
                                         "--fishleg-relative-damping", "--fishleg-damping", "1", "--fishleg-refresh"]],
                         ids=["default", "empirical_diagonal"])
def test_estimate_leaves_the_dense_model_unchanged(sweep: ModuleType, trained: tuple, options: list[str]) -> None:
    _, data, dense = trained
    args = sweep.parse_args(["--mode", "oneshot", "--epochs", "2", "--fishleg-pretrain", "3", *options, *TINY])
    before = _state(dense.net)
    steps = {id(p): int(s["step"]) for p, s in dense.optimizer.state.items()}
    inputs = sweep.estimate("fishleg_obs", dense, data, args)
    assert inputs.fisher is None and inputs.inverse_diag is not None and inputs.inverse_product is not None
    assert inputs.extra["fishleg_updates"] == 3  # --fishleg-pretrain 3
    assert inputs.extra["scale"].startswith("1/Q_qq mean ")
    after = dense.net.state_dict()
    for name, value in before.items():  # weights and BatchNorm running statistics (train-mode forwards)
        assert torch.equal(after[name], value), name
    assert steps == {id(p): int(s["step"]) for p, s in dense.optimizer.state.items()}
    assert not dense.net.training


def test_every_estimate_reads_the_same_augmented_batches(sweep: ModuleType, trained: tuple) -> None:
    # FishLeg without compensation, refreshed from an empirical diagonal, is damped empirical OBD: its
    # pre-training updates read the batches first, yet its refresh sees the augmentations the empirical
    # estimate sees, whatever ran before either (as FisherPruning's estimates do)
    _, data, dense = trained
    assert data.augment
    args = sweep.parse_args(["--mode", "oneshot", "--epochs", "2", "--fishleg-pretrain", "3", "--fisher-samples", "20",
                             "--fishleg-diagonal", "empirical", "--fishleg-relative-damping", "--fishleg-damping", "1",
                             "--fishleg-refresh", *TINY])
    first = sweep.estimate("empirical", dense, data, args).fisher
    fishleg = sweep.estimate("fishleg", dense, data, args)
    again = sweep.estimate("empirical", dense, data, args).fisher
    assert fishleg.extra["fishleg_updates"] == 3
    for name, value in first.items():
        assert torch.equal(fishleg.fisher[name], value), name
        assert torch.equal(again[name], value), name


class _Meddling(FisherEstimator):
    """Moves BatchNorm statistics (a train-mode forward) and a weight while estimating."""

    requires_data = True

    def diagonal(self, context: FisherContext) -> dict[str, torch.Tensor]:
        x, _ = next(context.iter_batches())
        context.model(x)
        with torch.no_grad():
            next(iter(context.parameters.values())).add_(1.0)
        return {n: torch.ones_like(p) for n, p in context.parameters.items()}


def test_estimate_restores_what_an_estimator_moves(sweep: ModuleType, trained: tuple,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    args, data, dense = trained
    before = _state(dense.net)
    monkeypatch.setattr(sweep, "_estimator", lambda method, args: (_Meddling(), False))
    inputs = sweep.estimate("squisher", dense, data, args)
    assert inputs.fisher is not None
    after = dense.net.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())


@pytest.mark.parametrize("target", ["0.9", "2:4"])
def test_prune_one_shot(sweep: ModuleType, trained: tuple, target: str) -> None:
    args, data, dense = trained
    before = _state(dense.net)
    weights = sweep._pruned_weights(dense.net)
    results = {}
    for method in ("magnitude_layer", "squisher", "fishleg", "fishleg_obs", "lightning_l1"):
        inputs = sweep.estimate(method, dense, data, args)
        net = sweep.prune_one_shot(method, target, dense, inputs, args)
        if method == "lightning_l1" and target == "2:4":
            assert net is None  # no N:M pattern in torch.nn.utils.prune
            continue
        assert net is not dense.net
        pruned = sweep._pruned_weights(net)
        assert sweep._sparsity(net) == pytest.approx(0.9 if target == "0.9" else 0.5, abs=1e-3)
        if target == "2:4":
            for name, weight in pruned.items():
                assert nm_violation(weight, 2, 4) is None, (method, name)
        moved = sum(int(((w != 0) & (w != weights[n])).sum()) for n, w in pruned.items())
        if method == "fishleg_obs":
            assert moved > 0  # the OBS update moves the survivors
        else:
            assert moved == 0  # no weight changes after the prune
        assert 0.0 <= sweep.evaluate(net, data, dense.device) <= 1.0
        results[method] = {n: (w == 0) for n, w in pruned.items()}
    for name, value in _state(dense.net).items():  # every prune worked on a copy
        assert torch.equal(before[name], value), name
    assert any(not torch.equal(results["fishleg"][n], results["magnitude_layer"][n]) for n in weights)


def test_bn_recalibration_changes_only_running_statistics(sweep: ModuleType, trained: tuple) -> None:
    args, data, dense = trained
    net = sweep.prune_one_shot("magnitude_global", "0.9", dense, sweep.PruneInputs(), args)
    before = _state(net)
    sweep._recalibrate_bn(net, sweep._batches(data, dense.device, train=False)(), 1)
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert not net.training


# ------------------------------------------------------------------------------------------ end to end
def test_main_oneshot(sweep: ModuleType, cifar_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "oneshot.csv"
    sweep.main(["--mode", "oneshot", "--data-dir", str(cifar_dir), "--epochs", "1", "--sparsities", "0.8",
                "--methods", "magnitude_layer,lightning_l1,fishleg_obs", "--fishleg-pretrain", "2",
                "--fishleg-heldout", "1", "--output", str(out), *TINY])
    text = capsys.readouterr().out
    assert "mode oneshot" in text and "pretrain_steps=2" in text and "no recalibration" in text
    (line,) = [line for line in text.splitlines() if "fishleg_obs @ 0.8" in line]
    (heldout,) = re.findall(r"heldout_aux (\S+) -> (\S+)\)", line)
    assert all(math.isfinite(float(value)) for value in heldout) and heldout[0] != heldout[1]  # Q learned
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["target"]) for r in rows] == [
        ("dense", "dense"),
        ("magnitude_layer", "0.8"), ("magnitude_layer", "2:4"),
        ("lightning_l1", "0.8"), ("lightning_l1", "2:4"),
        ("fishleg_obs", "0.8"), ("fishleg_obs", "2:4"),
    ]
    by_key = {(r["method"], r["target"]): r for r in rows}
    assert by_key[("lightning_l1", "2:4")]["test_acc"] == ""
    assert float(by_key[("fishleg_obs", "0.8")]["achieved_sparsity"]) == pytest.approx(0.8, abs=1e-3)
    assert float(by_key[("fishleg_obs", "2:4")]["achieved_sparsity"]) == pytest.approx(0.5, abs=1e-3)


def test_main_gradual_fishleg(sweep: ModuleType, cifar_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gradual.md"
    sweep.main(["--data-dir", str(cifar_dir), "--epochs", "2", "--sparsities", "0.9", "--patterns", "",
                "--methods", "fishleg,fishleg_obs", "--fishleg-pretrain", "2", "--fishleg-update-every", "1",
                "--obs-iterations", "3", "--no-dense", "--output", str(out), *TINY])
    text = out.read_text()
    assert "mode gradual" in text and "update_every=1, pretrain_steps=2" in text
    assert "fishleg_obs OBS update: joint, at most 3 CG steps" in text
    lines = text.splitlines()
    for method in ("fishleg", "fishleg_obs"):
        (row,) = [line for line in lines if line.startswith(f"| {method} |")]
        assert "n/a" not in row  # both ran to a test accuracy


def test_main_gradual_prunes_every_few_steps(sweep: ModuleType, cifar_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "steps.csv"
    sweep.main(["--data-dir", str(cifar_dir), "--epochs", "3", "--prune-start", "1", "--prune-end", "2",
                "--prune-every-steps", "2", "--sparsities", "0.9", "--patterns", "", "--methods", "squisher",
                "--no-dense", "--output", str(out), *TINY])
    assert "cubic pruning from epoch 1 (0%) to epoch 2 (target), every 2 steps" in capsys.readouterr().out
    (row,) = list(csv.DictReader(out.open()))
    assert float(row["achieved_sparsity"]) == pytest.approx(0.9, abs=1e-3)


def test_main_gradual_kronecker_uses_adafisherw_settings(sweep: ModuleType, cifar_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "kronecker.md"
    sweep.main(["--data-dir", str(cifar_dir), "--epochs", "2", "--sparsities", "0.9", "--patterns", "",
                "--methods", "kronecker", "--adafisher-lr", "0.5", "--no-dense", "--output", str(out), *TINY])
    text = out.read_text()
    # the given lr, AdaFisherW's own damping and decay
    assert "kronecker: AdaFisherW lr 0.5 damping 0.3 wd 5e-05" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| kronecker |")]
    assert "n/a" not in row
    assert sweep.adafisher_settings(sweep.parse_args(["--adafisher-damping", "0.1"])) == {"damping": 0.1}
