"""Every config option builds, every recipe composes, and mistakes in configs are errors."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from lightning_fisher.callbacks import FisherPruning
from lightning_fisher.train import build

CONF = Path(__file__).resolve().parents[1] / "conf"
RECIPES = sorted(p.stem for p in (CONF.parent / "recipes").glob("*.yaml"))


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes(compose_config, recipe):
    cfg = compose_config(f"recipe={recipe}")
    assert cfg.task_name == recipe
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("option", _group_options("optimizer"))
def test_optimizer_options_build(compose_config, option):
    import torch

    factory = instantiate(compose_config(f"optimizer={option}").optimizer)
    kwargs = {"model": torch.nn.Linear(2, 2)} if "model" in inspect.signature(factory).parameters else {}
    assert isinstance(factory([torch.nn.Parameter(torch.zeros(2))], **kwargs), torch.optim.Optimizer)


@pytest.mark.parametrize("option", _group_options("logger"))
def test_logger_options_always_include_csv(compose_config, option):
    cfg = compose_config(f"logger={option}")
    assert "csv" in cfg.logger
    if option in ("default", "wandb"):
        assert cfg.logger.wandb.offline is (option == "default")


@pytest.mark.parametrize("option", ["cpu", "default"])
def test_trainer_options_build_on_cpu(compose_config, option):
    assert build(compose_config(f"trainer={option}", "++trainer.accelerator=cpu"))["trainer"].max_epochs == 1


@pytest.mark.parametrize("option", ["gpu", "ddp"])
def test_gpu_trainer_options_compose(compose_config, option):
    cfg = compose_config(f"trainer={option}")
    assert cfg.trainer.accelerator == "gpu"


def test_scheduler_none_builds_no_scheduler(compose_config):
    objects = build(compose_config("scheduler=none"))
    assert objects["model"].scheduler_factory is None


def test_misspelt_override_is_rejected(compose_config):
    with pytest.raises(ConfigCompositionException, match="widht"):
        compose_config("model.widht=8")


def test_recipe_with_an_unknown_top_level_key_is_rejected(compose_config, tmp_path):
    (tmp_path / "extra" / "recipe").mkdir(parents=True)
    (tmp_path / "extra" / "recipe" / "typo.yaml").write_text("# @package _global_\ntrainr:\n  max_epochs: 3\n")
    with pytest.raises(ConfigCompositionException, match="trainr"):
        compose_config("recipe=typo", f"hydra.searchpath=[file://{tmp_path / 'extra'}]")


def test_misspelt_constructor_argument_is_rejected(compose_config):
    with pytest.raises(Exception, match="batch_sise"):
        build(compose_config("+data.batch_sise=8"))


def test_a_pruning_argument_the_yaml_leaves_out_is_set_with_a_plus(compose_config):
    callbacks = build(compose_config("recipe=quickstart", "+pruning.fisher_damping=1.0"))["callbacks"]
    (pruning,) = [cb for cb in callbacks if isinstance(cb, FisherPruning)]
    assert pruning.pruner.fisher_damping == 1.0



def test_a_recipe_prunes_in_optimizer_steps_with_unit_step(compose_config):
    # the README's example: about three prunes an epoch over the recipe's epochs 10 to 40 (391 steps each)
    cfg = compose_config(
        "recipe=cifar10_resnet18_gradual95", "+pruning.unit=step", "pruning.start_epoch=3910",
        "pruning.end_epoch=15640", "+pruning.frequency=130",
    )
    (pruning,) = [cb for cb in build(cfg)["callbacks"] if isinstance(cb, FisherPruning)]
    positions = list(pruning.pruner.schedule.positions())
    assert pruning.unit == "step" and positions[0] == 3910 and positions[-1] == 15640
    gaps = [b - a for a, b in zip(positions, positions[1:])]
    assert gaps == [130] * 90 + [30]  # 30 × 391 = 90 × 130 + 30: the end position is always a prune

def test_callback_entry_without_target_is_rejected(compose_config):
    with pytest.raises(ValueError, match="callbacks.model_chekpoint"):
        build(compose_config("+callbacks.model_chekpoint.save_last=true"))


def _targets_with_keys():
    for path in sorted(CONF.glob("*/*.yaml")):
        content = yaml.safe_load(path.read_text()) or {}
        entries = [content] if "_target_" in content else [v for v in content.values() if isinstance(v, dict)]
        for entry in entries:
            if "_target_" in entry:
                yield path.relative_to(CONF), entry


@pytest.mark.parametrize(("path", "entry"), list(_targets_with_keys()), ids=lambda v: str(v) if isinstance(v, Path) else "")
def test_yaml_keys_do_not_repeat_constructor_defaults(path, entry):
    target = get_method(entry["_target_"])
    parameters = inspect.signature(target).parameters
    for key, value in entry.items():
        if key.startswith("_"):
            continue
        assert key in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()), f"{path}: {key}"
        if key in parameters and not isinstance(value, str | dict | list):
            assert parameters[key].default != value, f"{path}: {key}={value!r} repeats the default of {target.__name__}"
