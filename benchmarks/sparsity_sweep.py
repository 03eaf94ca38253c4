"""Benchmark 2: test accuracy after pruning, by method, at 90/95/98% unstructured and 2:4.

Two modes (``--mode``):

* ``gradual`` (default): every run trains the same ResNet18 (CIFAR stem) from the same seed, on the
  same shuffled and augmented batches, with the same optimizer (AdamW, lr 1e-3, weight decay 0.05 as
  ``conf/optimizer/adamw.yaml``, so the Squisher has Adam state to read), the same cosine learning-rate
  schedule over ``--epochs`` epochs, and the same gradual cubic schedule (Zhu & Gupta) from 0 at
  ``--prune-start`` to the target at ``--prune-end``, one prune per epoch, then fine-tunes to the end.
* ``oneshot``: ONE dense model is trained (AdamW, the same ``--epochs`` budget and cosine schedule);
  then for every method and target a deep copy of it is pruned once, straight to the target, with NO
  fine-tuning, and tested. The pruning uses the core directly (``lightning_fisher.pruning.Pruner`` with
  ``schedule="one_shot"``, the estimator with a ``FisherContext`` filled like ``FisherPruning``'s: the
  model in training mode, the pruned weights, the trained optimizer, the training batches on the device
  and augmented as in training, every pass over them from the random state of the estimate's start, so
  every method reads the same augmented batches, the module's loss, the batch size). The Fisher estimate of a method is
  computed once from the dense model and reused for every target: a one-shot prune depends only on the
  dense model, so this equals recomputing it from a fresh copy per target (FishLeg's Q is learned with
  seeded probes, and its ``pretrain_steps`` updates run on the dense model either way). The dense
  model's weights and BatchNorm buffers are restored after the estimate (forward passes in training
  mode move the running statistics). BatchNorm: the pruned copy is tested with the dense model's
  running statistics, no recalibration, unless ``--bn-recalibrate N`` re-estimates them on N training
  batches (no augmentation change, no gradient, no weight update) before the test. No weight changes
  after the prune except OBS's own compensation (``fishleg_obs``).

The stem conv and the classifier stay dense for every method. Methods:

* ``magnitude_layer``: ``FisherPruning(criterion="magnitude", scope="layer")`` (|θ|, the same sparsity
  in every layer: magnitudes are not comparable across layers, so per-layer budgets are the usual form);
* ``magnitude_global``: ``FisherPruning(criterion="magnitude", scope="global")`` (one |θ| threshold);
* ``lightning_l1``: Lightning's own ``ModelPruning("l1_unstructured", use_global_unstructured=True)``
  on the same weights, with ``amount`` a function of the epoch that gives the same cumulative cubic
  sparsity as the others (ModelPruning prunes a fraction of what remains, at the end of an epoch: the
  amount at the end of epoch e takes the sparsity to the level the others reach before epoch e+1).
  In ``oneshot``: ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured`` (what
  ModelPruning calls) at the target, made permanent. It has no N:M pattern: ``n/a`` for 2:4;
* ``squisher``: ``FisherPruning(criterion="fisher", estimator=Squisher(), scope="global")`` (OBD
  θ²F/2 with the free Fisher read from AdamW's second moment; ``--fisher-damping δ`` scores every OBD
  method, all Fisher methods but ``fishleg_obs``, with θ²(F + δ·mean F)/2 instead);
* ``empirical``: ``FisherPruning(criterion="fisher", estimator=EmpiricalFisher(num_samples=...),
  scope="global")`` (per-sample squared gradients at prune time);
* ``kronecker``: ``FisherPruning(criterion="fisher", estimator=KroneckerFisher(), scope="global")``,
  the free Kronecker Fisher of AdaFisher. This one method trains with ``AdaFisherW`` (its own defaults,
  or ``--adafisher-lr/--adafisher-damping/--adafisher-weight-decay``) instead of AdamW, since its
  Fisher is that optimizer's state: its accuracy mixes the
  optimizer's effect with the criterion's, so compare it with the ``dense_adafisher`` row too (in
  ``oneshot`` a second dense model is trained with AdaFisherW, only when ``kronecker`` is asked for);
* ``fishleg``: ``FisherPruning(criterion="fisher", estimator=FishLegFisher(pretrain_steps=
  --fishleg-pretrain, update_every=--fishleg-update-every), scope="global")`` (FishLeg Surgeon's
  learned inverse Fisher Q, default conv_form, damping ``--fishleg-damping``, Adam's learning rate on λ
  ``--fishleg-lr`` and Fisher-vector product ``--fishleg-fvp``, or the defaults; with
  ``--fishleg-relative-damping`` the damping is δ × the mean Fisher; with ``--fishleg-refresh`` its diagonal
  rescaled to the current Fisher at every prune, matching diag Q or, with ``--fishleg-refresh-match fisher``,
  the diagonal of the Fisher Q implies; with ``--fishleg-diagonal empirical`` Q's diagonal (Q₀ and
  refreshes) comes from ``EmpiricalFisher`` instead of the Squisher; scored
  with the diagonal Fisher Q implies, θ²F/2, no compensation; with ``--fishleg-refresh
  --fishleg-relative-damping`` and ``--fisher-damping`` equal to ``--fishleg-damping`` that is the damped
  OBD of the refreshing diagonal, so it ranks and trains as ``empirical`` or ``squisher`` do: FishLeg
  Surgeon without its update; bit-identical in the tests' tiny runs). Q starts from AdamW's second moment
  and learns every ``update_every`` steps during training (gradual only) and ``pretrain_steps`` times
  before its first prune;
* ``fishleg_obs``: the same with ``compensate=True``: OBS scores θ²/(2Q_qq) and the OBS update of the
  surviving weights with Q (FishLeg Surgeon): the independent-weights form, or with ``--obs-iterations k``
  the joint form over every pruned weight, solved by at most k conjugate-gradient steps.

In ``oneshot`` each Fisher method's line also gives the scale of its estimate over the pruned weights
(mean, median, max of F, or of 1/Q_qq = the damped Fisher FishLeg's Q implies), to set a damping against.

"Δ vs magnitude" in the table is each method's accuracy minus ``magnitude_layer``'s at the same target
(``magnitude_global`` is shown as its own row). The dense baseline trains the same way with no pruning.

The data are the JPEG copy of CIFAR-10 in ``../shared/data``; the archive is extracted once into a
temporary directory unless ``--data-dir`` points at an extracted copy. Accuracy is on the whole test
split (10,000 images) after the last epoch (gradual) or right after the prune (oneshot).

    python benchmarks/sparsity_sweep.py                     # CPU proxy: width 16, 500 images/class
    python benchmarks/sparsity_sweep.py --width 4 --max-per-class 20 --epochs 3   # smoke test (minutes)
    python benchmarks/sparsity_sweep.py --mode oneshot --sparsities 0.8,0.9,0.95,0.98   # one-shot, no fine-tuning
    python benchmarks/sparsity_sweep.py --prune-every-steps 13 --methods fishleg,fishleg_obs   # 3 prunes per epoch
    python benchmarks/sparsity_sweep.py --width 64 --max-per-class 0 --accelerator gpu --epochs 60 \\
        --prune-start 10 --prune-end 40                     # the full CIFAR ResNet18 on a GPU
"""

from __future__ import annotations

import argparse
import copy
import csv
import inspect
import logging
import os
import platform
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from lightning_fisher.callbacks import FisherPruning
from lightning_fisher.data import CIFAR10DataModule
from lightning_fisher.fisher import (
    EmpiricalFisher,
    FisherContext,
    FisherEstimator,
    FishLegFisher,
    KroneckerFisher,
    RepeatablePasses,
    Squisher,
    stream_preserved,
)
from lightning_fisher.fisher.fishleg import FVP_METHODS, REFRESH_MATCHES
from lightning_fisher.models import ResNet18
from lightning_fisher.module import ImageClassifier
from lightning_fisher.optim import AdaFisherW
from lightning_fisher.pruning import Pruner
from lightning_fisher.pruning.schedules import cubic_sparsity
from lightning_fisher.pruning.selection import select_parameters

__all__ = [
    "METHODS",
    "MODES",
    "Dense",
    "PruneInputs",
    "Run",
    "adafisher_settings",
    "estimate",
    "evaluate",
    "fishleg_estimator",
    "format_table",
    "lightning_amount",
    "main",
    "parse_args",
    "prune_one_shot",
    "train_dense",
    "train_one",
]

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
METHODS: tuple[str, ...] = (
    "magnitude_layer", "magnitude_global", "lightning_l1", "squisher", "empirical", "kronecker",
    "fishleg", "fishleg_obs",
)
MODES: tuple[str, ...] = ("gradual", "oneshot")
ADAFISHER_METHODS = ("kronecker", "dense_adafisher")
BASELINE = "magnitude_layer"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="gradual",
                        help="gradual: train+prune+fine-tune per run; oneshot: prune one trained dense model, no fine-tuning")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="an extracted CIFAR-10 (default: extract --archive into a temporary directory)")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="the CIFAR-10 JPEG archive")
    parser.add_argument("--width", type=int, default=16, help="ResNet18 width (64 = the full 11.17M-parameter model)")
    parser.add_argument("--max-per-class", type=int, default=500, help="training images per class (0 = all 5,000)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of every run (oneshot: of the dense model)")
    parser.add_argument("--prune-start", type=int, default=None,
                        help="epoch of the first prune (sparsity 0 there); default: epochs // 5 (gradual only)")
    parser.add_argument("--prune-end", type=int, default=None,
                        help="epoch where the target is reached; default: epochs * 3 // 4 (must be < epochs; gradual only)")
    parser.add_argument("--prune-every-steps", type=int, default=0,
                        help="prune every k optimizer steps between --prune-start and --prune-end (same cubic ramp, "
                             "unit='step'); default 0: once per epoch (gradual only, not with lightning_l1)")
    parser.add_argument("--sparsities", default="0.9,0.95,0.98", help="comma-separated unstructured targets")
    parser.add_argument("--patterns", default="2:4", help="comma-separated N:M patterns ('' for none)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--no-dense", action="store_true",
                        help="skip the dense baseline run (gradual only: oneshot needs the dense model)")
    parser.add_argument("--fisher-samples", type=int, default=1024, help="EmpiricalFisher num_samples")
    parser.add_argument("--fisher-damping", type=float, default=0.0,
                        help="FisherPruning fisher_damping of the OBD methods (all Fisher methods but fishleg_obs): "
                             "scores θ²(F + δ·mean F)/2; 0 = plain OBD")
    parser.add_argument("--fishleg-pretrain", type=int, default=50,
                        help="FishLegFisher pretrain_steps: auxiliary updates before the first prune")
    parser.add_argument("--fishleg-damping", type=float, default=None,
                        help="FishLegFisher damping γ of fishleg/fishleg_obs (default: FishLegFisher's); oneshot prints "
                             "the Fisher's scale to set it against")
    parser.add_argument("--fishleg-lr", type=float, default=None,
                        help="FishLegFisher lr: Adam's learning rate on λ (default: FishLegFisher's)")
    parser.add_argument("--fishleg-fvp", choices=FVP_METHODS, default=None,
                        help="FishLegFisher fvp: the Fisher-vector product Q learns with (default: FishLegFisher's)")
    parser.add_argument("--fishleg-refresh", action="store_true",
                        help="FishLegFisher refresh_diagonal=True: Q's diagonal rescaled to the current Fisher at every prune")
    parser.add_argument("--fishleg-relative-damping", action="store_true",
                        help="FishLegFisher relative_damping=True: --fishleg-damping is δ, γ = δ × the mean Fisher of the "
                             "pruned weights, retaken at every refresh")
    parser.add_argument("--fishleg-refresh-match", choices=REFRESH_MATCHES, default="inverse",
                        help="FishLegFisher refresh_match: 'inverse' (diag Q = 1/(F + γ)) or 'fisher' (diag Q⁻¹ = F + γ, "
                             "keeping the correlations' OBS discount); only with --fishleg-refresh")
    parser.add_argument("--fishleg-diagonal", choices=("init", "empirical"), default="init",
                        help="FishLegFisher diagonal_source: 'init' (none: the Squisher from AdamW's state) or 'empirical' "
                             "(EmpiricalFisher(num_samples=--fisher-samples), a fresh estimate for Q₀ and every refresh)")
    parser.add_argument("--fishleg-heldout", type=int, default=0,
                        help="oneshot: FishLeg's held-out auxiliary loss (FishLegFisher.auxiliary_loss, measured with "
                             "the exact batch Fisher, fvp='ggn') on this many unaugmented training batches, before and "
                             "after Q learns (0 = off)")
    parser.add_argument("--obs-iterations", type=int, default=0,
                        help="FisherPruning obs_iterations of fishleg_obs: 0 = independent-weights OBS update, "
                             "k > 0 = the joint update by at most k conjugate-gradient steps")
    parser.add_argument("--fishleg-update-every", type=int, default=10,
                        help="FishLegFisher update_every: an auxiliary update every this many training steps (gradual)")
    parser.add_argument("--bn-recalibrate", type=int, default=0,
                        help="oneshot: re-estimate BatchNorm statistics on this many training batches after the prune "
                             "(0 = test with the dense model's running statistics)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--adafisher-lr", type=float, default=None,
                        help="kronecker/dense_adafisher: AdaFisherW's lr (default: AdaFisherW's own)")
    parser.add_argument("--adafisher-damping", type=float, default=None,
                        help="kronecker/dense_adafisher: AdaFisherW's damping (default: AdaFisherW's own)")
    parser.add_argument("--adafisher-weight-decay", type=float, default=None,
                        help="kronecker/dense_adafisher: AdaFisherW's decoupled decay (default: AdaFisherW's own)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto")
    parser.add_argument("--precision", default="32-true",
                        help="Lightning precision of training, e.g. bf16-mixed on a GPU (oneshot estimates and tests in fp32)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None,
                        help="also write the results: .csv (one row per run) or .md (the table)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs ({args.epochs}): must be >= 1")
    args.prune_start = args.epochs // 5 if args.prune_start is None else args.prune_start
    args.prune_end = args.epochs * 3 // 4 if args.prune_end is None else args.prune_end
    if args.mode == "gradual" and not 0 <= args.prune_start < args.prune_end < args.epochs:
        parser.error(f"need 0 <= --prune-start ({args.prune_start}) < --prune-end ({args.prune_end}) "
                     f"< --epochs ({args.epochs}), so the last prune is followed by training")
    if args.prune_every_steps < 0:
        parser.error(f"--prune-every-steps ({args.prune_every_steps}): must be >= 0 (0 = once per epoch)")
    if args.prune_every_steps and args.mode != "gradual":
        parser.error(f"--prune-every-steps ({args.prune_every_steps}): only in --mode gradual")
    if args.prune_every_steps and "lightning_l1" in args.methods:
        parser.error(f"--prune-every-steps ({args.prune_every_steps}): lightning_l1 (ModelPruning) prunes at "
                     "epoch ends only; leave it out of --methods")
    if args.fishleg_pretrain < 0:
        parser.error(f"--fishleg-pretrain ({args.fishleg_pretrain}): must be >= 0")
    if args.fishleg_update_every < 1:
        parser.error(f"--fishleg-update-every ({args.fishleg_update_every}): must be >= 1")
    if args.fishleg_damping is not None and not 0.0 < args.fishleg_damping < float("inf"):
        parser.error(f"--fishleg-damping ({args.fishleg_damping}): must be a finite number > 0")
    if args.fishleg_lr is not None and not 0.0 < args.fishleg_lr < float("inf"):
        parser.error(f"--fishleg-lr ({args.fishleg_lr}): must be a finite number > 0")
    if args.fishleg_refresh_match != "inverse" and not args.fishleg_refresh:
        parser.error(f"--fishleg-refresh-match {args.fishleg_refresh_match}: only with --fishleg-refresh")
    if args.fishleg_heldout < 0:
        parser.error(f"--fishleg-heldout ({args.fishleg_heldout}): must be >= 0")
    if args.fishleg_heldout and args.mode != "oneshot":
        parser.error(f"--fishleg-heldout ({args.fishleg_heldout}): only in --mode oneshot")
    if args.obs_iterations < 0:
        parser.error(f"--obs-iterations ({args.obs_iterations}): must be >= 0")
    if args.bn_recalibrate < 0:
        parser.error(f"--bn-recalibrate ({args.bn_recalibrate}): must be >= 0")
    if not 0.0 <= args.fisher_damping < float("inf"):
        parser.error(f"--fisher-damping ({args.fisher_damping}): must be a finite number >= 0")
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
    """One result: a method at a target (``"dense"``, ``"0.95"`` or ``"2:4"``).

    ``seconds`` is the training time (gradual, and the dense rows) or the prune time (oneshot: the
    method's shared Fisher estimate is counted in the first target's row only).
    """

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


def fishleg_estimator(args: argparse.Namespace) -> FishLegFisher:
    """``FishLegFisher`` with the sweep's ``pretrain_steps``, ``update_every``, damping, lr and product
    (``--fishleg-damping``, ``--fishleg-lr``, ``--fishleg-fvp``, else its defaults), ``relative_damping``
    (``--fishleg-relative-damping``), ``refresh_diagonal`` (``--fishleg-refresh``), ``refresh_match``
    (``--fishleg-refresh-match``), ``diagonal_source`` (``--fishleg-diagonal``), default conv_form."""
    given = {"damping": args.fishleg_damping, "lr": args.fishleg_lr, "fvp": args.fishleg_fvp}
    chosen = {name: value for name, value in given.items() if value is not None}
    source = EmpiricalFisher(num_samples=args.fisher_samples) if args.fishleg_diagonal == "empirical" else None
    return FishLegFisher(pretrain_steps=args.fishleg_pretrain, update_every=args.fishleg_update_every,
                         refresh_diagonal=args.fishleg_refresh, relative_damping=args.fishleg_relative_damping,
                         refresh_match=args.fishleg_refresh_match, diagonal_source=source, **chosen)


def fisher_scale(diagonal: dict[str, Tensor], name: str = "F") -> str:
    """Mean, median and maximum of a diagonal over all pruned weights (to set a damping against)."""
    values = torch.cat([d.detach().flatten().float().cpu() for d in diagonal.values()])
    return f"{name} mean {values.mean():.2e} median {values.median():.2e} max {values.max():.2e}"


def _pruned_weights(model: nn.Module) -> dict[str, torch.nn.Parameter]:
    return select_parameters(model)  # the same selection as FisherPruning's defaults (stem, fc dense)


def _estimator(method: str, args: argparse.Namespace) -> tuple[FisherEstimator, bool] | None:
    """The estimator and ``compensate`` flag of a Fisher method; ``None`` for the others."""
    if method == "squisher":
        return Squisher(), False
    if method == "empirical":
        return EmpiricalFisher(num_samples=args.fisher_samples), False
    if method == "kronecker":
        return KroneckerFisher(), False
    if method in ("fishleg", "fishleg_obs"):
        return fishleg_estimator(args), method == "fishleg_obs"
    return None


def _fisher_options(compensate: bool, args: argparse.Namespace) -> dict[str, float | int]:
    """``--fisher-damping`` for an OBD method; ``--obs-iterations`` for OBS (``fishleg_obs``, Q is damped already)."""
    return {"obs_iterations": args.obs_iterations} if compensate else {"fisher_damping": args.fisher_damping}


def _shape(target: str) -> dict[str, object]:
    return {"pattern": target} if ":" in target else {"pattern": "unstructured", "target_sparsity": float(target)}


def _schedule(args: argparse.Namespace) -> dict[str, object]:
    """FisherPruning's schedule arguments: once per epoch, or every ``--prune-every-steps`` optimizer steps.

    In steps, the ramp spans the same training: from the first step of epoch ``--prune-start`` to the
    first of epoch ``--prune-end`` (``args.steps_per_epoch``, set by ``main`` from the data loader).
    """
    if not args.prune_every_steps:
        return {"schedule": "gradual", "start_epoch": args.prune_start, "end_epoch": args.prune_end,
                "frequency": 1, "verbose": False}
    steps = args.steps_per_epoch
    return {"schedule": "gradual", "unit": "step", "start_epoch": args.prune_start * steps,
            "end_epoch": args.prune_end * steps, "frequency": args.prune_every_steps, "verbose": False}


def _callbacks(method: str, target: str, model: ImageClassifier, args: argparse.Namespace) -> list[Callback] | None:
    """The pruning callback of ``method`` at ``target``; ``None`` when the method cannot do it."""
    if method in ("dense", "dense_adafisher"):
        return []
    nm = ":" in target
    schedule = _schedule(args)
    shape = _shape(target)
    if method == "magnitude_layer":
        return [FisherPruning(criterion="magnitude", scope="layer", **shape, **schedule)]
    if method == "magnitude_global":
        return [FisherPruning(criterion="magnitude", scope="global", **shape, **schedule)]
    fisher = _estimator(method, args)
    if fisher is not None:
        estimator, compensate = fisher
        return [FisherPruning(criterion="fisher", estimator=estimator, scope="global", compensate=compensate,
                              **_fisher_options(compensate, args), **shape, **schedule)]
    if method == "lightning_l1":
        if nm:
            return None
        modules = dict(model.named_modules())
        params = [(modules[name.rsplit(".", 1)[0]], "weight") for name in _pruned_weights(model)]
        return [ModelPruning("l1_unstructured", parameters_to_prune=params,
                             amount=lightning_amount(float(target), args.prune_start, args.prune_end),
                             use_global_unstructured=True, make_pruning_permanent=True, verbose=0)]
    raise ValueError(f"method={method!r}: must be one of {METHODS} or 'dense'")


def _sparsity(model: nn.Module) -> float:
    weights = list(_pruned_weights(model).values())
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def adafisher_settings(args: argparse.Namespace) -> dict[str, float]:
    """AdaFisherW's keyword arguments: the ``--adafisher-*`` options that were given."""
    given = {"lr": args.adafisher_lr, "damping": args.adafisher_damping, "weight_decay": args.adafisher_weight_decay}
    return {name: value for name, value in given.items() if value is not None}


def _model(method: str, args: argparse.Namespace) -> ImageClassifier:
    L.seed_everything(args.seed, verbose=False)
    epochs = args.epochs
    net = ResNet18(num_classes=10, width=args.width)
    if method in ADAFISHER_METHODS:
        def optimizer(params):  # noqa: ANN001, ANN202 - ImageClassifier's factory
            return AdaFisherW(params, model=net, **adafisher_settings(args))
    else:
        def optimizer(params):  # noqa: ANN001, ANN202
            return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return ImageClassifier(
        net,
        num_classes=10,
        optimizer=optimizer,
        scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs),
    )


def _fit(model: ImageClassifier, callbacks: list[Callback], data: CIFAR10DataModule,
         args: argparse.Namespace) -> tuple[L.Trainer, float]:
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, devices=1, precision=args.precision,
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, deterministic=False,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return trainer, time.perf_counter() - start


def train_one(method: str, target: str, data: CIFAR10DataModule, args: argparse.Namespace) -> Run:
    """Train a fresh seeded model with ``method`` pruning to ``target``; test accuracy after the last epoch."""
    model = _model(method, args)
    callbacks = _callbacks(method, target, model, args)
    if callbacks is None:
        return Run(method, target)
    trainer, seconds = _fit(model, callbacks, data, args)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    return Run(method, target, float(metrics["test/acc"]), _sparsity(model), seconds)


# ------------------------------------------------------------------------------------------ one-shot
@dataclass
class Dense:
    """A trained dense network, its optimizer (with its state) and where to run it."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    seconds: float = 0.0


@dataclass
class PruneInputs:
    """What ``Pruner.step`` needs from an estimator: a diagonal Fisher, or Q's diagonal and product."""

    fisher: dict[str, Tensor] | None = None
    inverse_diag: dict[str, Tensor] | None = None
    inverse_product: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
    seconds: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)


def _device(args: argparse.Namespace) -> torch.device:
    if args.accelerator in ("gpu", "cuda") or (args.accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, Tensor) and key != "step":
                state[key] = value.to(device)


def train_dense(method: str, data: CIFAR10DataModule, args: argparse.Namespace) -> Dense:
    """Train the dense model of ``method`` (``"dense"``: AdamW, ``"dense_adafisher"``: AdaFisherW)."""
    model = _model(method, args)
    trainer, seconds = _fit(model, [], data, args)
    device = _device(args)
    net = model.net.to(device)  # Lightning's teardown may have moved it back to the CPU
    optimizer = trainer.optimizers[0]
    _optimizer_to(optimizer, device)
    return Dense(net, optimizer, device, model.loss, seconds)


def _batches(data: CIFAR10DataModule, device: torch.device, train: bool = True) -> Callable[[], Iterator[tuple[Tensor, Tensor]]]:
    """Fresh iterators of training batches on ``device``, augmented (``train``) and normalised as in training."""

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in data.train_dataloader():
            yield data.transform_batch(images.to(device), train=train), labels.to(device)

    return batches


@torch.no_grad()
def evaluate(net: nn.Module, data: CIFAR10DataModule, device: torch.device) -> float:
    """Top-1 accuracy on the whole test split, in eval mode (BatchNorm's running statistics)."""
    net.eval()
    correct = total = 0
    for images, labels in data.test_dataloader():
        logits = net(data.transform_batch(images.to(device), train=False))
        correct += int((logits.argmax(dim=1) == labels.to(device)).sum())
        total += labels.numel()
    return correct / total


@torch.no_grad()
def _recalibrate_bn(net: nn.Module, batches: Iterator[tuple[Tensor, Tensor]], count: int) -> None:
    """Re-estimate BatchNorm running statistics as plain averages over ``count`` training batches."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    for i, (images, _) in enumerate(batches):
        if i >= count:
            break
        net(images)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    net.eval()


def estimate(method: str, dense: Dense, data: CIFAR10DataModule, args: argparse.Namespace) -> PruneInputs:
    """The Fisher inputs of ``method``'s one-shot prune, from the dense model (restored afterwards).

    As in ``FisherPruning``, every pass over the training batches starts from the random state of the
    estimate's start, which the estimate puts back: every method, in any order, and every pass of one
    (FishLeg's pre-training, then its refreshed diagonal) read the same augmented batches."""
    fisher = _estimator(method, args)
    if fisher is None:
        return PruneInputs()
    preserve = partial(stream_preserved, dense.device, data.preserved_rng)
    batches = RepeatablePasses(_batches(data, dense.device), preserve)
    with preserve():
        try:
            return _estimate(fisher, dense, data, batches, args)
        finally:
            batches.close()


def _estimate(fisher: tuple[FisherEstimator, bool], dense: Dense, data: CIFAR10DataModule,
              batches: RepeatablePasses, args: argparse.Namespace) -> PruneInputs:
    estimator, compensate = fisher
    saved = {k: v.detach().clone() for k, v in dense.net.state_dict().items()}
    estimator.check(dense.optimizer)
    context = FisherContext(
        model=dense.net,
        parameters=_pruned_weights(dense.net),
        optimizer=dense.optimizer,
        batches=batches,
        loss_fn=dense.loss_fn,
        batch_size=args.batch_size,
        extra={"masks": {}},
    )
    dense.net.train()  # as FisherPruning sees the model: in training
    heldout = None
    if isinstance(estimator, FishLegFisher) and args.fishleg_heldout:
        # unaugmented batches: the same inputs before and after learning (common random numbers)
        heldout = FisherContext(model=dense.net, parameters=context.parameters, optimizer=dense.optimizer,
                                batches=_batches(data, dense.device, train=False), batch_size=args.batch_size)
        initial = estimator.auxiliary_loss(heldout, batches=args.fishleg_heldout, fvp="ggn")
    start = time.perf_counter()
    if compensate:
        inverse_diag = estimator.inverse_diagonal(context)
        inputs = PruneInputs(inverse_diag=inverse_diag, inverse_product=partial(estimator.inverse_product, context))
    else:
        fisher = estimator.diagonal(context)
        inputs = PruneInputs(fisher=fisher)
    inputs.seconds = time.perf_counter() - start
    inputs.extra["scale"] = (
        fisher_scale({k: 1 / q for k, q in inverse_diag.items()}, "1/Q_qq") if compensate else fisher_scale(fisher)
    )
    if isinstance(estimator, FishLegFisher):
        inputs.extra["fishleg_updates"] = estimator.updates
        if heldout is not None:
            learned = estimator.auxiliary_loss(heldout, batches=args.fishleg_heldout, fvp="ggn")
            inputs.extra["heldout_aux"] = f"{initial:.5f} -> {learned:.5f}"
    dense.net.load_state_dict(saved)
    dense.net.eval()
    return inputs


def prune_one_shot(method: str, target: str, dense: Dense, inputs: PruneInputs,
                   args: argparse.Namespace) -> nn.Module | None:
    """A deep copy of the dense net pruned once by ``method`` to ``target``; ``None`` when not applicable."""
    net = copy.deepcopy(dense.net)
    if method == "lightning_l1":
        if ":" in target:
            return None
        modules = dict(net.named_modules())
        params = [(modules[name.rsplit(".", 1)[0]], "weight") for name in _pruned_weights(net)]
        torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=float(target))
        for module, name in params:
            torch_prune.remove(module, name)
        return net
    if method in ("magnitude_layer", "magnitude_global"):
        pruner = Pruner(criterion="magnitude", scope="layer" if method == "magnitude_layer" else "global",
                        schedule="one_shot", start=0, **_shape(target))  # type: ignore[arg-type]
    elif _estimator(method, args) is not None:
        compensate = inputs.inverse_product is not None
        pruner = Pruner(criterion="fisher", scope="global", schedule="one_shot", start=0, compensate=compensate,
                        **_fisher_options(compensate, args), **_shape(target))  # type: ignore[arg-type]
    else:
        raise ValueError(f"method={method!r}: must be one of {METHODS}")
    pruner.prepare(net)
    event = pruner.step(0, inputs.fisher, inverse_diag=inputs.inverse_diag, inverse_product=inputs.inverse_product)
    if event is None:
        raise RuntimeError(f"{method} @ {target}: the one-shot pruner did not prune at position 0")
    return net


def run_oneshot(data: CIFAR10DataModule, targets: list[str], args: argparse.Namespace,
                report: Callable[[Run, str], None]) -> list[Run]:
    """Train the dense model(s), then prune a copy per method and target, test each with no fine-tuning."""
    runs: list[Run] = []
    trained = {"dense": train_dense("dense", data, args)}
    if "kronecker" in args.methods:
        trained["dense_adafisher"] = train_dense("dense_adafisher", data, args)
    for name, dense in trained.items():
        run = Run(name, "dense", evaluate(dense.net, data, dense.device), _sparsity(dense.net), dense.seconds)
        runs.append(run)
        report(run, "trained")
    for method in args.methods:
        dense = trained["dense_adafisher" if method == "kronecker" else "dense"]
        inputs = estimate(method, dense, data, args)
        note = f"estimate {inputs.seconds:.1f} s" + "".join(f", {k} {v}" for k, v in inputs.extra.items())
        shared = inputs.seconds
        for target in targets:
            start = time.perf_counter()
            net = prune_one_shot(method, target, dense, inputs, args)
            if net is None:
                run = Run(method, target)
            else:
                seconds = time.perf_counter() - start + shared
                if args.bn_recalibrate:
                    _recalibrate_bn(net, _batches(data, dense.device, train=False)(), args.bn_recalibrate)
                run = Run(method, target, evaluate(net, data, dense.device), _sparsity(net), seconds)
                shared = 0.0
            runs.append(run)
            report(run, note)
    return runs


# -------------------------------------------------------------------------------------------- report
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


def _budget(args: argparse.Namespace, train_images: int, test_images: int, steps: int) -> str:
    """The header's description of the run: mode, model, data, training, pruning, estimator settings."""
    training = (f"ResNet18(width={args.width}) on {train_images} training images "
                f"(max_per_class={args.max_per_class or 'all'}), tested on {test_images}; "
                f"{args.epochs} epochs x {steps} steps, batch {args.batch_size}, AdamW lr {args.lr:g} "
                f"wd {args.weight_decay:g}, cosine")
    if any(m in ADAFISHER_METHODS for m in args.methods):
        defaults = {name: p.default for name, p in inspect.signature(AdaFisherW).parameters.items()}
        settings = {**defaults, **adafisher_settings(args)}
        training += (f" (kronecker: AdaFisherW lr {settings['lr']:g} damping {settings['damping']:g} "
                     f"wd {settings['weight_decay']:g})")
    fishleg = [m for m in args.methods if m.startswith("fishleg")]
    if args.mode == "gradual":
        every = f"every {args.prune_every_steps} steps" if args.prune_every_steps else "every epoch"
        pruning = (f"mode gradual: every method trains from scratch, cubic pruning from epoch {args.prune_start} "
                   f"(0%) to epoch {args.prune_end} (target), {every}, then fine-tunes to epoch {args.epochs}")
        fishleg_text = repr(fishleg_estimator(args))
    else:
        bn = (f"BatchNorm recalibrated on {args.bn_recalibrate} training batches" if args.bn_recalibrate
              else "BatchNorm running statistics of the dense model (no recalibration)")
        pruning = (f"mode oneshot: one dense model trained (kronecker: one with AdaFisherW), each method prunes a "
                   f"copy once to the target, no fine-tuning; {bn}")
        fishleg_text = f"{fishleg_estimator(args)!r} (update_every unused: no training after the estimate)"
    parts = [training, pruning, f"EmpiricalFisher num_samples={args.fisher_samples}"]
    if args.fisher_damping:
        parts.append(f"OBD scores damped: fisher_damping={args.fisher_damping:g} (θ²(F + δ·mean F)/2)")
    if fishleg:
        parts.append(f"{','.join(fishleg)}: {fishleg_text}")
    if "fishleg_obs" in args.methods:
        form = f"joint, at most {args.obs_iterations} CG steps" if args.obs_iterations else "independent weights"
        parts.append(f"fishleg_obs OBS update: {form}")
    return "; ".join(parts) + f"; seed {args.seed}"


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


def _write(path: Path, runs: list[Run], header: str, table: str, mode: str = "gradual") -> None:
    if path.suffix == ".csv":
        seconds = "train_seconds" if mode == "gradual" else "seconds"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["method", "target", "test_acc", "achieved_sparsity", seconds])
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
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
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
        args.steps_per_epoch = steps
        budget = _budget(args, len(data.train_set), len(data.test_set), steps)
        print(f"budget: {budget}", flush=True)
        total = time.perf_counter()
        if args.mode == "oneshot":
            count = [0]
            planned = len(args.methods) * len(targets) + 1 + ("kronecker" in args.methods)

            def report(run: Run, note: str) -> None:
                count[0] += 1
                acc = "n/a" if run.accuracy is None else f"test acc {run.accuracy:.4f}, sparsity {run.sparsity:.4f}"
                print(f"[{count[0]}/{planned}] {run.method} @ {run.target}: {acc} ({run.seconds:.1f} s; {note})",
                      flush=True)

            runs = run_oneshot(data, targets, args, report)
        else:
            dense = [("dense", "dense")] + ([("dense_adafisher", "dense")] if "kronecker" in args.methods else [])
            plan = ([] if args.no_dense else dense) + [(m, t) for t in targets for m in args.methods]
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
        _write(args.output, runs, header, table, args.mode)


if __name__ == "__main__":
    main()
