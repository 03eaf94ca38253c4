"""How close FishLeg's learned Q gets to the damped inverse Fisher as it learns, per Fisher-vector product and lr.

On one dense CIFAR-10 ResNet18 (the one-shot proxy of ``sparsity_sweep.py``, the same flags for its
budget), every run starts a fresh ``FishLegFisher(damping, lr, fvp)`` from the same Q₀ (AdamW's second
moment) and learns on the same stream of augmented training batches. After 0 and each of ``--at``
updates it prints FishLeg's held-out auxiliary loss ``FishLegFisher.auxiliary_loss(fvp="ggn")``: A per
coordinate with the exact Fisher of each of ``--heldout-batches`` unaugmented training batches, on
fixed probes. E[A] exceeds its minimum, reached at Q = F_γ⁻¹, by ½‖Q − F_γ⁻¹‖² in the F_γ norm, so lower
is closer; with the exact (positive semi-definite) Fisher it is bounded below by about −1/(2γ).

    python benchmarks/fishleg_fit.py --data-dir /tmp/cifar10 --threads 1 --damping 4e-5 \\
        --runs ggn:1e-4,ggn:1e-3,finite_difference:1e-3 --at 5,10,20,50,100,150

``--dense-checkpoint PATH`` keeps the trained dense model (network and optimizer state) in ``PATH`` and
reuses it on the next run with the same flags, instead of training it again. Other flags go to
``sparsity_sweep.py``'s parser (``--width``, ``--epochs``, ``--max-per-class``, ``--seed``, ...).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparsity_sweep as sweep  # noqa: E402 - a sibling script, not a package

from lightning_fisher.data import CIFAR10DataModule  # noqa: E402
from lightning_fisher.fisher import FisherContext, FishLegFisher  # noqa: E402
from lightning_fisher.fisher.fishleg import FVP_METHODS  # noqa: E402


def _run(text: str) -> tuple[str, float]:
    fvp, _, lr = text.partition(":")
    if fvp not in FVP_METHODS:
        raise argparse.ArgumentTypeError(f"{text!r}: the product {fvp!r} is not one of {FVP_METHODS}")
    try:
        rate = float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FVP:LR with LR a number, e.g. ggn:1e-4") from None
    if not 0.0 < rate < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: the lr {lr} must be a finite number > 0")
    return fvp, rate


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """This script's options, and the rest parsed by ``sparsity_sweep.py`` (the dense model's budget)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--damping", type=float, default=0.1, help="FishLegFisher damping γ (> 0)")
    parser.add_argument("--runs", default="ggn:1e-4,finite_difference:1e-4",
                        help="comma-separated FVP:LR pairs, FVP one of " + ",".join(FVP_METHODS))
    parser.add_argument("--at", default="5,10,20,50", help="update counts to measure after (increasing)")
    parser.add_argument("--heldout-batches", type=int, default=8, help="unaugmented training batches of the measure")
    parser.add_argument("--dense-checkpoint", type=Path, default=None,
                        help="load the dense model from this file if it exists, else train it and save it there")
    args, rest = parser.parse_known_args(argv)
    if not 0.0 < args.damping < float("inf"):
        parser.error(f"--damping ({args.damping}): must be a finite number > 0")
    try:
        args.runs = [_run(text) for text in args.runs.split(",")]
    except argparse.ArgumentTypeError as error:
        parser.error(f"--runs: {error}")
    try:
        args.at = [int(count) for count in args.at.split(",")]
    except ValueError:
        parser.error(f"--at ({args.at}): expected comma-separated integers")
    if args.at[0] < 1 or any(b <= a for a, b in zip(args.at, args.at[1:])):
        parser.error(f"--at ({','.join(map(str, args.at))}): must be increasing counts >= 1")
    if args.heldout_batches < 1:
        parser.error(f"--heldout-batches ({args.heldout_batches}): must be >= 1")
    budget = sweep.parse_args([*rest, "--mode", "oneshot", "--methods", "fishleg_obs"])
    return args, budget


_DENSE_FLAGS = ("width", "epochs", "lr", "weight_decay", "batch_size", "max_per_class", "seed")


def dense_model(data: CIFAR10DataModule, budget: argparse.Namespace, checkpoint: Path | None) -> sweep.Dense:
    """The sweep's dense model: trained, or loaded from ``checkpoint`` (written after training when given).

    Raises:
        SystemExit: the checkpoint was trained with other flags than ``budget``'s (it names them).
    """
    flags = {name: getattr(budget, name) for name in _DENSE_FLAGS}
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state.get("flags") != flags:
            raise SystemExit(f"--dense-checkpoint {checkpoint}: trained with {state.get('flags')}, asked for {flags}")
        model = sweep._model("dense", budget)
        optimizer = model.configure_optimizers()["optimizer"]
        model.net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        device = sweep._device(budget)
        sweep._optimizer_to(optimizer, device)
        return sweep.Dense(model.net.to(device), optimizer, device, model.loss)
    dense = sweep.train_dense("dense", data, budget)
    if checkpoint is not None:
        torch.save({"net": dense.net.state_dict(), "optimizer": dense.optimizer.state_dict(), "flags": flags}, checkpoint)
    return dense


def _stream(data: CIFAR10DataModule, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """Augmented training batches, epoch after epoch, the same sequence for every run."""
    batches = sweep._batches(data, device)
    while True:
        yield from batches()


def learning_curve(dense: sweep.Dense, data: CIFAR10DataModule, damping: float, fvp: str, lr: float,
                   at: list[int], heldout_batches: int, batch_size: int, seed: int) -> tuple[list[float], float, float]:
    """Held-out A after 0 and each of ``at`` updates, the seconds per update, and the median of 1/Q_qq.

    The augmentation generator is reseeded with ``seed`` here, so every run (and a rerun on a loaded
    checkpoint, whose augmenter has not drawn for training) learns on the same batches."""
    data.augmenter.reseed(seed)
    parameters = sweep._pruned_weights(dense.net)
    stream = _stream(data, dense.device)
    context = FisherContext(model=dense.net, parameters=parameters, optimizer=dense.optimizer,
                            batches=lambda: stream, loss_fn=dense.loss_fn, batch_size=batch_size)
    heldout = FisherContext(model=dense.net, parameters=parameters, optimizer=dense.optimizer,
                            batches=sweep._batches(data, dense.device, train=False), batch_size=batch_size)
    estimator = FishLegFisher(damping=damping, lr=lr, fvp=fvp, update_every=None)
    dense.net.train()  # as FisherPruning sees the model
    estimator.build(context)
    curve = [estimator.auxiliary_loss(heldout, batches=heldout_batches, fvp="ggn")]
    seconds, done = 0.0, 0
    for count in at:
        start = time.perf_counter()
        estimator.pretrain(context, count - done)  # the shared stream goes on where the last call stopped
        seconds += time.perf_counter() - start
        done = count
        curve.append(estimator.auxiliary_loss(heldout, batches=heldout_batches, fvp="ggn"))
    inverse = torch.cat([q.flatten() for q in estimator.inverse_diagonal(context).values()])
    return curve, seconds / done, float((1.0 / inverse).median())


def main(argv: list[str] | None = None) -> None:
    args, budget = parse_args(argv)
    if budget.threads:
        torch.set_num_threads(budget.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    with tempfile.TemporaryDirectory(prefix="cifar10-") as scratch:
        data = CIFAR10DataModule(data_dir=sweep._data_dir(budget, Path(scratch)), download=False,
                                 batch_size=budget.batch_size, eval_batch_size=500, seed=budget.seed,
                                 max_per_class=budget.max_per_class or None)
        data.prepare_data()
        data.setup("fit")
        reused = args.dense_checkpoint is not None and args.dense_checkpoint.exists()
        dense = dense_model(data, budget, args.dense_checkpoint)
        accuracy = sweep.evaluate(dense.net, data, dense.device)
        origin = f"loaded from {args.dense_checkpoint}" if reused else f"trained in {dense.seconds:.0f} s"
        print(f"machine: {sweep._machine(budget)}")
        print(f"dense model: ResNet18(width={budget.width}), seed {budget.seed}, {origin}, test accuracy {accuracy:.4f}; "
              f"damping γ = {args.damping:g} (A ≥ about {-0.5 / args.damping:.4g}); held-out A on "
              f"{args.heldout_batches} unaugmented training batches with the exact batch Fisher (fvp='ggn')")
        header = ["fvp", "lr", "Q₀", *[f"{count} updates" for count in args.at], "s / update", "median 1/Q_qq"]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * 2 + "---:|" * (len(header) - 2))
        for fvp, lr in args.runs:
            curve, per_update, median = learning_curve(dense, data, args.damping, fvp, lr, args.at,
                                                       args.heldout_batches, budget.batch_size, budget.seed)
            cells = [fvp, f"{lr:g}", *[f"{value:.5g}" for value in curve], f"{per_update:.2f}", f"{median:.3e}"]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
