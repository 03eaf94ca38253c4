"""The compression recipes compose, and a tiny order search (2 stages, both orders) writes its report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import lightning_fisher.train  # noqa: F401  (registers the config schema)
from lightning_fisher.compress.hydra_report import OrderReport

CLI = shutil.which("lightning-fisher", path=str(Path(sys.executable).parent)) or "lightning-fisher"


def test_compress_recipe_composes(compose_config):
    cfg = compose_config("recipe=cifar10_resnet18_compress", "stages=[distill,prune,quantize]")
    assert list(cfg.stages) == ["distill", "prune", "quantize"]
    assert cfg.compress.prune._target_ == "lightning_fisher.callbacks.FisherPruning"
    assert cfg.compress.base_epochs == 60 and cfg.optimizer._target_ == "torch.optim.AdamW"
    OmegaConf.to_container(cfg, resolve=True)


def test_order_search_recipe_sweeps_every_ordered_pair(compose_config):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lightning_fisher.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["recipe=cifar10_resnet18_order_search"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    sweep = OverridesParser.create().parse_override(f"stages={cfg.hydra.sweeper.params.stages}")
    pairs = [tuple(v) for v in sweep.sweep_iterator()]
    stages = list(cfg.hydra.callbacks.order_report.stages)
    assert len(pairs) == len(set(pairs)) == len(stages) * (len(stages) - 1) == 20
    assert {s for p in pairs for s in p} == set(stages)
    callback = OrderReport(**{k: v for k, v in cfg.hydra.callbacks.order_report.items() if k != "_target_"})
    assert callback.metric == "accuracy" and callback.run_final


def test_order_search_composes_with_the_submitit_slurm_launcher():
    """The multirun can go to a SLURM cluster: the launcher plugin composes with the recipe (no cluster here)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lightning_fisher.conf", version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["recipe=cifar10_resnet18_order_search", "hydra/launcher=submitit_slurm",
                       "hydra.launcher.gpus_per_node=1", "hydra.callbacks.order_report.run_final=false"],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert cfg.hydra.launcher.gpus_per_node == 1 and not cfg.hydra.callbacks.order_report.run_final
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"


def test_order_report_rejects_bad_arguments():
    with pytest.raises(ValueError, match="metric='speed'"):
        OrderReport(metric="speed")
    with pytest.raises(ValueError, match="accuracy_floor=None: metric='compression' needs"):
        OrderReport(metric="compression")
    with pytest.raises(ValueError, match="compression_key='size'"):
        OrderReport(compression_key="size")


@pytest.mark.slow  # 87 s on the 2-core CPU (three processes' worth of Lightning start-up, two jobs)
def test_tiny_order_search_writes_the_report(tmp_path):
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run(
        [
            CLI, "recipe=cifar10_resnet18_order_search", "data=digits", "++data.max_per_class=10", "++model.width=4",
            "hydra.sweeper.params.stages='[prune,quantize],[quantize,prune]'",
            "hydra.callbacks.order_report.stages=[prune,quantize]",
            "compress.base_epochs=1", "compress.stage_epochs=1", "compress.prune.start_epoch=0",
            "compress.prune.schedule=one_shot", "+compress.prune.criterion=magnitude",
            "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1", "++trainer.enable_model_summary=false",
            "logger=csv", "callbacks.rich_progress_bar=null", f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(json.loads(p.read_text())["stages"] for p in sweep_dir.glob("[0-9]*/compression.json"))
    assert runs == [["prune", "quantize"], ["quantize", "prune"]]
    report = json.loads((sweep_dir / "order_report.json").read_text())
    assert len(report["pairs"]) == 1 and sorted(report["order"]) == ["prune", "quantize"]
    # with two stages the chosen chain is the winning pair's run: run_final has nothing left to train
    assert report["final"]["stages"] == report["order"] and not (sweep_dir / "final").exists()
    text = (sweep_dir / "order_report.md").read_text()
    assert "## Pairwise table" in text and "## Chosen order" in text and "| prune / quantize |" in text
