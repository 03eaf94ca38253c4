"""Shared fixtures: composed Hydra configs shrunk for CPU tests, with outputs under tmp_path."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LIGHTNING_FISHER_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# Small enough for a CPU test, same code path as a real run.
FAST_OVERRIDES = [
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=2",
    "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1",
    "++trainer.enable_model_summary=false",
    "++model.width=4",
    "logger=csv",
    "callbacks.rich_progress_bar=null",
]


@pytest.fixture
def compose_config(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """``compose_config(*overrides)`` -> the primary config as the CLI would build it, shrunk for tests."""

    def _compose(*overrides: str, fast: bool = True) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="lightning_fisher.conf", version_base="1.3"):
            cfg = compose(
                config_name="config",
                overrides=[*(FAST_OVERRIDES if fast else []), *overrides],
                return_hydra_config=True,
            )
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.data_dir = str(tmp_path / "data")
            del cfg.hydra
        return cfg

    yield _compose
    GlobalHydra.instance().clear()
