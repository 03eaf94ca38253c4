"""Benchmark 1, part 1: the cost of a diagonal Fisher for the CIFAR ResNet18, by estimator.

Times ``Squisher`` (reads Adam's state), ``EmpiricalFisher`` and ``MonteCarloFisher`` (per-sample
gradients over ``--num-samples`` samples) on the same model in one run and prints the seconds and the
ratio to the Squisher, with the machine it ran on. The Fisher is taken for every Conv2d/Linear weight
(what pruning scores). Inputs are random 32×32 images with random labels: the cost of a per-sample
gradient does not depend on the pixel values, so no data set is needed. Adam's state comes from a few
optimizer steps on such batches.

    python benchmarks/fisher_cost.py                      # full size: width 64 (11.17M params), 1,024 samples
    python benchmarks/fisher_cost.py --width 16 --num-samples 64   # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_fisher.fisher import EmpiricalFisher, FisherContext, FisherEstimator, MonteCarloFisher, Squisher
from lightning_fisher.models import ResNet18
from lightning_fisher.pruning.report import prunable_parameter_names

__all__ = ["main", "measure", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=1024, help="samples for the per-sample estimators")
    parser.add_argument("--width", type=int, default=64, help="ResNet18 width (64 = the paper's 11.17M parameters)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size of the data and the Adam steps")
    parser.add_argument("--adam-steps", type=int, default=3, help="optimizer steps that create Adam's state")
    parser.add_argument("--chunk-size", type=int, default=32, help="rows per vmapped call (vmap backend)")
    parser.add_argument("--backend", default="auto", choices=["auto", "vmap", "loop"])
    parser.add_argument("--estimators", default="squisher,empirical,monte_carlo",
                        help="comma-separated subset of squisher,empirical,monte_carlo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _random_batches(num_samples: int, batch_size: int, device: torch.device, seed: int) -> Callable[[], Iterator]:
    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, num_samples, batch_size):
            size = min(batch_size, num_samples - start)
            x = torch.randn(size, 3, 32, 32, generator=generator)
            y = torch.randint(0, 10, (size,), generator=generator)
            yield x.to(device), y.to(device)

    return batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(estimator: FisherEstimator, context: FisherContext, repeats: int = 1) -> float:
    """Median wall-clock seconds of ``estimator.diagonal(context)`` over ``repeats`` runs."""
    device = next(iter(context.parameters.values())).device
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        estimator.diagonal(context)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = ResNet18(num_classes=10, width=args.width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = _random_batches(args.adam_steps * args.batch_size, args.batch_size, device, args.seed + 1)
    model.train()
    for x, y in train():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    named = dict(model.named_parameters())
    params = {name: named[name] for name in prunable_parameter_names(model)}
    context = FisherContext(
        model, params, optimizer,
        batches=_random_batches(args.num_samples, args.batch_size, device, args.seed + 2),
        loss_fn=F.cross_entropy, batch_size=args.batch_size,
    )
    estimators: dict[str, tuple[FisherEstimator, int]] = {
        "squisher": (Squisher(), 5),
        "empirical": (EmpiricalFisher(num_samples=args.num_samples, chunk_size=args.chunk_size,
                                      backend=args.backend), 1),
        "monte_carlo": (MonteCarloFisher(num_samples=args.num_samples, chunk_size=args.chunk_size,
                                         backend=args.backend), 1),
    }
    chosen = [name.strip() for name in args.estimators.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(estimators))
    if unknown:
        raise SystemExit(f"--estimators: unknown {unknown}; choose from {sorted(estimators)}")

    print(f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} | torch {torch.__version__} | "
          f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"load average before: {_load()} (other processes on the machine inflate CPU timings)")
    print(f"model: ResNet18(width={args.width}) {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"Fisher over {sum(p.numel() for p in params.values()):,} Conv2d/Linear weights in {len(params)} tensors")
    print(f"data: random 32x32 inputs; {args.num_samples} samples in batches of {args.batch_size}; "
          f"chunk_size={args.chunk_size}, backend={args.backend}; Adam state from {args.adam_steps} steps")

    rows = []
    for name in chosen:
        estimator, repeats = estimators[name]
        seconds = measure(estimator, context, repeats)
        rows.append((name, repeat_label(repeats), seconds))
        print(f"  measured {name}: {seconds:.4f} s", flush=True)
    base = next((seconds for name, _, seconds in rows if name == "squisher"), None)
    print(f"load average after: {_load()}")
    print()
    print("| estimator | samples | seconds | ratio to squisher |")
    print("|---|---:|---:|---:|")
    for name, label, seconds in rows:
        samples = "0 (optimizer state)" if name == "squisher" else str(args.num_samples)
        ratio = f"{seconds / base:,.0f}x" if base else "n/a"
        print(f"| {name}{label} | {samples} | {seconds:.4f} | {ratio} |")


def _load() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:  # not available on every platform
        return "n/a"


def repeat_label(repeats: int) -> str:
    return f" (median of {repeats})" if repeats > 1 else ""


if __name__ == "__main__":
    main()
