"""FishLeg's cost next to a dense training step: time of one auxiliary update and memory of Q, per conv form.

For the CIFAR ResNet18 (``--width``, 64 = the full model) with the layers FisherPruning prunes by default
(every Conv2d/Linear but the stem and the classifier), measured side by side in one process:

* **time**: the median over ``--repeats`` of one AdamW training step (forward, backward, step) on a
  random batch, and of one FishLeg auxiliary update (``FishLegFisher.pretrain(context, 1)``: the
  sampled-label Fisher-vector product, the preconditioned auxiliary gradient, the Adam step on λ) on the
  same batch, per ``conv_form``, with ``--fvp`` (default the recipe's ``ggn``; ``finite_difference`` is
  the constructor's default); the ``fishleg/diag_agreement`` metric the training hook logs after every
  update (``--agreement-samples``; its first call after a prune draws the subsample, later calls reuse
  it); the ratio update/step, and the amortised overhead per training step with one update and one
  metric every ``update_every`` steps (``(update + metric) / step / update_every``);
* **device reads**: the host-device synchronisations (``HostSyncCounter``: a value read from the device,
  or boolean indexing) in one update plus its metric, reads of the optimizers' CPU ``step`` counters
  left out (no sync on a GPU); on CUDA each one stalls the host until the queued kernels finish; and the
  aten calls of the same update (views included): the launches a GPU update is bound by;
* **memory**: λ's entries (``FishLegFisher.num_parameters()``) plus its Adam state (2 per entry), in fp32
  bytes, as a ratio to the model's parameters + AdamW state (3 per parameter); on CUDA also the peak
  allocated memory of an update as a ratio to the peak of a training step.

    python benchmarks/fishleg_overhead.py                         # CPU, width 16
    python benchmarks/fishleg_overhead.py --width 64 --device cuda --batch-size 128
    python benchmarks/fishleg_overhead.py --masked 0.5       # after a prune: half of every layer's weights masked
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_fisher.fisher import FishLegFisher
from lightning_fisher.fisher.base import FisherContext
from lightning_fisher.fisher.fishleg.estimator import FVP_METHODS
from lightning_fisher.fisher.fishleg.forms import CONV_FORMS
from lightning_fisher.models import ResNet18
from lightning_fisher.profiling import HostSyncCounter
from lightning_fisher.pruning.selection import select_parameters

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=16, help="ResNet18 width (64 = the full model)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (after one warm-up)")
    parser.add_argument("--update-every", type=int, default=10, help="FishLeg updates every k training steps")
    parser.add_argument("--conv-forms", default=",".join(CONV_FORMS), help=f"comma-separated subset of {CONV_FORMS}")
    parser.add_argument("--fvp", default="ggn", choices=FVP_METHODS,
                        help="Fisher-vector product (ggn: the recipe's; finite_difference: the constructor's default)")
    parser.add_argument("--agreement-samples", type=int, default=100_000,
                        help="entries of the diag_agreement metric (FishLegFisher's default; 0: not timed)")
    parser.add_argument("--masked", type=float, default=0.0,
                        help="fraction of every pruned layer's weights masked at random, as after a prune (0: dense)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.conv_forms = [f.strip() for f in args.conv_forms.split(",") if f.strip()]
    unknown = sorted(set(args.conv_forms) - set(CONV_FORMS))
    if unknown or not args.conv_forms:
        parser.error(f"--conv-forms: unknown {unknown}; choose from {list(CONV_FORMS)}")
    if args.update_every < 1 or args.repeats < 1 or args.batch_size < 1:
        parser.error("--update-every, --repeats and --batch-size must be >= 1")
    if not 0.0 <= args.masked < 1.0:
        parser.error(f"--masked {args.masked}: must be in [0, 1)")
    if args.agreement_samples < 0:
        parser.error(f"--agreement-samples {args.agreement_samples}: must be >= 0")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, int | None]:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up, and the peak CUDA bytes."""
    fn()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = ResNet18(num_classes=10, width=args.width).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step_seconds, step_peak = _timed(train_step, device, args.repeats)
    params = select_parameters(model)
    context = FisherContext(model=model, parameters=params, optimizer=optimizer, batches=lambda: iter([(x, y)]),
                            loss_fn=F.cross_entropy, batch_size=args.batch_size)
    if args.masked > 0:
        generator = torch.Generator().manual_seed(args.seed)
        context.extra["masks"] = {n: (torch.rand(p.shape, generator=generator) >= args.masked).to(device)
                                  for n, p in params.items()}
    model_bytes = 4 * 3 * sum(p.numel() for p in model.parameters())  # weights + AdamW's two moments

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"machine: {platform.platform()} | {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} | "
          f"torch {torch.__version__} | device {device.type} ({device_name})")
    print(f"budget: ResNet18(width={args.width}), {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(params)} layers with a FishLeg block; batch {args.batch_size}; median of {args.repeats} after "
          f"a warm-up; one update every {args.update_every} steps; fvp={args.fvp}; "
          f"agreement_samples={args.agreement_samples:,}; {args.masked:.0%} of each layer's weights masked")
    with HostSyncCounter() as counter:
        train_step()
    print(f"dense training step (AdamW): {step_seconds:.4f} s, {counter.ops:,} aten calls")
    print()
    print("| conv form | λ entries | Q + Adam state (MB) | memory vs model + AdamW | update (s) "
          "| metric, first after a prune (s) | metric (s) | (update + metric) / step "
          "| overhead per step at 1 update / k | peak memory update / step | device reads (update + metric) | aten calls (update + metric) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for form in args.conv_forms:
        estimator = FishLegFisher(conv_form=form, update_every=args.update_every, fvp=args.fvp,
                                  agreement_samples=args.agreement_samples)
        estimator.build(context)
        update_seconds, update_peak = _timed(lambda: estimator.pretrain(context, 1), device, args.repeats)
        first_metric, metric = _metric_seconds(estimator, context, device, args.repeats)
        reads, calls = _device_reads(estimator, context, optimizer)
        entries = estimator.num_parameters()
        q_bytes = 4 * 3 * entries  # λ and Adam's two moments on λ
        ratio = (update_seconds + metric) / step_seconds
        peak = f"{update_peak / step_peak:.2f}" if update_peak and step_peak else "n/a (CPU)"
        print(f"| {form} | {entries:,} | {q_bytes / 2**20:.1f} | {q_bytes / model_bytes:.2f} | {update_seconds:.4f} "
              f"| {first_metric:.4f} | {metric:.4f} | {ratio:.2f} | {100 * ratio / args.update_every:+.1f}% | {peak} | {reads} | {calls:,} |")
        del estimator


def _device_reads(estimator: FishLegFisher, context: FisherContext, optimizer: torch.optim.Optimizer) -> tuple[str, int]:
    """Host-device syncs of one more update and its metric, as ``total (by op)``, and its aten calls."""
    steps = [s["step"] for o in (optimizer, estimator._adam) for s in o.state.values() if "step" in s]
    with HostSyncCounter(ignore=steps) as counter:
        estimator.pretrain(context, 1)
        if estimator.agreement_samples:
            estimator.diag_agreement(context)
    detail = ", ".join(f"{name} {count}" for name, count in sorted(counter.counts.items()))
    return (f"{counter.total} ({detail})" if detail else "0"), counter.ops


def _metric_seconds(estimator: FishLegFisher, context: FisherContext, device: torch.device,
                    repeats: int) -> tuple[float, float]:
    """Seconds of ``diag_agreement``: its first call (which draws the subsample) and the median of later ones."""
    if estimator.agreement_samples == 0:
        return 0.0, 0.0
    _sync(device)
    start = time.perf_counter()
    estimator.diag_agreement(context)
    _sync(device)
    first = time.perf_counter() - start
    later, _ = _timed(lambda: estimator.diag_agreement(context), device, repeats)
    return first, later


if __name__ == "__main__":
    main()
