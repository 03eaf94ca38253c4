"""Benchmark 2: test accuracy after gradual pruning, by method, at 90/95/98% unstructured and 2:4.

Every run trains the same ResNet18 (CIFAR stem) from the same seed, on the same shuffled and augmented
batches, with the same optimizer (AdamW, lr 1e-3, weight decay 0.05 as ``conf/optimizer/adamw.yaml``, so
the Squisher has Adam state to read), the same cosine learning-rate schedule over ``--epochs`` epochs,
and the same gradual cubic schedule (Zhu & Gupta) from 0 at ``--prune-start`` to the target at
``--prune-end``, one prune per epoch. The stem conv and the classifier stay dense for every method.
Methods:

* ``magnitude_layer``: ``FisherPruning(criterion="magnitude", scope="layer")`` (|θ|, the same sparsity
  in every layer: magnitudes are not comparable across layers, so per-layer budgets are the usual form);
* ``magnitude_global``: ``FisherPruning(criterion="magnitude", scope="global")`` (one |θ| threshold);
* ``lightning_l1``: Lightning's own ``ModelPruning("l1_unstructured", use_global_unstructured=True)``
  on the same weights, with ``amount`` a function of the epoch that gives the same cumulative cubic
  sparsity as the others (ModelPruning prunes a fraction of what remains, at the end of an epoch: the
  amount at the end of epoch e takes the sparsity to the level the others reach before epoch e+1).
  It has no N:M pattern: ``n/a`` for 2:4;
* ``squisher``: ``FisherPruning(criterion="fisher", estimator=Squisher(), scope="global")`` (OBD
  θ²F/2 with the free Fisher read from AdamW's second moment);
* ``empirical``: ``FisherPruning(criterion="fisher", estimator=EmpiricalFisher(num_samples=...),
  scope="global")`` (per-sample squared gradients at prune time);
* ``kronecker``: ``FisherPruning(criterion="fisher", estimator=KroneckerFisher(), scope="global")``,
  the free Kronecker Fisher of AdaFisher. This one method trains with ``AdaFisherW`` (same lr and
  weight decay) instead of AdamW, since its Fisher is that optimizer's state: its accuracy mixes the
  optimizer's effect with the criterion's, so compare it with the ``dense_adafisher`` row too.

"Δ vs magnitude" in the table is each method's accuracy minus ``magnitude_layer``'s at the same target
(``magnitude_global`` is shown as its own row). The dense baseline trains the same way with no pruning.

The data are the JPEG copy of CIFAR-10 in ``../shared/data``; the archive is extracted once into a
temporary directory unless ``--data-dir`` points at an extracted copy. Accuracy is on the whole test
split (10,000 images) after the last epoch.

    python benchmarks/sparsity_sweep.py                     # CPU proxy: width 16, 500 images/class
    python benchmarks/sparsity_sweep.py --width 4 --max-per-class 20 --epochs 3   # smoke test (minutes)
    python benchmarks/sparsity_sweep.py --width 64 --max-per-class 0 --accelerator gpu --epochs 60 \\
        --prune-start 10 --prune-end 40                     # the full CIFAR ResNet18 on a GPU
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning

from lightning_fisher.callbacks import FisherPruning
from lightning_fisher.data import CIFAR10DataModule
from lightning_fisher.fisher import EmpiricalFisher, KroneckerFisher, Squisher
from lightning_fisher.models import ResNet18
from lightning_fisher.module import ImageClassifier
from lightning_fisher.optim import AdaFisherW
from lightning_fisher.pruning.schedules import cubic_sparsity
from lightning_fisher.pruning.selection import select_parameters

__all__ = ["METHODS", "Run", "lightning_amount", "main", "parse_args", "train_one"]

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
METHODS: tuple[str, ...] = (
    "magnitude_layer", "magnitude_global", "lightning_l1", "squisher", "empirical", "kronecker",
)
ADAFISHER_METHODS = ("kronecker", "dense_adafisher")
BASELINE = "magnitude_layer"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="an extracted CIFAR-10 (default: extract --archive into a temporary directory)")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="the CIFAR-10 JPEG archive")
    parser.add_argument("--width", type=int, default=16, help="ResNet18 width (64 = the full 11.17M-parameter model)")
    parser.add_argument("--max-per-class", type=int, default=500, help="training images per class (0 = all 5,000)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of every run")
    parser.add_argument("--prune-start", type=int, default=None,
                        help="epoch of the first prune (sparsity 0 there); default: epochs // 5")
    parser.add_argument("--prune-end", type=int, default=None,
                        help="epoch where the target is reached; default: epochs * 3 // 4 (must be < epochs)")
    parser.add_argument("--sparsities", default="0.9,0.95,0.98", help="comma-separated unstructured targets")
    parser.add_argument("--patterns", default="2:4", help="comma-separated N:M patterns ('' for none)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline run")
    parser.add_argument("--fisher-samples", type=int, default=1024, help="EmpiricalFisher num_samples")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed on a GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None,
                        help="also write the results: .csv (one row per run) or .md (the table)")
    args = parser.parse_args(argv)
    args.prune_start = args.epochs // 5 if args.prune_start is None else args.prune_start
    args.prune_end = args.epochs * 3 // 4 if args.prune_end is None else args.prune_end
    if not 0 <= args.prune_start < args.prune_end < args.epochs:
        parser.error(f"need 0 <= --prune-start ({args.prune_start}) < --prune-end ({args.prune_end}) "
                     f"< --epochs ({args.epochs}), so the last prune is followed by training")
    args.methods = _choices(parser, "--methods", args.methods, METHODS)
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    if any(not 0.0 < s < 1.0 for s in args.sparsities):
        parser.error(f"--sparsities={args.sparsities}: each must be in (0, 1)")
    args.patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    return args


def _choices(parser: argparse.ArgumentParser, flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        parser.error(f"{flag}: unknown {unknown}; choose from {list(allowed)}")
    return chosen


@dataclass
class Run:
    """One training run: a method at a target (``"dense"``, ``"0.95"`` or ``"2:4"``)."""

    method: str
    target: str
    accuracy: float | None = None  # None: not applicable (n/a)
    sparsity: float | None = None
    seconds: float = 0.0


def lightning_amount(final: float, start: int, end: int) -> Callable[[int], float]:
    """``ModelPruning``'s ``amount(epoch)``: the fraction of the remaining weights to prune at the end
    of ``epoch`` so that training epoch ``epoch + 1`` runs at the cubic level ``FisherPruning`` uses."""

    def level(t: int) -> float:
        return 0.0 if t < start else cubic_sparsity(t, 0.0, final, start, end)

    def amount(epoch: int) -> float:
        before, after = level(epoch), level(epoch + 1)
        return 0.0 if after <= before else (after - before) / (1.0 - before)

    return amount


def _pruned_weights(model: ImageClassifier) -> dict[str, torch.nn.Parameter]:
    return select_parameters(model)  # the same selection as FisherPruning's defaults (stem, fc dense)


def _callbacks(method: str, target: str, model: ImageClassifier, args: argparse.Namespace) -> list[Callback] | None:
    """The pruning callback of ``method`` at ``target``; ``None`` when the method cannot do it."""
    if method in ("dense", "dense_adafisher"):
        return []
    nm = ":" in target
    schedule = {"schedule": "gradual", "start_epoch": args.prune_start, "end_epoch": args.prune_end,
                "frequency": 1, "verbose": False}
    shape = {"pattern": target} if nm else {"pattern": "unstructured", "target_sparsity": float(target)}
    if method == "magnitude_layer":
        return [FisherPruning(criterion="magnitude", scope="layer", **shape, **schedule)]
    if method == "magnitude_global":
        return [FisherPruning(criterion="magnitude", scope="global", **shape, **schedule)]
    if method == "squisher":
        return [FisherPruning(criterion="fisher", estimator=Squisher(), scope="global", **shape, **schedule)]
    if method == "empirical":
        estimator = EmpiricalFisher(num_samples=args.fisher_samples)
        return [FisherPruning(criterion="fisher", estimator=estimator, scope="global", **shape, **schedule)]
    if method == "kronecker":
        return [FisherPruning(criterion="fisher", estimator=KroneckerFisher(), scope="global", **shape, **schedule)]
    if method == "lightning_l1":
        if nm:
            return None
        modules = dict(model.named_modules())
        params = [(modules[name.rsplit(".", 1)[0]], "weight") for name in _pruned_weights(model)]
        return [ModelPruning("l1_unstructured", parameters_to_prune=params,
                             amount=lightning_amount(float(target), args.prune_start, args.prune_end),
                             use_global_unstructured=True, make_pruning_permanent=True, verbose=0)]
    raise ValueError(f"method={method!r}: must be one of {METHODS} or 'dense'")


def _sparsity(model: ImageClassifier) -> float:
    weights = list(_pruned_weights(model).values())
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def train_one(method: str, target: str, data: CIFAR10DataModule, args: argparse.Namespace) -> Run:
    """Train a fresh seeded model with ``method`` pruning to ``target``; test accuracy after the last epoch."""
    L.seed_everything(args.seed, verbose=False)
    epochs = args.epochs
    net = ResNet18(num_classes=10, width=args.width)
    if method in ADAFISHER_METHODS:
        def optimizer(params):  # noqa: ANN001, ANN202 - ImageClassifier's factory
            return AdaFisherW(params, model=net, lr=args.lr, weight_decay=args.weight_decay)
    else:
        def optimizer(params):  # noqa: ANN001, ANN202
            return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    model = ImageClassifier(
        net,
        num_classes=10,
        optimizer=optimizer,
        scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs),
    )
    callbacks = _callbacks(method, target, model, args)
    if callbacks is None:
        return Run(method, target)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator=args.accelerator, devices=1, precision=args.precision,
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, deterministic=False,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    return Run(method, target, float(metrics["test/acc"]), _sparsity(model), seconds)


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


def _machine(args: argparse.Namespace) -> str:
    if args.accelerator in ("gpu", "cuda") or (args.accelerator == "auto" and torch.cuda.is_available()):
        device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cuda (unavailable)"
    else:
        device = f"cpu ({platform.processor() or platform.machine()})"
    return (f"{platform.platform()} | {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} | "
            f"torch {torch.__version__} | lightning {L.__version__} | device {device}")


def format_table(runs: list[Run], targets: list[str], methods: list[str]) -> str:
    """Markdown: one row per method, one column per target, accuracy and Δ vs ``magnitude_layer``."""
    by_key = {(r.method, r.target): r for r in runs}

    def cell(method: str, target: str) -> str:
        run = by_key.get((method, target))
        if run is None or run.accuracy is None:
            return "n/a"
        text = f"{run.accuracy:.4f}"
        base = by_key.get((BASELINE, target))
        if method != BASELINE and base is not None and base.accuracy is not None:
            text += f" ({run.accuracy - base.accuracy:+.4f})"
        return text

    lines = ["| method | " + " | ".join(targets) + " |", "|---|" + "---:|" * len(targets)]
    for name, label in (("dense", "dense (no pruning)"), ("dense_adafisher", "dense, AdaFisherW (no pruning)")):
        dense = by_key.get((name, "dense"))
        if dense is not None and dense.accuracy is not None:
            lines.append(f"| {label} | " + " | ".join(f"{dense.accuracy:.4f}" for _ in targets) + " |")
    lines += [f"| {m} | " + " | ".join(cell(m, t) for t in targets) + " |" for m in methods]
    return "\n".join(lines)


def _write(path: Path, runs: list[Run], header: str, table: str) -> None:
    if path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["method", "target", "test_acc", "achieved_sparsity", "train_seconds"])
            for r in runs:
                writer.writerow([r.method, r.target, "" if r.accuracy is None else f"{r.accuracy:.6f}",
                                 "" if r.sparsity is None else f"{r.sparsity:.6f}", f"{r.seconds:.1f}"])
    else:
        path.write_text(header + "\n\n" + table + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    targets = [f"{s:g}" for s in args.sparsities] + args.patterns
    machine = _machine(args)
    print(f"machine: {machine}", flush=True)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="cifar10-") as scratch:
        data = CIFAR10DataModule(
            data_dir=_data_dir(args, Path(scratch)), download=False, batch_size=args.batch_size,
            eval_batch_size=500, seed=args.seed, max_per_class=args.max_per_class or None,
        )
        data.prepare_data()
        data.setup("fit")
        steps = len(data.train_dataloader())
        budget = (f"ResNet18(width={args.width}) on {len(data.train_set)} training images "
                  f"(max_per_class={args.max_per_class or 'all'}), tested on {len(data.test_set)}; "
                  f"{args.epochs} epochs x {steps} steps, batch {args.batch_size}, AdamW lr {args.lr:g} "
                  f"wd {args.weight_decay:g}, cosine; gradual cubic pruning from epoch {args.prune_start} "
                  f"(0%) to epoch {args.prune_end} (target), every epoch; EmpiricalFisher "
                  f"num_samples={args.fisher_samples}; seed {args.seed}")
        print(f"budget: {budget}", flush=True)
        dense = [("dense", "dense")] + ([("dense_adafisher", "dense")] if "kronecker" in args.methods else [])
        plan = ([] if args.no_dense else dense) + [(m, t) for t in targets for m in args.methods]
        total = time.perf_counter()
        for i, (method, target) in enumerate(plan, 1):
            run = train_one(method, target, data, args)
            runs.append(run)
            acc = "n/a" if run.accuracy is None else f"test acc {run.accuracy:.4f}, sparsity {run.sparsity:.4f}"
            print(f"[{i}/{len(plan)}] {method} @ {target}: {acc} ({run.seconds:.0f} s)", flush=True)
    header = (f"machine: {machine}\nbudget: {budget}\ntotal time: {time.perf_counter() - total:.0f} s\n"
              f"cells: test accuracy (difference to {BASELINE} at the same target)")
    table = format_table(runs, targets, args.methods)
    print()
    print(header)
    print(table)
    if args.output is not None:
        _write(args.output, runs, header, table)


if __name__ == "__main__":
    main()
