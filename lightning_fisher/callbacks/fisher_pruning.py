"""``FisherPruning``: the Lightning adapter of :class:`lightning_fisher.pruning.Pruner`.

Hooks and what each does (one core call each):

- ``on_fit_start``: select the weights and create the masks (``Pruner.prepare``), check the estimator
  against the optimizer (``FisherEstimator.check``), and attach the mask to the optimizer.
- ``on_train_epoch_start`` (``unit="epoch"``) / ``on_train_batch_start`` (``unit="step"``, and as a
  safety net for epochs): prune when a prune is due (``Pruner.step``).
- after every real ``optimizer.step()``: re-apply the masks (``Pruner.apply_`` via
  ``torch.optim.Optimizer.register_step_post_hook``). This runs after gradient clipping and the step
  itself, only on steps that happen: not on gradient-accumulation micro-batches, and not on steps that
  AMP's ``GradScaler`` skips (the weights do not change then). ``on_before_zero_grad`` would be wrong:
  Lightning calls it inside the closure after the next ``training_step`` forward, and
  ``on_train_batch_end`` runs on every micro-batch rather than after every step.
- ``on_train_batch_end``, after a real optimizer step (flagged by the same step post-hook): call the
  estimator's optional ``on_train_step`` (``FisherEstimator.on_train_step``; FishLeg learns its inverse
  Fisher there) with the step's batch first in the context's batches (then fresh training batches, for
  an estimate that needs more than one batch) and the current masks, and log the metrics it returns
  (``fishleg/aux_loss``, ``fishleg/diag_agreement``). Skipped for estimators that do not override it.
- around every estimate (at a prune, in the step hook): torch's generators and the datamodule's own
  (``preserved_rng()``, which ImageDataModule offers for its augmentation) are restored afterwards, so
  the batches an estimate draws leave the batches training sees unchanged, whatever the criterion; and
  every pass over the context's batches starts from that same state, so an estimate that reads them
  twice (FishLeg's pre-training, then its refresh) sees in each pass what a one-pass estimate sees.
- ``on_train_epoch_end``: log ``pruning/target_sparsity`` and ``pruning/sparsity``.
- with ``sparse_kernels=True`` and an N:M pattern, once the last prune is done: swap the N:M layers for
  the sparse modules of :mod:`lightning_fisher.sparse` (``sparsify_training_``, which moves the
  optimizer state onto the kept values), so fine-tuning runs the sparse kernels and keeps the pattern
  by construction; ``on_save_checkpoint`` writes checkpoints in the dense layout
  (``densify_checkpoint_``), and ``on_train_start`` of a resumed run swaps again.

Starting from a dense checkpoint (``trainer.fit(ckpt_path=...)`` of a run of the same model and
optimizer without this callback): the checkpoint holds no state for it, so the callback starts fresh at
the restored position (``start_epoch`` counts absolute epochs); a learning estimator such as
``FishLegFisher`` initialises from the restored optimizer state and can be given ``pretrain_steps``
to learn before its first prune.

Pruning at position t happens before training epoch (or optimizer step) t: ``start_epoch=0`` prunes
the initial model. With ``criterion="fisher"`` and an estimator that reads optimizer state (the
Squisher: ``requires_data=False``), there is no Fisher before the first optimizer step, so a schedule
that would remove weights at position 0 is an error at ``on_fit_start``; the gradual schedule with
``initial_sparsity=0`` removes nothing at ``start_epoch`` and is always fine.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

from lightning_fisher.fisher.base import FisherContext, FisherEstimator
from lightning_fisher.fisher.passes import RepeatablePasses, stream_preserved
from lightning_fisher.pruning.pruner import PruneEvent, Pruner
from lightning_fisher.pruning.schedules import UNITS, Unit
from lightning_fisher.pruning.scores import CRITERIA, Criterion

__all__ = ["FisherPruning"]

log = logging.getLogger(__name__)

STATE_VERSION = 1
SPARSE_BACKENDS: tuple[str, ...] = ("auto", "triton", "cusparselt")  # lightning_fisher.sparse.convert.BACKENDS


class FisherPruning(Callback):
    """Prune a model during training with Fisher (OBD/OBS), magnitude or random scores.

    Implements gradual pruning (Zhu & Gupta 2017) with Optimal Brain Damage scores θ²F/2 (LeCun et al.
    1990) from a diagonal Fisher, by default the free Squisher of "Fishers for Free?" (Li et al., ICML
    2025); one-shot and iterative (Han et al. 2015) schedules; unstructured (per layer or global) and
    N:M masks; OBS compensation (Hassibi & Stork 1993) with estimators that offer an inverse Fisher.

    Masks live in this callback (``masks``, boolean tensors keyed by parameter FQN) and in its checkpoint
    state, never in the model: weights stay plain ``nn.Parameter``s with zeros in place, so checkpoints
    load without the callback, and ``torch.compile``, DDP and ``copy.deepcopy`` are unaffected.

    Args:
        target_sparsity: final fraction of pruned weights among the pruned layers, in [0, 1). Required
            for ``pattern="unstructured"``; for ``"N:M"`` the pattern fixes it at (M − N)/M, so leave
            it ``None`` (or give exactly that value).
        estimator: the Fisher estimator for ``criterion="fisher"``; ``None`` means ``Squisher()``.
            Giving one with another criterion is an error (it would not be used).
        criterion: ``"fisher"``, ``"magnitude"`` (|θ|) or ``"random"``.
        pattern: ``"unstructured"`` or ``"N:M"`` (0 < N < M), groups along the input dimension.
        scope: ``"global"`` (one threshold over all pruned layers) or ``"layer"`` (same sparsity each).
        schedule: ``"gradual"`` (cubic), ``"one_shot"`` or ``"iterative"``.
        start_epoch: first pruning position (in optimizer steps when ``unit="step"``).
        end_epoch: position where ``gradual`` reaches the target (steps when ``unit="step"``).
        frequency: positions between prunes (``gradual``, ``iterative``).
        unit: ``"epoch"`` or ``"step"`` (optimizer steps, i.e. ``trainer.global_step``).
        initial_sparsity: sparsity at ``start_epoch`` (gradual) or before the first cycle (iterative).
        iterative_fraction: fraction of the remaining weights removed per iterative cycle.
        include, exclude: ``fnmatch`` patterns on module or parameter FQNs (see ``select_parameters``).
        keep_first_dense, keep_last_dense: keep the stem conv and the classifier (last Linear) dense.
        seed: seed of the ``random`` criterion.
        compensate: apply the OBS update to the survivors (needs ``estimator.supports_inverse``).
        sparse_kernels: with an ``"N:M"`` pattern, swap the pruned N:M layers for ``NMSparseLinear``/
            ``NMSparseConv2d`` once the masks are final, and fine-tune through the sparse kernels. The
            optimizer keeps its state (moved onto the kept values), checkpoints stay in the dense layout
            (they load without this callback), and a resumed run swaps again. Single process only (DDP
            registers parameters when it wraps the model); convert before ``torch.compile``.
        sparse_backend: ``"auto"``, ``"triton"`` or ``"cusparselt"`` (see ``lightning_fisher.sparse``).
        verbose: log one line per prune (rank zero).
        min_layer_density: layer-collapse guard (Tanaka et al. 2020) for ``scope="global"`` with the
            unstructured pattern, a float in [0, 1): every pruned layer keeps at least
            ``max(1, ceil(min_layer_density·numel))`` of its highest-scoring weights, and the global
            threshold still prunes exactly ``round(s·total)`` in all (never un-pruning; a layer already
            below its floor keeps what it has). Layers held at their floor are logged at each prune.
            ``0`` disables it (the masks of earlier versions). Ignored with ``scope="layer"`` (every
            layer keeps 1 − s anyway) and with N:M (every group keeps N of M). Floors the target cannot
            leave room for are a ``ValueError`` at ``on_fit_start``, before any training.
        fisher_damping: relative damping δ ≥ 0 of the diagonal Fisher in the OBD score:
            ρ = θ²(F + δ·mean F)/2, the mean taken at each prune over every weight of the pruned layers
            (masked ones included). ``0`` (default) is plain OBD; large δ tends to global magnitude
            ranking. Only with ``criterion="fisher"`` and ``compensate=False`` (an inverse Fisher carries
            its own damping); elsewhere an error.
        obs_iterations: with ``compensate``, ``0`` (default) applies the independent-weights OBS update
            −Q[(θ ⊙ 1_S) ⊘ diag Q]; ``k > 0`` the joint update −Q E_T (Q_TT)⁻¹ θ_T over every pruned weight,
            by at most k conjugate-gradient steps (k products with Q per prune). Elsewhere an error.

    Example::

        FisherPruning(estimator=Squisher(), target_sparsity=0.95, pattern="unstructured",
                      scope="global", start_epoch=10, end_epoch=40, frequency=1)
    """

    def __init__(
        self,
        target_sparsity: float | None = None,
        estimator: FisherEstimator | None = None,
        criterion: Criterion = "fisher",
        pattern: str = "unstructured",
        scope: Literal["layer", "global"] = "global",
        schedule: Literal["gradual", "one_shot", "iterative"] = "gradual",
        start_epoch: int = 0,
        end_epoch: int | None = None,
        frequency: int = 1,
        unit: Unit = "epoch",
        initial_sparsity: float = 0.0,
        iterative_fraction: float = 0.2,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        keep_first_dense: bool = True,
        keep_last_dense: bool = True,
        seed: int = 0,
        compensate: bool = False,
        sparse_kernels: bool = False,
        sparse_backend: str = "auto",
        verbose: bool = True,
        min_layer_density: float = 0.01,
        fisher_damping: float = 0.0,
        obs_iterations: int = 0,
    ) -> None:
        if unit not in UNITS:
            raise ValueError(f"unit={unit!r}: must be one of {UNITS}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion={criterion!r}: must be one of {CRITERIA}")
        if not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch={start_epoch!r}: must be a non-negative integer")
        if schedule == "gradual":
            if end_epoch is None:
                raise ValueError("end_epoch=None: the gradual schedule needs end_epoch > start_epoch")
            if not isinstance(end_epoch, int) or end_epoch <= start_epoch:
                raise ValueError(f"end_epoch={end_epoch!r}: must be an integer greater than start_epoch={start_epoch}")
        if isinstance(include, str) or isinstance(exclude, str):
            raise TypeError(f"include={include!r}, exclude={exclude!r}: must be lists of patterns, not strings")
        if criterion == "fisher":
            if estimator is None:
                from lightning_fisher.fisher.squisher import Squisher

                estimator = Squisher()
            if not isinstance(estimator, FisherEstimator):
                raise TypeError(f"estimator={estimator!r}: must be a FisherEstimator")
            if compensate and not estimator.supports_inverse:
                raise ValueError(
                    f"compensate=True: estimator={estimator!r} offers no inverse Fisher; diagonal estimators "
                    "prune with OBD and no compensation (use compensate=False)"
                )
        elif compensate:
            raise ValueError(f"compensate=True: needs criterion='fisher', got criterion={criterion!r}")
        elif estimator is not None:
            raise ValueError(
                f"estimator={estimator!r}: only criterion='fisher' uses an estimator, got criterion={criterion!r} "
                "(drop the estimator, or use criterion='fisher')"
            )
        if not isinstance(sparse_kernels, bool):
            raise TypeError(f"sparse_kernels={sparse_kernels!r}: must be True or False")
        if sparse_backend not in SPARSE_BACKENDS:
            raise ValueError(f"sparse_backend={sparse_backend!r}: must be one of {SPARSE_BACKENDS}")
        self.pruner = Pruner(
            target_sparsity=target_sparsity,
            criterion=criterion,
            pattern=pattern,
            scope=scope,
            schedule=schedule,
            start=start_epoch,
            end=end_epoch,
            frequency=frequency,
            initial_sparsity=initial_sparsity,
            iterative_fraction=iterative_fraction,
            include=include,
            exclude=exclude,
            keep_first_dense=keep_first_dense,
            keep_last_dense=keep_last_dense,
            seed=seed,
            compensate=compensate,
            min_layer_density=min_layer_density,
            fisher_damping=fisher_damping,
            obs_iterations=obs_iterations,
        )
        self.estimator = estimator if criterion == "fisher" else None
        self.criterion = criterion
        self.unit = unit
        self.verbose = verbose
        self.include = None if include is None else list(include)
        self.exclude = list(exclude)
        self.pattern = str(self.pruner.pattern)
        if sparse_kernels and self.pattern == "unstructured":
            raise ValueError(f"sparse_kernels=True: needs an 'N:M' pattern, got pattern={pattern!r}")
        self.sparse_kernels = sparse_kernels
        self.sparse_backend = sparse_backend
        self._swapped = False
        self._handles: list[RemovableHandle] = []
        self._metric_prefix = "pruning/"
        self._first_batch_size: int | None = None
        self._stepped = False

    # ------------------------------------------------------------ public view
    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, pattern=self.pattern)

    @property
    def masks(self) -> dict[str, Tensor]:
        """``{fqn: bool tensor}``, True = kept, for the pruned parameters (empty before ``fit``)."""
        return self.pruner.masks

    @property
    def scheduled_sparsity(self) -> float:
        """The schedule's target sparsity of the pruned weights at the current position."""
        last = self.pruner.position.last_pruned
        return 0.0 if last is None else self.pruner.scheduled_sparsity(last)

    @property
    def sparsity(self) -> float:
        """The achieved sparsity of the pruned weights."""
        return self.pruner.sparsity() if self.pruner.prepared else 0.0

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.sparse_kernels and trainer.world_size > 1:
            raise ValueError(
                f"sparse_kernels=True: runs in a single process only, got world_size={trainer.world_size} "
                "(DDP registers the parameters when it wraps the model; swapping layers afterwards breaks "
                "its gradient sync). Fine-tune with sparse_kernels=False, then convert with to_sparse"
            )
        mine = [cb for cb in trainer.callbacks if isinstance(cb, FisherPruning)]
        self._metric_prefix = "pruning/" if len(mine) <= 1 else f"pruning/{mine.index(self)}/"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._prepared_for(pl_module):
            self.pruner.prepare(pl_module)
        if self.estimator is not None:
            self.estimator.check(self._optimizer(trainer))
            self._check_fisher_before_first_step()
        self._attach(trainer)
        self.pruner.apply_()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not in on_fit_start: counting the optimizer steps of max_epochs needs the train loader, and loading
        # it before Lightning restores the checkpoint's loop state would drop a resumable loader's position.
        self._warn_if_schedule_outlasts_training(trainer)
        if self._swapped:  # resumed after the swap: the checkpoint was dense, the optimizer state too
            self._swap(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.unit == "epoch":
            self._maybe_prune(trainer, pl_module, trainer.current_epoch)
            self._maybe_swap(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._first_batch_size is None:
            self._first_batch_size = _batch_size_of(batch)
        position = trainer.global_step if self.unit == "step" else trainer.current_epoch
        self._maybe_prune(trainer, pl_module, position)
        self._maybe_swap(trainer, pl_module, position)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._stepped or self.estimator is None or self._swapped:
            return
        self._stepped = False
        current = (batch[0], batch[1])
        context = self._context(trainer, pl_module, batches=partial(_step_batches, current, trainer, pl_module))
        with _estimating(trainer, context):
            metrics = self.estimator.on_train_step(context, trainer.global_step)
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the values agree on every rank; sync_dist only keeps Lightning from warning under DDP
        for name, value in (("target_sparsity", self.scheduled_sparsity), ("sparsity", self.sparsity)):
            pl_module.log(f"{self._metric_prefix}{name}", value, on_step=False, on_epoch=True, sync_dist=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_handles()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._swapped:
            from lightning_fisher.sparse.training import densify_checkpoint_

            densify_checkpoint_(checkpoint, pl_module, trainer.optimizers)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "unit": self.unit,
            "pruner": self.pruner.state_dict(),
            "estimator": self.estimator.state_dict() if self.estimator is not None else {},
            "sparse_kernels_swapped": self._swapped,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"FisherPruning state version {state_dict.get('version')!r}: expected {STATE_VERSION}")
        if state_dict["unit"] != self.unit:
            raise ValueError(
                f"unit={self.unit!r}: the checkpoint's schedule position counts {state_dict['unit']!r}s"
            )
        self.pruner.load_state_dict(state_dict["pruner"])
        self._swapped = bool(state_dict.get("sparse_kernels_swapped", False))
        if self._swapped and not self.sparse_kernels:
            raise ValueError(
                "sparse_kernels=False: the checkpoint was written after the swap to sparse modules; resume "
                "with sparse_kernels=True (its layout is dense, so it loads anywhere without this callback)"
            )
        if self.estimator is not None:
            self.estimator.load_state_dict(state_dict.get("estimator", {}))

    # -------------------------------------------------------------- internals
    @property
    def _estimator_learns(self) -> bool:
        """Whether the estimator overrides the optional ``on_train_step`` hook."""
        return self.estimator is not None and type(self.estimator).on_train_step is not FisherEstimator.on_train_step

    def _mark_stepped(self, _optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        self._stepped = True

    def _prepared_for(self, pl_module: L.LightningModule) -> bool:
        if not self.pruner.prepared:
            return False
        own = {id(p) for p in pl_module.parameters()}
        return all(id(p) in own for p in self.pruner.parameters.values())

    def _holds_pruned(self, optimizer: torch.optim.Optimizer) -> bool:
        pruned = {id(p) for p in self.pruner.parameters.values()}
        return any(id(p) in pruned for group in optimizer.param_groups for p in group["params"])

    def _optimizer(self, trainer: L.Trainer) -> torch.optim.Optimizer | None:
        return next((opt for opt in trainer.optimizers if self._holds_pruned(opt)), None)

    def _attach(self, trainer: L.Trainer) -> None:
        """(Re-)register the mask re-application (and the learning estimator's step flag) on the
        optimizers that hold pruned weights."""
        self._remove_handles()
        for optimizer in trainer.optimizers:
            if self._holds_pruned(optimizer):
                self._handles.append(self.pruner.attach(optimizer))
                if self._estimator_learns:
                    self._handles.append(optimizer.register_step_post_hook(self._mark_stepped))

    def _remove_handles(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _check_fisher_before_first_step(self) -> None:
        if self.estimator is None or self.estimator.requires_data or self.pruner.position.last_pruned is not None:
            return
        first = next((p for p in self.pruner.schedule.positions() if self.pruner.schedule.level_at(p) > 0.0), None)
        if first == 0:
            raise ValueError(
                f"start_epoch=0: criterion='fisher' with {self.estimator!r} would prune at {self.unit} 0, before any "
                "optimizer step, when the optimizer holds no Fisher information yet. Start at 1 or later, use the "
                "gradual schedule with initial_sparsity=0 (nothing is removed at start_epoch), or an estimator "
                "that reads data (EmpiricalFisher)"
            )

    def _warn_if_schedule_outlasts_training(self, trainer: L.Trainer) -> None:
        last = self.pruner.schedule.last
        if self.unit == "epoch":
            limit, stop = trainer.max_epochs, f"max_epochs={trainer.max_epochs}"
        elif trainer.max_steps is not None and trainer.max_steps >= 0:
            limit, stop = trainer.max_steps, f"max_steps={trainer.max_steps}"
        else:  # bounded by epochs: Lightning counts the optimizer steps they make (the loader is set up by now)
            limit = trainer.estimated_stepping_batches
            stop = f"{limit:g} optimizer steps (max_epochs={trainer.max_epochs})"
        if limit is not None and 0 <= limit < math.inf and last >= limit:
            rank_zero_warn(
                f"FisherPruning: the last prune is at {self.unit} {last} but training stops at {stop}: "
                f"the target sparsity {self.pruner.target_sparsity:g} will not be reached"
            )

    def _maybe_prune(self, trainer: L.Trainer, pl_module: L.LightningModule, position: int) -> None:
        if not self.pruner.due(position):
            return
        fisher = inverse_diag = inverse_product = None
        if self.estimator is not None and self.pruner.needs_scores(position):
            if trainer.global_step == 0 and not self.estimator.requires_data:
                raise RuntimeError(
                    f"FisherPruning: {self.estimator!r} has no Fisher before the first optimizer step "
                    f"({self.unit} {position}); prune later or use a data-based estimator"
                )
            context = self._context(trainer, pl_module)
            with _estimating(trainer, context):
                if self.pruner.compensate:
                    inverse_diag = self._all_reduce(trainer, self.estimator.inverse_diagonal(context))
                    inverse_product = partial(self.estimator.inverse_product, context)
                else:
                    fisher = self._all_reduce(trainer, self.estimator.diagonal(context))
        sync = partial(trainer.strategy.broadcast, src=0) if trainer.world_size > 1 else None
        event = self.pruner.step(
            position, fisher, inverse_diag=inverse_diag, inverse_product=inverse_product, sync=sync
        )
        if event is None:
            return
        if trainer.world_size > 1 and self.pruner.compensate:
            self._broadcast_weights(trainer)
        if self.verbose:
            rank_zero_info(self._describe(event))

    def _maybe_swap(self, trainer: L.Trainer, pl_module: L.LightningModule, position: int) -> None:
        """Swap to the sparse modules once the schedule is over and its last prune has happened."""
        if not self.sparse_kernels or self._swapped or position < self.pruner.schedule.last or self.pruner.due(position):
            return
        self._swapped = True
        self._swap(trainer, pl_module)

    def _swap(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_fisher.sparse.convert import fqn_filter
        from lightning_fisher.sparse.training import sparsify_training_

        report = sparsify_training_(
            pl_module, trainer.optimizers, self.pattern, self.sparse_backend, fqn_filter(self.pruner.masks)
        )
        # The swapped weights left the model and the optimizer: re-masking them after every step would be
        # wasted work, so the step hooks stay only on optimizers that still hold a (dense) pruned weight.
        self._attach(trainer)
        if self.verbose:
            rank_zero_info(f"FisherPruning: sparse kernels for fine-tuning: {report.summary()}")

    def _all_reduce(self, trainer: L.Trainer, values: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.estimator is None or not self.estimator.needs_all_reduce or trainer.world_size <= 1:
            return values
        return {name: trainer.strategy.reduce(v, reduce_op="mean") for name, v in values.items()}

    def _broadcast_weights(self, trainer: L.Trainer) -> None:
        """After OBS compensation every rank takes rank 0's pruned weights and the biases OBS moved.

        The masks were synced before compensation; this keeps the weights identical even where the
        ranks' arithmetic differs in the last bits.
        """
        moved = {**self.pruner.parameters, **{n: self.pruner.coupled[n] for n in self.pruner.moved_coupled}}
        weights = trainer.strategy.broadcast({n: p.detach().cpu() for n, p in moved.items()}, src=0)
        with torch.no_grad():
            for name, param in moved.items():
                param.copy_(weights[name])
        self.pruner.apply_()

    def _describe(self, event: PruneEvent) -> str:
        return (
            f"FisherPruning: {self.unit}={event.position} target_sparsity={event.target_sparsity:.4f} "
            f"sparsity={event.sparsity:.4f} pruned={event.pruned}/{event.total} criterion={self.criterion} "
            f"pattern={self.pattern} scope={self.pruner.scope} layers={len(self.pruner.masks)}"
        )

    def _context(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batches: Callable[[], Iterator[tuple[Tensor, Tensor]]] | None = None,
    ) -> FisherContext:
        assert self.estimator is not None
        loss = getattr(pl_module, "loss", None)
        if batches is None and self.estimator.requires_data:
            batches = partial(_training_batches, trainer, pl_module)
        return FisherContext(
            model=pl_module,
            parameters=dict(self.pruner.parameters),
            optimizer=self._optimizer(trainer),
            batches=None if batches is None else RepeatablePasses(batches, partial(_training_stream_preserved, trainer)),
            loss_fn=loss if callable(loss) else F.cross_entropy,
            batch_size=_loader_batch_size(trainer) or self._first_batch_size,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            world_size=trainer.world_size,
            extra={"masks": self.pruner.masks},
        )


def _train_loader(trainer: L.Trainer) -> Any:
    # A fresh loader from the datamodule, so the fit loop's own iterator (and persistent workers) are untouched.
    if trainer.datamodule is not None:
        return trainer.datamodule.train_dataloader()
    loader = trainer.train_dataloader
    if loader is None or isinstance(loader, (list, tuple, dict)):
        raise ValueError(
            f"FisherPruning: a data-based Fisher estimator needs one training DataLoader, found {type(loader).__name__}"
        )
    return loader


def _training_batches(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[tuple[Tensor, Tensor]]:
    """Training batches as the training step sees them: on device, after the batch-transfer hooks."""
    before = _before_transfer_hook(trainer, pl_module)
    for batch in _train_loader(trainer):
        if before is not None:
            batch = before(batch, 0)
        batch = trainer.strategy.batch_to_device(batch)
        yield batch[0], batch[1]


def _step_batches(
    current: tuple[Tensor, Tensor], trainer: L.Trainer, pl_module: L.LightningModule
) -> Iterator[tuple[Tensor, Tensor]]:
    """The step's own batch, then fresh training batches: a per-step update reads the first, and an
    estimate that needs more samples than one batch (FishLeg's Q₀ from an EmpiricalFisher diagonal
    source, built at its first update) reads on; the loader starts only if something reads past the first."""
    yield current
    yield from _training_batches(trainer, pl_module)


@contextmanager
def _estimating(trainer: L.Trainer, context: FisherContext) -> Iterator[None]:
    """Around an estimate: the training stream preserved, and the context's last pass over its batches
    closed on the way out (left open, it would put the stream back later, in the middle of training)."""
    with _training_stream_preserved(trainer):
        try:
            yield
        finally:
            if isinstance(context.batches, RepeatablePasses):
                context.batches.close()


def _training_stream_preserved(trainer: L.Trainer) -> AbstractContextManager[None]:
    """Random state the training stream draws from, restored on exit: torch's global generators (CPU and
    the training GPU) and the datamodule's own where it offers ``preserved_rng()`` (ImageDataModule's
    augmentation). The batches a Fisher estimate draws then leave the batches training sees unchanged."""
    preserve = getattr(trainer.datamodule, "preserved_rng", None)
    return stream_preserved(trainer.strategy.root_device, *([preserve] if callable(preserve) else []))


def _before_transfer_hook(trainer: L.Trainer, pl_module: L.LightningModule) -> Callable[[Any, int], Any] | None:
    # Same precedence as Lightning's data-hook selector: the datamodule's override wins.
    datamodule = trainer.datamodule
    if datamodule is not None and is_overridden("on_before_batch_transfer", datamodule, L.LightningDataModule):
        return datamodule.on_before_batch_transfer
    if is_overridden("on_before_batch_transfer", pl_module, L.LightningModule):
        return pl_module.on_before_batch_transfer
    return None


def _loader_batch_size(trainer: L.Trainer) -> int | None:
    loader = trainer.train_dataloader
    if isinstance(loader, DataLoader):
        if loader.batch_size is not None:
            return loader.batch_size
        return getattr(loader.batch_sampler, "batch_size", None)
    return None


def _batch_size_of(batch: Any) -> int | None:
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor) and batch[0].ndim > 0:
        return int(batch[0].shape[0])
    if isinstance(batch, Tensor) and batch.ndim > 0:
        return int(batch.shape[0])
    return None
