"""Hydra entry point: ``lightning-fisher recipe=<name> key=value ...``.

``train(cfg)`` is a plain function (tests call it with a composed config); ``main()`` is the thin
Hydra wrapper behind the console script. Configs ship inside the package as ``lightning_fisher.conf``
(the repository's ``conf/`` and ``recipes/``), so the CLI works from any kind of install.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from lightning_fisher.config import register_configs
from lightning_fisher.summary import print_summary
from lightning_fisher.weights import load_weights

__all__ = ["train", "main", "build"]

log = logging.getLogger(__name__)

CONFIG_PACKAGE = "pkg://lightning_fisher.conf"

register_configs()


def _instantiate_entries(section: DictConfig | None, section_name: str) -> list[Any]:
    """Build every entry of a ``{name: {_target_: ...}}`` section; an entry without a target is an error."""
    if not section:
        return []
    objects = []
    for name, entry in section.items():
        if entry is None:  # an entry switched off with `callbacks.<name>=null`
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ValueError(
                f"{section_name}.{name}={OmegaConf.to_yaml(entry).strip() if isinstance(entry, DictConfig) else entry!r}: "
                f"every entry of `{section_name}` needs a `_target_` (a misspelt name adds a new, empty entry)"
            )
        objects.append(instantiate(entry))
    return objects


def _build_pruning_callbacks(cfg: DictConfig) -> list[L.Callback]:
    if not cfg.get("pruning"):
        return []
    criterion = cfg.pruning.get("criterion", "fisher")
    estimator = None
    if cfg.get("fisher"):
        if criterion == "fisher":
            estimator = instantiate(cfg.fisher)
        else:
            log.info("pruning.criterion=%s scores without a Fisher estimate: the fisher group is not used", criterion)
    return [instantiate(cfg.pruning, estimator=estimator)]


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate the data module, model, callbacks, loggers and trainer described by ``cfg``."""
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.num_channels)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = instantiate(
        cfg.module, net=net, num_classes=datamodule.num_classes, optimizer=instantiate(cfg.optimizer), scheduler=scheduler
    )
    callbacks = _instantiate_entries(cfg.get("callbacks"), "callbacks") + _build_pruning_callbacks(cfg)
    loggers: list[Logger] = _instantiate_entries(cfg.get("logger"), "logger")
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return {"datamodule": datamodule, "model": module, "callbacks": callbacks, "loggers": loggers, "trainer": trainer}


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train (and test) as ``cfg`` says; returns the final metrics and the objects that were built.

    With ``cfg.stages`` set (e.g. ``stages=[distill,prune,quantize]``) the compression pipeline runs
    instead: :func:`lightning_fisher.compress.pipeline.train_stages`.
    """
    if cfg.get("stages"):
        from lightning_fisher.compress.pipeline import train_stages

        return train_stages(cfg)
    L.seed_everything(cfg.seed, workers=True)
    objects = build(cfg)
    if cfg.get("init_ckpt"):
        # before ckpt_path: resuming a warm-started run (same command plus ckpt_path) restores its own state
        load_weights(objects["model"], cfg.init_ckpt)
    trainer: L.Trainer = objects["trainer"]
    loggers: list[Logger] = objects["loggers"]
    try:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        trainer.fit(objects["model"], datamodule=objects["datamodule"], ckpt_path=cfg.get("ckpt_path"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        if cfg.get("test") and not trainer.interrupted:
            # The weights in memory at the end of fit are tested: for pruning runs the best
            # validation checkpoint may predate the final sparsity.
            trainer.test(objects["model"], datamodule=objects["datamodule"])
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
        if trainer.is_global_zero:
            print_summary(metrics, checkpoint_path=_checkpoint_path(trainer), wandb_dir=_wandb_run_dir(loggers))
    finally:
        _finish_wandb(loggers)
    return metrics, objects


def _checkpoint_path(trainer: L.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    return getattr(callback, "last_model_path", None) or getattr(callback, "best_model_path", None) or None


def _wandb_run_dir(loggers: list[Logger]) -> str | None:
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run_dir = getattr(logger.experiment, "dir", None)
            if run_dir:
                return str(Path(run_dir).parent)
    return None


def _finish_wandb(loggers: list[Logger]) -> None:
    # Each run of a sweep must close its W&B run, or the next job of the sweep would log into it.
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


@hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Console script ``lightning-fisher``: returns ``optimized_metric`` for Hydra sweepers."""
    metrics, _ = train(cfg)
    metric_name = cfg.get("optimized_metric")
    if not metric_name:
        return None
    if metric_name not in metrics:
        raise KeyError(f"optimized_metric={metric_name!r}: not among the run's metrics {sorted(metrics)}")
    return metrics[metric_name]


if __name__ == "__main__":
    main()
