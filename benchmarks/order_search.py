"""Benchmark: the order of compression (Shen et al., arXiv 2403.17447) on a CPU proxy of CIFAR-10 ResNet18.

A reduced-width ResNet18 (CIFAR stem) is trained dense once (``--base-epochs``) on a per-class subset of
the JPEG copy of CIFAR-10 in ``../shared/data``. Every pair of ``--stages`` then runs in both orders from
that dense model (``lightning_fisher.compress.pipeline.run_pipeline`` with ``base_ckpt``, one phase of
``--stage-epochs`` per stage, AdamW, cosine over each phase). The planner decides each pair by
``--metric`` (accuracy at equal compression by default, or compression at ``--floor``), sorts the
precedence graph, and the chosen chain is run once more in full. Printed: the pairwise table, the chosen
order (and any cycle broken), and the final table of size, bit-operations and accuracy against dense.
Accuracy is on the whole test split (10,000 images); bit-operations on its first 256 images.

Stage settings (the pipeline's constructor defaults except where stated): distill into a half-width
student (T=4, α=0.9); prune to ``--sparsity`` with magnitude scores, one shot at the first epoch of its
phase (so any ``--stage-epochs`` works); 8-bit quantization-aware training; low rank at 90% energy;
early exits after layer2 and layer3 at threshold 0.9.

    python benchmarks/order_search.py                       # CPU proxy: width 16, 200 images/class (hours)
    python benchmarks/order_search.py --width 4 --max-per-class 10 --base-epochs 1 --stage-epochs 1 \\
        --stages prune quantize --test-per-class 20        # smoke test (a minute or two)
"""

from __future__ import annotations

import argparse
import logging
import platform
import tarfile
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import torch

from lightning_fisher.compress.pipeline import STAGES, PipelineResult, run_pipeline
from lightning_fisher.compress.planner import RunRecord, plan_from_records
from lightning_fisher.data import CIFAR10DataModule
from lightning_fisher.models import ResNet18
from lightning_fisher.module import ImageClassifier

__all__ = ["main", "parse_args"]

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
PAPER_STAGES = ("distill", "prune", "quantize", "early_exit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="an extracted CIFAR-10 (else --archive is extracted)")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--max-per-class", type=int, default=200, help="training images per class (0: all)")
    parser.add_argument("--test-per-class", type=int, default=0, help="keep only this many test images per class (0: all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--base-epochs", type=int, default=30)
    parser.add_argument("--stage-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--stages", nargs="+", default=list(PAPER_STAGES), choices=STAGES)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--metric", choices=("accuracy", "compression"), default="accuracy")
    parser.add_argument("--floor", type=float, default=None, help="accuracy floor of --metric compression")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="where runs and the report go (default: a temp dir)")
    return parser.parse_args(argv)


def _data(args: argparse.Namespace, scratch: Path) -> CIFAR10DataModule:
    data_dir = args.data_dir
    if data_dir is None:
        if not args.archive.is_file():
            raise SystemExit(f"--archive={args.archive}: not found; give --data-dir or the path of cifar10-jpeg.tar.gz")
        with tarfile.open(args.archive) as archive:
            archive.extractall(scratch, filter="data")
        data_dir = scratch
    data = CIFAR10DataModule(
        data_dir, download=False, batch_size=args.batch_size, eval_batch_size=500, seed=args.seed,
        max_per_class=args.max_per_class or None,
    )
    if args.test_per_class:
        from lightning_fisher.data.dataset import TensorImageDataset

        data.setup("fit")
        labels = data.test_set.labels
        keep = torch.cat([torch.nonzero(labels == c).flatten()[: args.test_per_class] for c in range(10)])
        data.test_set = TensorImageDataset(data.test_set.images[keep], labels[keep])
    return data


def _module(args: argparse.Namespace) -> ImageClassifier:
    torch.manual_seed(args.seed)
    return ImageClassifier(
        ResNet18(num_classes=10, width=args.width), num_classes=10, label_smoothing=0.1,
        optimizer=partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.05),
    )


def _trainer(args: argparse.Namespace, root: Path, phase: str, epochs: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, callbacks=callbacks, accelerator=args.accelerator, devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root / phase, num_sanity_val_steps=0,
    )


def _run(args: argparse.Namespace, data: CIFAR10DataModule, stages: list[str], root: Path, **kwargs) -> PipelineResult:
    L.seed_everything(args.seed, workers=True)
    settings = {
        "prune": {"target_sparsity": args.sparsity, "criterion": "magnitude", "schedule": "one_shot", "verbose": False},
    }
    cosine = lambda epochs: partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs)  # noqa: E731
    return run_pipeline(
        _module(args), data, stages, partial(_trainer, args, root), settings=settings,
        stage_epochs=args.stage_epochs, scheduler_for_epochs=cosine, output_dir=root, **kwargs,
    )


def _record(result: PipelineResult) -> RunRecord:
    return RunRecord.from_dict(result.to_dict())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        out = args.out or scratch / "runs"
        data = _data(args, scratch / "data")
        start = time.perf_counter()
        dense = _run(args, data, [], out / "dense", base_epochs=args.base_epochs)
        base_ckpt = out / "dense" / "dense.pt"
        torch.save(dense.module.state_dict(), base_ckpt)
        print(f"dense: accuracy {dense.accuracy:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        records = []
        for i, a in enumerate(args.stages):
            for b in args.stages[i + 1:]:
                for pair in ([a, b], [b, a]):
                    result = _run(args, data, pair, out / "_".join(pair), base_ckpt=base_ckpt)
                    records.append(_record(result))
                    print(f"{' -> '.join(pair)}: accuracy {result.accuracy:.4f}, size {result.report.compression_ratio:.1f}x, "
                          f"bit-ops {result.report.bit_op_reduction:.1f}x", flush=True)
        plan = plan_from_records(records, stages=args.stages, metric=args.metric, accuracy_floor=args.floor,
                                 dense_accuracy=dense.accuracy)
        if plan.final is None and plan.order:
            final = _run(args, data, list(plan.order), out / "final", base_ckpt=base_ckpt)
            plan = plan_from_records([*records, _record(final)], stages=args.stages, metric=args.metric,
                                     accuracy_floor=args.floor, dense_accuracy=dense.accuracy)
        plan.write(out)
        print()
        print(plan.to_markdown())
        print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, accelerator={args.accelerator}; total {time.perf_counter() - start:.0f} s")
        print(f"width {args.width}, {args.max_per_class or 'all'} train images/class, base {args.base_epochs} epochs, "
              f"{args.stage_epochs} epochs per stage; data: JPEG copy of CIFAR-10 (2-3 points below the PNG original)")


if __name__ == "__main__":
    main()
