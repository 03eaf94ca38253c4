"""Benchmark 1, part 2: the overhead of ``FisherPruning`` + ``SparsityMonitor`` on a training step.

Trains the same ResNet18 (CIFAR stem) with AdamW on the same random batches, for the same epochs and
steps, twice per repeat in one process, alternating: ``plain`` (no callbacks) and ``pruning``
(``FisherPruning(estimator=Squisher(), target_sparsity=--sparsity, scope="global")`` on a gradual
schedule + ``SparsityMonitor``). The issue's goal is an overhead under 2%.

What is timed (wall clock, CUDA synchronised on a GPU):

* **step**: from one ``on_train_batch_start`` to the next within an epoch (a timing callback placed
  first): forward, backward, the optimizer step, FisherPruning's mask re-application after each
  ``optimizer.step()``, data loading and every per-batch hook. Steps in epochs where a prune happens
  are left out of this figure (and the first ``--warmup`` steps of every run).
* **epoch**: from one ``on_train_epoch_start`` to the next (the last to ``on_train_end``), so it
  includes the prune (FisherPruning prunes at the start of an epoch) and SparsityMonitor's work at the
  end of it; reported separately for the epochs with a prune and those without.

* **inside the callbacks** (the pruning runs only): the wall-clock time spent in every hook of the two
  callbacks and in the mask re-application after each optimizer step, summed per run, as a fraction
  of that same run's total time (per-step work and per-epoch work shown apart). Both numbers come
  from the same run, so this ratio holds on a machine whose speed varies between runs, where the
  plain-vs-pruning comparison above does not.

Inputs are random 32×32 images with random labels: the cost of a step does not depend on pixel values.
No validation loop runs (``SparsityMonitor(log_on_train_epoch_end=True, monitor="train/acc")``).

On CPU, denormal floats are flushed to zero (``torch.set_flush_denormal(True)``) for both runs unless
``--keep-denormals``: a pruned network trained on random labels drifts into denormal activations and
gradients that x86 handles through slow microcode, which makes the pruned run's dense arithmetic slower
although the callbacks did nothing (GPUs flush denormals in their fast paths anyway).

    python benchmarks/pruning_overhead.py                      # CPU, width 16, a couple of minutes
    python benchmarks/pruning_overhead.py --width 64 --accelerator gpu --steps-per-epoch 100
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher.callbacks import FisherPruning, SparsityMonitor
from lightning_fisher.fisher import Squisher
from lightning_fisher.models import ResNet18
from lightning_fisher.module import ImageClassifier

__all__ = ["StepTimer", "Timings", "main", "parse_args", "train_one"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=16, help="ResNet18 width (64 = the full model)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--prune-start", type=int, default=1, help="first prune epoch (gradual, sparsity 0 there)")
    parser.add_argument("--prune-end", type=int, default=3, help="epoch where the target is reached")
    parser.add_argument("--sparsity", type=float, default=0.9, help="target sparsity")
    parser.add_argument("--repeats", type=int, default=2, help="plain/pruning pairs, alternated")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out at the start of every run")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-denormals", action="store_true",
                        help="do not flush denormal floats to zero on CPU (see the module docstring)")
    args = parser.parse_args(argv)
    if not 0 <= args.prune_start < args.prune_end < args.epochs:
        parser.error(f"need 0 <= --prune-start ({args.prune_start}) < --prune-end ({args.prune_end}) "
                     f"< --epochs ({args.epochs}), so some epochs have no prune")
    return args


@dataclass
class Timings:
    """Per-epoch lists of step durations, epoch durations, and seconds spent inside the callbacks."""

    steps: list[list[float]] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)
    inside: dict[str, float] = field(default_factory=dict)


CIFAR_STEPS = 391  # one CIFAR-10 epoch at batch 128
PER_STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_zero_grad", "on_after_backward",
                  "on_before_optimizer_step", "apply_")


def instrument(obj: Any, seconds: dict[str, float], cuda: bool) -> None:
    """Wrap ``obj``'s hook methods (``on_*``, ``setup``, ``teardown``, ``apply_``) on the instance, adding
    their wall-clock time to ``seconds["per_step"]`` or ``seconds["per_epoch"]``."""
    names = [n for n in dir(type(obj)) if n.startswith("on_") or n in ("setup", "teardown", "apply_")]
    for name in names:
        method = getattr(obj, name)
        if not callable(method):
            continue
        bucket = "per_step" if name in PER_STEP_HOOKS else "per_epoch"

        def timed(*args: Any, _method: Any = method, _bucket: str = bucket, **kwargs: Any) -> Any:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                seconds[_bucket] = seconds.get(_bucket, 0.0) + time.perf_counter() - start

        setattr(obj, name, timed)


class StepTimer(Callback):
    """Wall-clock timestamps at every ``on_train_batch_start`` and ``on_train_epoch_start`` (put it first)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.timings = Timings()
        self._last_batch: float | None = None
        self._epoch_start: float | None = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = self._now()
        if self._epoch_start is not None:
            self.timings.epochs.append(now - self._epoch_start)
        self._epoch_start = now
        self._last_batch = None
        self.timings.steps.append([])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        now = self._now()
        if self._last_batch is not None:
            self.timings.steps[-1].append(now - self._last_batch)
        self._last_batch = now

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_start is not None:
            self.timings.epochs.append(self._now() - self._epoch_start)


def _loader(args: argparse.Namespace) -> DataLoader:
    generator = torch.Generator().manual_seed(args.seed)
    n = args.batch_size * args.steps_per_epoch
    images = torch.randn(n, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=args.batch_size, shuffle=False)


def train_one(with_pruning: bool, args: argparse.Namespace, log_dir: str) -> Timings:
    """One seeded training run, with or without the two callbacks; returns its timings."""
    L.seed_everything(args.seed, verbose=False)
    model = ImageClassifier(
        ResNet18(num_classes=10, width=args.width), num_classes=10,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05),
    )
    cuda = args.accelerator in ("gpu", "cuda") or (args.accelerator == "auto" and torch.cuda.is_available())
    timer = StepTimer(cuda)
    callbacks: list[Callback] = [timer]
    if with_pruning:
        pruning = FisherPruning(estimator=Squisher(), target_sparsity=args.sparsity, scope="global",
                                start_epoch=args.prune_start, end_epoch=args.prune_end, frequency=1, verbose=False)
        monitor = SparsityMonitor(monitor="train/acc", log_on_train_epoch_end=True, dirpath=log_dir)
        for obj in (pruning, pruning.pruner, monitor):
            instrument(obj, timer.timings.inside, cuda)
        callbacks += [pruning, monitor]
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, devices=1, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=log_dir,
    )
    trainer.fit(model, train_dataloaders=_loader(args))
    return timer.timings


def _steps(runs: list[Timings], epochs: list[int], warmup: int) -> list[float]:
    out: list[float] = []
    for run in runs:
        flat = [s for e in epochs for s in (run.steps[e] if e < len(run.steps) else [])]
        # warm-up: the first steps of the run (epoch 0's first steps) are left out
        skip = warmup if 0 in epochs else 0
        out += flat[skip:]
    return out


def _machine(args: argparse.Namespace) -> str:
    if args.accelerator in ("gpu", "cuda") or (args.accelerator == "auto" and torch.cuda.is_available()):
        device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cuda (unavailable)"
    else:
        device = f"cpu ({platform.processor() or platform.machine()})"
    return (f"{platform.platform()} | {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} | "
            f"torch {torch.__version__} | lightning {L.__version__} | device {device}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flushing = not args.keep_denormals and torch.set_flush_denormal(True)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
    print(f"machine: {_machine(args)}")
    print(f"budget: ResNet18(width={args.width}), batch {args.batch_size}, {args.epochs} epochs x "
          f"{args.steps_per_epoch} steps, AdamW; FisherPruning(Squisher, global, gradual to {args.sparsity:g} "
          f"from epoch {args.prune_start} to {args.prune_end}) + SparsityMonitor; {args.repeats} alternated "
          f"repeats; seed {args.seed}; denormals flushed: {flushing}", flush=True)
    plain: list[Timings] = []
    pruning: list[Timings] = []
    with tempfile.TemporaryDirectory(prefix="overhead-") as log_dir:
        for _ in range(args.repeats):
            plain.append(train_one(False, args, log_dir))
            pruning.append(train_one(True, args, log_dir))
    prune_epochs = list(range(args.prune_start, args.prune_end + 1))
    quiet_epochs = [e for e in range(args.epochs) if e not in prune_epochs]

    rows = []
    for label, epochs in (("step (epochs without a prune)", quiet_epochs), ("step (epochs with a prune)", prune_epochs)):
        a, b = _steps(plain, epochs, args.warmup), _steps(pruning, epochs, args.warmup)
        rows.append((f"{label}, median of {len(a)} / {len(b)}", statistics.median(a), statistics.median(b)))
    for label, epochs in (("epoch without a prune, mean", quiet_epochs), ("epoch with a prune, mean", prune_epochs)):
        a = [r.epochs[e] for r in plain for e in epochs if e < len(r.epochs) and e > 0]
        b = [r.epochs[e] for r in pruning for e in epochs if e < len(r.epochs) and e > 0]
        if a and b:
            rows.append((f"{label} (epoch 0 excluded)", statistics.fmean(a), statistics.fmean(b)))
    total_a = statistics.fmean(sum(r.epochs) for r in plain)
    total_b = statistics.fmean(sum(r.epochs) for r in pruning)
    rows.append(("whole run (all epochs), mean", total_a, total_b))

    print()
    inside = [(r.inside.get("per_step", 0.0), r.inside.get("per_epoch", 0.0), sum(r.epochs)) for r in pruning]
    print("| inside the callbacks (pruning runs) | seconds per run | fraction of the run |")
    print("|---|---:|---:|")
    for label, index in (("per-step work (batch hooks + mask re-application)", 0), ("per-epoch and fit work "
                         "(prunes incl. the Fisher read, SparsityMonitor, setup)", 1)):
        spent = statistics.fmean(row[index] for row in inside)
        fraction = statistics.fmean(row[index] / row[2] for row in inside)
        print(f"| {label} | {spent:.3f} | {100 * fraction:.2f}% |")
    total = statistics.fmean((row[0] + row[1]) / row[2] for row in inside)
    print(f"| all of it | {statistics.fmean(row[0] + row[1] for row in inside):.3f} | {100 * total:.2f}% |")
    step = statistics.median(_steps(pruning, list(range(args.epochs)), args.warmup))
    per_epoch = statistics.fmean(row[1] for row in inside) / args.epochs
    per_step = statistics.fmean(row[0] for row in inside) / (args.epochs * args.steps_per_epoch)
    print(f"per step inside the callbacks: {1000 * per_step:.2f} ms = {100 * per_step / step:.2f}% of the median "
          f"step ({step:.3f} s); per epoch: {per_epoch:.3f} s, i.e. {100 * per_epoch / (step * args.steps_per_epoch):.2f}% "
          f"of this benchmark's {args.steps_per_epoch}-step epoch and {100 * per_epoch / (step * CIFAR_STEPS):.2f}% "
          f"of a {CIFAR_STEPS}-step CIFAR-10 epoch (50,000 images, batch 128) at this step time")
    print()
    print("per epoch, median step (s) over the repeats: " + "; ".join(
        f"epoch {e}{'*' if e in prune_epochs else ''} {statistics.median(_steps(plain, [e], args.warmup)):.4f} / "
        f"{statistics.median(_steps(pruning, [e], args.warmup)):.4f}"
        for e in range(args.epochs)
    ) + "  (plain / pruning; * = a prune at its start)")
    print(f"prune epochs: {prune_epochs}; epochs without a prune: {quiet_epochs}")
    print("| measure | plain (s) | FisherPruning + SparsityMonitor (s) | ratio | overhead |")
    print("|---|---:|---:|---:|---:|")
    for label, a, b in rows:
        print(f"| {label} | {a:.4f} | {b:.4f} | {b / a:.3f} | {100 * (b / a - 1):+.1f}% |")


if __name__ == "__main__":
    main()
