"""Benchmark: AdaFisher vs Adam vs SGD with momentum on CIFAR-10 (a CPU proxy of the ResNet18 comparison).

Trains the same ResNet18 (CIFAR stem; reduced width on CPU) from the same initialisation, on the same
shuffled and augmented batches, with each optimizer for the same number of epochs, a cosine schedule
over those epochs, and each optimizer's settings from this project's configs:

* AdaFisher: its defaults (lr 1, λ 0.3, γ 0.8, factors refreshed every step) and weight decay 5e-4
  (``recipes/cifar10_resnet18_adafisher_dense.yaml``); the paper's lr 1e-3 and λ 1e-3 as the variant
  ``adafisher@lr=0.001@damping=0.001`` (see ``AdaFisher``'s docstring for why they differ);
* Adam: lr 1e-3 (``conf/optimizer/adam.yaml``);
* SGD: lr 0.1, Nesterov momentum 0.9, weight decay 5e-4 (``conf/optimizer/sgd.yaml``).

It prints, with the machine it ran on, a table of test accuracy at equal epochs and at equal
wall-clock (the accuracy each optimizer had reached, at its last evaluated epoch, within the training
time the fastest one needed for all epochs), final training loss, and the median time of a training
step (forward, backward, optimizer step), each also as a ratio to SGD. Accuracy is measured on
``--test-size`` evenly spaced images of the test split (every class equally) after every epoch.

The data are the JPEG copy of CIFAR-10 in ``../shared/data`` (about 2-3 points below the original
PNG data for the same model; compare methods with each other on it). The archive is extracted into a
temporary directory unless ``--data-dir`` points at an extracted (and then cached) copy.

    python benchmarks/optimizers.py                                    # CPU proxy, about 10 minutes
    python benchmarks/optimizers.py --optimizers "adafisher@lr=0.01@damping=0.01,adam"   # variants
    python benchmarks/optimizers.py --width 64 --epochs 200 --max-per-class 0 --test-size 10000 --device cuda

The full-size comparison (width 64, 50,000 images, 200 epochs; the paper reports 96.25% for AdaFisher
vs 94.85% for Adam) needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_fisher.data import CIFAR10DataModule
from lightning_fisher.models import ResNet18
from lightning_fisher.optim import AdaFisher

__all__ = ["OPTIMIZERS", "Result", "main", "parse_args", "parse_variant", "train_one"]

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adafisher": lambda model, **kw: AdaFisher(model, **{"weight_decay": 5e-4, **kw}),
    "adam": lambda model, **kw: torch.optim.Adam(model.parameters(), **{"lr": 1e-3, **kw}),
    "sgd": lambda model, **kw: torch.optim.SGD(
        model.parameters(), **{"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, **kw}
    ),
}


def parse_variant(spec: str) -> tuple[str, dict[str, float | int]]:
    """``"adafisher@lr=0.01@damping=0.01"`` -> ``("adafisher", {"lr": 0.01, "damping": 0.01})``.

    Raises:
        ValueError: an unknown optimizer, or an override that is not ``name=number``.
    """
    name, *overrides = spec.strip().split("@")
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizers: unknown optimizer {name!r} in {spec!r}; choose from {list(OPTIMIZERS)}")
    settings = {}
    for override in overrides:
        key, _, value = override.partition("=")  # no "=": value is "", not a number
        try:
            number = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            number = None
        if not key.strip() or number is None:
            raise ValueError(f"--optimizers: {override!r} in {spec!r} is not name=number (e.g. lr=0.01)")
        settings[key.strip()] = number
    return name, settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="an extracted CIFAR-10 (default: extract --archive into a temporary directory)")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="the CIFAR-10 JPEG archive")
    parser.add_argument("--width", type=int, default=8, help="ResNet18 width (64 = the full 11.17M-parameter model)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--max-per-class", type=int, default=500, help="training images per class (0 = all 5,000)")
    parser.add_argument("--test-size", type=int, default=2000, help="test images evaluated after every epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--optimizers", default="adafisher,adam,sgd",
                        help=f"comma-separated list from {list(OPTIMIZERS)}, each optionally with @name=number "
                             "overrides of its settings (e.g. adafisher@lr=0.01@damping=0.01)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


@dataclass
class Result:
    """One optimizer's run: accuracy and cumulative training seconds after every epoch."""

    name: str
    accuracy: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    final_loss: float = float("nan")

    def accuracy_within(self, seconds: float) -> tuple[float, int]:
        """Accuracy at the last epoch finished within ``seconds`` of training (0 epochs: nan)."""
        done = [i for i, t in enumerate(self.train_seconds) if t <= seconds * (1 + 1e-9)]
        return (self.accuracy[done[-1]], done[-1] + 1) if done else (float("nan"), 0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _evaluate(model: nn.Module, data: CIFAR10DataModule, test_size: int, device: torch.device) -> float:
    """Accuracy on ``test_size`` evenly spaced test images (the folder layout sorts them by class)."""
    test_set = data.test_set
    assert test_set is not None
    chosen = torch.linspace(0, len(test_set) - 1, min(test_size, len(test_set))).long()
    model.eval()
    correct = 0
    for batch in chosen.split(500):
        images, labels = test_set.__getitems__(batch.tolist())
        inputs = data.transform_batch(images.to(device), train=False)
        correct += int((model(inputs).argmax(1) == labels.to(device)).sum())
    model.train()
    return correct / len(chosen)


def train_one(name: str, data: CIFAR10DataModule, args: argparse.Namespace, device: torch.device) -> Result:
    """Train a fresh ResNet18 (seeded) with optimizer ``name``; evaluate after every epoch."""
    torch.manual_seed(args.seed)
    model = ResNet18(num_classes=10, width=args.width).to(device)
    base, settings = parse_variant(name)
    optimizer = OPTIMIZERS[base](model, **settings)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    data.augmenter.reseed(args.seed)  # the same augmentation sequence for every optimizer
    result = Result(name)
    elapsed = 0.0
    for _ in range(args.epochs):
        losses = []
        for images, labels in data.train_dataloader():  # the loader's shuffle is seeded: same order
            images, labels = images.to(device), labels.to(device)
            _sync(device)
            start = time.perf_counter()
            inputs = data.transform_batch(images, train=True)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
            optimizer.step()
            _sync(device)
            step = time.perf_counter() - start
            elapsed += step
            result.step_seconds.append(step)
            losses.append(loss.item())
        schedule.step()
        result.train_seconds.append(elapsed)
        result.accuracy.append(_evaluate(model, data, args.test_size, device))
        result.final_loss = statistics.fmean(losses)
        print(f"  {name}: epoch {len(result.accuracy)}/{args.epochs} loss {result.final_loss:.3f} "
              f"test acc {result.accuracy[-1]:.4f} ({elapsed:.0f} s training)", flush=True)
    return result


def _data_dir(args: argparse.Namespace, scratch: Path) -> Path:
    if args.data_dir is not None:
        return args.data_dir
    if not args.archive.is_file():
        raise SystemExit(f"--archive={args.archive}: not found; give --data-dir or the path of cifar10-jpeg.tar.gz")
    start = time.perf_counter()
    with tarfile.open(args.archive) as archive:
        archive.extractall(scratch, filter="data")
    print(f"extracted {args.archive.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return scratch


def _median_step(result: Result) -> float:
    steps = result.step_seconds[3:] or result.step_seconds  # the first steps include warm-up
    return statistics.median(steps)


def _print_table(results: list[Result]) -> None:
    budget = min(r.train_seconds[-1] for r in results)
    base = next((r for r in results if r.name == "sgd"), results[0])
    base_acc, base_step = base.accuracy[-1], _median_step(base)
    base_budget_acc = base.accuracy_within(budget)[0]
    print()
    print(f"equal wall-clock budget: {budget:.0f} s of training (what the fastest run needed for all its epochs)")
    print(f"| optimizer | test acc, equal epochs | ratio to {base.name} | test acc, equal wall-clock (epochs) "
          f"| ratio to {base.name} | final train loss | s / step | step time ratio to {base.name} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        acc_budget, epochs_budget = r.accuracy_within(budget)
        step = _median_step(r)
        print(f"| {r.name} | {r.accuracy[-1]:.4f} | {r.accuracy[-1] / base_acc:.3f} | {acc_budget:.4f} "
              f"({epochs_budget}) | {acc_budget / base_budget_acc:.3f} | {r.final_loss:.3f} | {step:.3f} "
              f"| {step / base_step:.2f} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    chosen = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    if not chosen:
        raise SystemExit(f"--optimizers={args.optimizers!r}: name at least one of {list(OPTIMIZERS)}")
    try:
        for name in chosen:
            parse_variant(name)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} | torch {torch.__version__} | "
          f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"load average before: {_load()} (other processes on the machine inflate CPU timings)")
    with tempfile.TemporaryDirectory(prefix="cifar10-") as scratch:
        data = CIFAR10DataModule(
            data_dir=_data_dir(args, Path(scratch)), download=False, batch_size=args.batch_size,
            eval_batch_size=500, seed=args.seed, max_per_class=args.max_per_class or None,
        )
        start = time.perf_counter()
        data.prepare_data()
        data.setup("fit")
        print(f"decoded CIFAR-10 in {time.perf_counter() - start:.0f} s: training on {len(data.train_set)} images, "
              f"testing on {min(args.test_size, len(data.test_set))}", flush=True)
        model_size = sum(p.numel() for p in ResNet18(num_classes=10, width=args.width).parameters())
        print(f"model: ResNet18(width={args.width}), {model_size:,} parameters; {args.epochs} epochs of "
              f"{len(data.train_dataloader())} steps, batch {args.batch_size}, cosine schedule; seed {args.seed}")
        results = [train_one(name, data, args, device) for name in chosen]
    print(f"load average after: {_load()}")
    _print_table(results)


def _load() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:  # not available on every platform
        return "n/a"


if __name__ == "__main__":
    main()
