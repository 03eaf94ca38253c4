"""The schema of the primary config: a typo in a top-level key is an error, not a silent new key.

Group contents (model, data, optimizer, ...) are checked when they are built: every entry has a
``_target_`` and ``hydra.utils.instantiate`` rejects keyword arguments its target does not take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

__all__ = ["TrainConfig", "register_configs"]


@dataclass
class TrainConfig:
    """Top-level keys of ``conf/config.yaml`` (see the files of each group for their contents)."""

    paths: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    module: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = None
    fisher: Any = None
    pruning: Any = None
    # compression pipeline (lightning_fisher.compress.pipeline): the stages in order, and their settings
    stages: Any = None
    compress: Any = None
    task_name: str = "train"
    seed: int = 0
    ckpt_path: Any = None
    init_ckpt: Any = None
    test: bool = True
    optimized_metric: Any = "val/acc"


def register_configs() -> None:
    """Make the schema available to the defaults list as ``train_schema``."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
