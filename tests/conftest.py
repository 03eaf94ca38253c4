"""Shared fixtures: composed Hydra configs shrunk for CPU tests, with outputs under tmp_path."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

from lightning_fisher.data.cifar10 import CIFAR10_CLASSES

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LIGHTNING_FISHER_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@contextlib.contextmanager
def benchmark_script(name: str, alias: str | None = None, threads: int | None = None,
                     forget: tuple[str, ...] = ()) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` imported as the module ``alias`` (default ``benchmark_<name>``) for the
    block: registered in ``sys.modules`` while it runs (dataclasses look their module up while the class is
    built), dropped afterwards with the modules in ``forget`` (ones the script imports by name), and
    torch's thread count (set to ``threads`` for the block when given) restored."""
    alias = alias or f"benchmark_{name}"
    spec = importlib.util.spec_from_file_location(alias, REPO_ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for key in (alias, *forget):
            sys.modules.pop(key, None)
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def load_benchmark() -> Callable[..., contextlib.AbstractContextManager[ModuleType]]:
    """:func:`benchmark_script`, for the tests' module-scoped fixtures:
    ``with load_benchmark("sparsity_sweep", threads=1) as sweep: yield sweep``."""
    return benchmark_script


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


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test on one torch thread: tiny models only pay for a second thread in contention, and on a
    2-core CI machine a second thread fights the other jobs (use with ``pytest.mark.usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trained_mlp() -> Callable[..., tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """``trained_mlp(seed=0, noisy_labels=False)`` -> (model, x, y): an 8 → 16 (tanh) → 3 MLP trained by
    Adam for 300 full-batch steps on 256 Gaussian inputs labelled by a random linear teacher (argmax, or
    labels sampled from its softmax with ``noisy_labels``): a small trained model whose exact Fisher can
    be formed, for the OBS tests."""

    def _train(seed: int = 0, noisy_labels: bool = False) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        x = torch.randn(256, 8)
        teacher = x[:, :3] @ torch.randn(3, 3)
        y = torch.distributions.Categorical(logits=teacher).sample() if noisy_labels else teacher.argmax(1)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(300):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        return model, x, y

    return _train


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cifar10/{train,test}/<class>/N.jpg`` as in the extracted archive (4 training and 2 test images per
    class): noisy images, a colour per class, for the benchmark scripts' end-to-end tests."""
    root = tmp_path_factory.mktemp("sweep_data")
    generator = torch.Generator().manual_seed(0)
    for label, name in enumerate(CIFAR10_CLASSES):
        for split, count in (("train", 4), ("test", 2)):
            folder = root / "cifar10" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                base = torch.tensor([20 * label + 10, 128, 255 - 20 * label]).view(1, 1, 3)
                pixels = (base + torch.randint(-30, 31, (32, 32, 3), generator=generator)).clamp(0, 255)
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i}.jpg")
    return root


@pytest.fixture
def restore_lightning_log_levels() -> Iterator[None]:
    """The benchmark scripts' main() quietens Lightning's loggers, as a script may; later tests read their INFO lines."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)
