"""benchmarks/fishleg_fit.py: its arguments, the dense-model checkpoint, and a tiny end-to-end run."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

TINY = ["--width", "4", "--max-per-class", "0", "--batch-size", "20", "--threads", "1", "--epochs", "1"]


pytestmark = pytest.mark.usefixtures("restore_lightning_log_levels")


@pytest.fixture(scope="module")
def fit(load_benchmark) -> Iterator[ModuleType]:
    with load_benchmark("fishleg_fit", forget=("sparsity_sweep",)) as module:
        yield module


def test_flags(fit: ModuleType) -> None:
    args, budget = fit.parse_args(["--damping", "4e-5", "--runs", "ggn:1e-4,finite_difference:1e-3", "--at", "2,5",
                                   "--width", "8", "--seed", "3"])
    assert args.damping == 4e-5 and args.runs == [("ggn", 1e-4), ("finite_difference", 1e-3)] and args.at == [2, 5]
    assert (budget.width, budget.seed, budget.mode) == (8, 3, "oneshot")


@pytest.mark.parametrize(("argv", "message"), [
    (["--damping", "0"], "--damping (0.0): must be a finite number > 0"),
    (["--runs", "exact:1e-3"], "the product 'exact' is not one of"),
    (["--runs", "ggn:fast"], "expected FVP:LR with LR a number"),
    (["--runs", "ggn:-1"], "the lr -1 must be a finite number > 0"),
    (["--at", "5,5"], "--at (5,5): must be increasing counts >= 1"),
    (["--at", "0,3"], "must be increasing counts >= 1"),
    (["--at", "two"], "--at (two): expected comma-separated integers"),
    (["--heldout-batches", "0"], "--heldout-batches (0): must be >= 1"),
    (["--width", "four"], "--width"),  # the sweep's own parser checks the rest
])
def test_bad_arguments(fit: ModuleType, argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        fit.parse_args(argv)
    assert message in capsys.readouterr().err


def test_main_prints_a_curve_per_run_and_reuses_the_dense_checkpoint(
    fit: ModuleType, cifar_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = tmp_path / "dense.pt"
    argv = ["--data-dir", str(cifar_dir), "--damping", "0.1", "--runs", "ggn:1e-2,rank1:1e-2", "--at", "1,3",
            "--heldout-batches", "1", "--dense-checkpoint", str(checkpoint), *TINY]
    fit.main(argv)
    first = capsys.readouterr().out
    assert checkpoint.exists()
    rows = [line for line in first.splitlines() if line.startswith(("| ggn", "| rank1"))]
    assert len(rows) == 2
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        curve = [float(value) for value in cells[2:5]]  # Q₀, after 1, after 3
        assert all(math.isfinite(value) for value in curve) and curve[0] != curve[2]  # Q learned
    # both runs start from the same Q₀ on the same held-out draws
    assert rows[0].split("|")[3] == rows[1].split("|")[3]
    (accuracy,) = re.findall(r"test accuracy (\S+);", first)
    fit.main(argv)  # loads the checkpoint: same dense model, same curves
    second = capsys.readouterr().out
    assert re.findall(r"test accuracy (\S+);", second) == [accuracy] and f"loaded from {checkpoint}" in second
    assert "trained in" in first
    again = [line for line in second.splitlines() if line.startswith(("| ggn", "| rank1"))]
    assert [row.split("|")[1:6] for row in again] == [row.split("|")[1:6] for row in rows]  # all but the timing
    with pytest.raises(SystemExit, match="trained with"):
        fit.main([*argv[:-len(TINY)], *TINY[:-2], "--epochs", "2"])
