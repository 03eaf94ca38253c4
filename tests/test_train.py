"""The training entry point, through Hydra's compose API and through the console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_fisher.train import train

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = shutil.which("lightning-fisher", path=str(Path(sys.executable).parent)) or "lightning-fisher"


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_fast_dev_run_through_compose(compose_config, tmp_path, capsys):
    cfg = compose_config("++trainer.fast_dev_run=true")
    metrics, objects = train(cfg)
    assert {"test/acc", "test/loss", "val/acc"} <= set(metrics)
    assert objects["trainer"].state.finished
    assert "final metrics" in capsys.readouterr().out


def test_run_writes_csv_metrics_and_checkpoint(compose_config, tmp_path, capsys):
    cfg = compose_config("trainer.max_epochs=2")
    metrics, objects = train(cfg)
    csv_files = list((tmp_path / "run" / "csv").rglob("metrics.csv"))
    assert csv_files and "val/acc" in csv_files[0].read_text().splitlines()[0]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    out = capsys.readouterr().out
    assert "last.ckpt" in out and "test/acc" in out


def test_wandb_offline_is_the_default_logger(compose_config, tmp_path, capsys):
    cfg = compose_config("logger=default", "++trainer.fast_dev_run=true")
    train(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert f"wandb sync {runs[0]}" in capsys.readouterr().out.replace("\n", "")


def test_cli_help_and_cfg_job(tmp_path):
    help_text = _run_cli("--help", cwd=tmp_path)
    assert help_text.returncode == 0 and "recipe: " in help_text.stdout and "quickstart" in help_text.stdout
    job = _run_cli("recipe=cifar10_resnet18_dense", "--cfg", "job", cwd=tmp_path)
    assert job.returncode == 0 and "max_epochs: 200" in job.stdout


def test_cli_rejects_bad_override(tmp_path):
    result = _run_cli("recipe=quickstart", "trainer.max_epoch=3", cwd=tmp_path)
    assert result.returncode != 0 and "max_epoch" in result.stderr


def test_cli_sweep_runs_every_job(tmp_path):
    result = _run_cli(
        "-m", "recipe=quickstart", "model.width=2,4", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "logger=csv",
        "callbacks.rich_progress_bar=null", "hydra.sweep.dir=" + str(tmp_path / "sweep"), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]
    assert len(list((tmp_path / "sweep").rglob("metrics.csv"))) == 2


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    result = _run_cli("recipe=quickstart", "hydra.run.dir=" + str(tmp_path / "qs"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/acc" in result.stdout


def test_wheel_ships_configs_and_recipes(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO_ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    import zipfile

    (wheel,) = tmp_path.glob("lightning_fisher-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in (REPO_ROOT / "recipes").glob("*.yaml"):
        assert f"lightning_fisher/conf/recipe/{recipe.name}" in names
    for config in (REPO_ROOT / "conf").glob("*/*.yaml"):
        assert f"lightning_fisher/conf/{config.relative_to(REPO_ROOT / 'conf')}" in names
