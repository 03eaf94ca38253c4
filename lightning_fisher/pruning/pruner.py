"""The pruner: selection, scores, pattern, schedule and masks tied together, in plain PyTorch.

Lifecycle (the verbs of ``torch.ao.pruning``'s sparsifier, without parametrizations or hooks):
``prepare(model)`` selects the weights and creates all-True masks; ``step(position, fisher)`` prunes
to the schedule's level when a prune is due; ``apply_()`` zeroes the pruned weights (call it after
every optimizer step, or :meth:`Pruner.attach` the pruner to the optimizer); ``state_dict()`` /
``load_state_dict()`` resume it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_fisher.pruning.masks import load_masks, masks_state_dict, sparsity
from lightning_fisher.pruning.patterns import (
    SCOPES,
    Scope,
    check_layer_floors,
    nm_eligible,
    nm_masks,
    parse_pattern,
    unstructured_masks,
    validate_min_layer_density,
)
from lightning_fisher.pruning.schedules import SCHEDULES, Schedule, ScheduleKind, SchedulePosition
from lightning_fisher.pruning.scores import (
    CRITERIA,
    Criterion,
    check_finite,
    score_magnitude,
    score_obd,
    score_obs,
    score_random,
)
from lightning_fisher.pruning.selection import clean_fqn, select_parameters
from lightning_fisher.pruning.surgeon import InverseProduct, obs_compensate_, validate_obs_iterations

__all__ = ["PruneEvent", "Pruner", "STATE_VERSION", "validate_fisher_damping"]

log = logging.getLogger(__name__)

STATE_VERSION = 1


def validate_fisher_damping(fisher_damping: float, criterion: str, compensate: bool) -> float:
    """Check ``fisher_damping`` (a finite float ≥ 0, used only by OBD scores) and return it as a float."""
    if isinstance(fisher_damping, bool) or not isinstance(fisher_damping, (int, float)):
        raise TypeError(f"fisher_damping={fisher_damping!r}: must be a float >= 0")
    if not 0.0 <= fisher_damping < float("inf"):
        raise ValueError(f"fisher_damping={fisher_damping!r}: must be a finite float >= 0")
    if fisher_damping and (criterion != "fisher" or compensate):
        used = f"criterion={criterion!r}" if criterion != "fisher" else "compensate=True (Q has its own damping)"
        raise ValueError(
            f"fisher_damping={fisher_damping!r}: only the OBD score (criterion='fisher', compensate=False) uses it, "
            f"got {used}"
        )
    return float(fisher_damping)


def _mean_entry(tensors: Iterable[Tensor]) -> float:
    """The mean of all entries of ``tensors`` together (each weighted by its size), accumulated in float64."""
    total, count = 0.0, 0
    for t in tensors:
        total += float(t.detach().double().sum())
        count += t.numel()
    return total / count if count else 0.0


@dataclass(frozen=True)
class PruneEvent:
    """What one :meth:`Pruner.step` did (for logs)."""

    position: int
    target_sparsity: float
    sparsity: float
    pruned: int
    total: int


class Pruner:
    """Gradual / one-shot / iterative pruning of a model's Conv2d and Linear weights to a pattern.

    Implements OBD scoring (LeCun et al. 1990) with a diagonal Fisher, OBS scoring and compensation
    (Hassibi & Stork 1993) with an inverse Fisher, magnitude pruning (Han et al. 2015), the cubic
    gradual schedule (Zhu & Gupta 2017) and N:M semi-structured masks.

    Args:
        target_sparsity: final fraction of pruned weights in [0, 1) for ``"unstructured"``. For
            ``"N:M"`` the pattern fixes it at (M − N)/M: leave it ``None`` (or give exactly that).
        criterion: ``"fisher"`` (θ²F/2, or θ²/(2Q_qq) with ``compensate``), ``"magnitude"`` or ``"random"``.
        pattern: ``"unstructured"`` or ``"N:M"`` with 0 < N < M.
        scope: ``"global"`` (one ranking over all pruned weights, or all N:M groups) or ``"layer"``.
        schedule: ``"gradual"``, ``"one_shot"`` or ``"iterative"`` (see :mod:`.schedules`). For N:M the
            schedule ramps the fraction of groups held at N:M from 0 to 1 (``iterative`` is not offered).
        start, end, frequency: schedule positions (epochs or steps, the caller's choice).
        initial_sparsity: level at ``start`` (unstructured only).
        iterative_fraction: fraction of the remaining weights removed per iterative cycle.
        include, exclude, keep_first_dense, keep_last_dense: which weights, see :func:`select_parameters`.
        seed: seed of the ``random`` criterion's generator.
        compensate: apply the OBS update at each prune (needs an inverse Fisher): the surviving weights move,
            and so do parameters the inverse couples to them (a layer's bias in FishLeg's Kronecker forms).
        min_layer_density: layer-collapse guard (Tanaka et al. 2020) for unstructured ``scope="global"``:
            every layer keeps at least ``max(1, ceil(d·numel))`` of its highest-scoring weights while the
            total pruned stays ``round(s·total)``; ``0`` disables it. Not used with ``scope="layer"`` or
            N:M. Floors the target cannot leave room for are a ``ValueError`` at :meth:`prepare`.
        fisher_damping: relative damping δ ≥ 0 of the diagonal Fisher in the OBD score (``criterion="fisher"``
            without ``compensate``): ρ = θ²(F + γ)/2 with γ = δ · mean(F) over every weight of the pruned
            layers (masked ones included), the OBS cost of the damped diagonal Fisher F + γI. ``0`` is plain
            OBD; as δ grows the ranking tends to global magnitude. Relative, so one value means the same
            for any Fisher scale (the Squisher's B·v and the empirical Fisher differ by constants). An
            inverse Fisher (``compensate``) carries its own damping, so there it is an error, as with the
            other criteria.
        obs_iterations: the OBS update of ``compensate`` (see :mod:`.surgeon`). ``0``: the
            independent-weights form −Q[(θ ⊙ 1_S) ⊘ diag Q] (WoodFisher, oBERT, FishLeg Surgeon).
            ``k > 0``: the joint form −Q E_T (Q_TT)⁻¹ θ_T over every pruned weight T, solved to at most k
            conjugate-gradient steps (one product with Q each): every pruned weight lands on zero and the
            survivors absorb the removals together. Non-zero only with ``compensate``.
    """

    def __init__(
        self,
        target_sparsity: float | None = None,
        criterion: Criterion = "magnitude",
        pattern: str = "unstructured",
        scope: Scope = "global",
        schedule: ScheduleKind = "gradual",
        start: int = 0,
        end: int | None = None,
        frequency: int = 1,
        initial_sparsity: float = 0.0,
        iterative_fraction: float = 0.2,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        keep_first_dense: bool = True,
        keep_last_dense: bool = True,
        seed: int = 0,
        compensate: bool = False,
        min_layer_density: float = 0.01,
        fisher_damping: float = 0.0,
        obs_iterations: int = 0,
    ) -> None:
        self.min_layer_density = validate_min_layer_density(min_layer_density)
        if criterion not in CRITERIA:
            raise ValueError(f"criterion={criterion!r}: must be one of {CRITERIA}")
        self.fisher_damping = validate_fisher_damping(fisher_damping, criterion, compensate)
        self.obs_iterations = validate_obs_iterations(obs_iterations, compensate)
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r}: must be one of {SCOPES}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: must be one of {SCHEDULES}")
        self.pattern = parse_pattern(pattern)
        if self.pattern.is_nm:
            nm = self.pattern.nm_sparsity
            if target_sparsity is not None and abs(target_sparsity - nm) > 1e-9:
                raise ValueError(
                    f"target_sparsity={target_sparsity}: pattern={pattern!r} prunes exactly (M-N)/M = {nm:g} of "
                    "each pruned layer; leave target_sparsity unset (None) or give that value"
                )
            if initial_sparsity != 0.0:
                raise ValueError(f"initial_sparsity={initial_sparsity}: must be 0 with an N:M pattern")
            if schedule == "iterative":
                raise ValueError(
                    f"schedule={schedule!r}: not available with pattern={pattern!r} (use 'gradual' or 'one_shot')"
                )
            final = 1.0
        else:
            if target_sparsity is None:
                raise ValueError("target_sparsity=None: an unstructured pattern needs a target sparsity in [0, 1)")
            if not 0.0 <= target_sparsity < 1.0:
                raise ValueError(f"target_sparsity={target_sparsity}: must be in [0, 1)")
            if not 0.0 <= initial_sparsity <= target_sparsity:
                raise ValueError(
                    f"initial_sparsity={initial_sparsity}: must be in [0, target_sparsity={target_sparsity}]"
                )
            final = float(target_sparsity)
        if compensate and criterion != "fisher":
            raise ValueError(f"compensate=True: needs criterion='fisher', got criterion={criterion!r}")
        self.schedule = Schedule(
            kind=schedule,
            final=final,
            start=start,
            end=end if schedule == "gradual" else None,
            frequency=frequency,
            initial=float(initial_sparsity),
            fraction=iterative_fraction,
        )
        self.target_sparsity = final if not self.pattern.is_nm else self.pattern.nm_sparsity
        self.criterion = criterion
        self.scope = scope
        self.include = None if include is None else list(include)
        self.exclude = list(exclude)
        self.keep_first_dense = keep_first_dense
        self.keep_last_dense = keep_last_dense
        self.seed = seed
        self.compensate = compensate
        self.position = SchedulePosition()
        self.parameters: dict[str, nn.Parameter] = {}
        # parameters OBS may move but never prunes (biases coupled by the inverse Fisher); set by prepare()
        self.coupled: dict[str, nn.Parameter] = {}
        self.moved_coupled: list[str] = []  # the coupled parameters the last compensation moved
        self._masks: dict[str, Tensor] = {}
        self._pruned: dict[str, Tensor] = {}
        self.skipped: list[str] = []
        # The random criterion's generator state, kept as a tensor: a live torch.Generator does not survive
        # the pickling that ddp_spawn does (its state storage cannot be shared between processes).
        self._rng_state = torch.Generator().manual_seed(seed).get_state().clone()
        self._pending_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ masks
    @property
    def masks(self) -> dict[str, Tensor]:
        """``{fqn: bool tensor}``, True = kept, on each parameter's device (replace, do not edit in place)."""
        return self._masks

    @masks.setter
    def masks(self, masks: dict[str, Tensor]) -> None:
        self._masks = masks
        # What apply_ zeroes after every optimizer step: only layers with pruned entries, inverted once here.
        self._pruned = {name: ~m for name, m in masks.items() if not bool(m.all())}

    # ------------------------------------------------------------------ setup
    @property
    def guards_layers(self) -> bool:
        """Whether the layer-collapse guard acts: unstructured, ``scope="global"``, ``min_layer_density > 0``."""
        return not self.pattern.is_nm and self.scope == "global" and self.min_layer_density > 0.0

    @property
    def prepared(self) -> bool:
        return bool(self.parameters)

    def prepare(self, model: nn.Module) -> None:
        """Select the weights of ``model`` to prune and start from all-True masks (or loaded state)."""
        params = select_parameters(
            model, self.include, self.exclude, self.keep_first_dense, self.keep_last_dense
        )
        self.skipped = []
        if self.pattern.is_nm:
            m = self.pattern.m
            assert m is not None
            self.skipped = [name for name, p in params.items() if not nm_eligible(p.shape, m)]
            if self.skipped:
                warnings.warn(
                    f"pattern={str(self.pattern)!r}: these layers stay dense, their input dimension is not a "
                    f"multiple of {m}: {self.skipped}",
                    UserWarning,
                    stacklevel=2,
                )
            params = {name: p for name, p in params.items() if name not in self.skipped}
            if not params:
                raise ValueError(f"pattern={str(self.pattern)!r}: no selected layer can hold it; all stay dense")
        if self.guards_layers:
            check_layer_floors({n: p.numel() for n, p in params.items()}, self.target_sparsity, self.min_layer_density)
        self.parameters = params
        # OBS moves these too where the inverse Fisher couples them to the pruned weights (biases); never masked
        pruned_ids = {id(p) for p in params.values()}
        self.coupled = {
            clean_fqn(name): p for name, p in model.named_parameters() if id(p) not in pruned_ids
        }
        self.masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()}
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Re-apply the masks after every ``optimizer.step()`` (skipped AMP steps never call it)."""
        return optimizer.register_step_post_hook(lambda _optimizer, _args, _kwargs: self.apply_())

    def _require_prepared(self) -> None:
        if not self.prepared:
            raise RuntimeError("Pruner.prepare(model) must be called first")

    # -------------------------------------------------------------- schedule
    def due(self, position: int) -> bool:
        """Whether :meth:`step` at ``position`` would prune (a scheduled prune has not been done yet)."""
        return self.position.due(self.schedule, position) is not None

    def needs_scores(self, position: int) -> bool:
        """Whether :meth:`step` at ``position`` prunes something, so scores (a Fisher) are needed."""
        return self.due(position) and self.schedule.level_at(position) > 0.0

    def scheduled_sparsity(self, position: int) -> float:
        """The schedule's target sparsity of the pruned weights from ``position`` on (0 before start)."""
        level = self.schedule.level_at(position)
        return level * self.pattern.nm_sparsity if self.pattern.is_nm else level

    def sparsity(self) -> float:
        """Achieved fraction of pruned weights over the pruned parameters."""
        return sparsity(self.masks)

    # ------------------------------------------------------------------ step
    def scores(
        self, fisher: Mapping[str, Tensor] | None = None, inverse_diag: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Per-weight scores of the configured criterion (low = prune first)."""
        self._require_prepared()
        if self.criterion == "magnitude":
            return {name: score_magnitude(p) for name, p in self.parameters.items()}
        if self.criterion == "random":
            generator = torch.Generator()
            generator.set_state(self._rng_state)
            out = {name: score_random(p, generator) for name, p in self.parameters.items()}
            self._rng_state = generator.get_state().clone()
            return out
        source, name_of = (inverse_diag, "inverse_diag") if self.compensate else (fisher, "fisher")
        if source is None:
            raise ValueError(f"{name_of}=None: criterion='fisher' needs a Fisher estimate to score weights")
        missing = sorted(set(self.parameters) - set(source))
        if missing:
            raise KeyError(f"the Fisher estimate has no entry for pruned parameters {missing}")
        if self.compensate:
            out = {name: score_obs(p, source[name]) for name, p in self.parameters.items()}
        else:
            damping = 0.0
            if self.fisher_damping:
                damping = self.fisher_damping * _mean_entry(source[name] for name in self.parameters)
            out = {name: score_obd(p, source[name], damping) for name, p in self.parameters.items()}
        check_finite(out)
        return out

    @torch.no_grad()
    def step(
        self,
        position: int,
        fisher: Mapping[str, Tensor] | None = None,
        *,
        inverse_diag: Mapping[str, Tensor] | None = None,
        inverse_product: InverseProduct | None = None,
        sync: Callable[[dict[str, Tensor]], Mapping[str, Tensor]] | None = None,
    ) -> PruneEvent | None:
        """Prune to the scheduled level if a prune is due at ``position``; return what happened.

        Args:
            position: the current epoch or optimizer step.
            fisher: ``{fqn: diagonal Fisher}`` (``criterion="fisher"`` without ``compensate``).
            inverse_diag: ``{fqn: diag((F + γI)⁻¹)}`` (``compensate``).
            inverse_product: ``vectors -> (F + γI)⁻¹ vectors`` (``compensate``).
            sync: maps the new masks (CPU bool) to the masks every process must use, before any weight
                changes, e.g. a broadcast of rank 0's masks under data parallelism.
        """
        self._require_prepared()
        due = self.position.due(self.schedule, position)
        if due is None:
            return None
        level = self.schedule.level_at(position)
        if level > 0.0:
            scores = self.scores(fisher, inverse_diag)
            if self.pattern.is_nm:
                assert self.pattern.n is not None and self.pattern.m is not None
                new = nm_masks(scores, self.masks, self.pattern.n, self.pattern.m, level, self.scope)
            else:
                new = unstructured_masks(
                    scores, self.masks, level, self.scope, min_layer_density=self.min_layer_density
                )
            if sync is not None:
                new = load_masks(self.parameters, sync(masks_state_dict(new)))
            if self.compensate:
                if inverse_diag is None or inverse_product is None:
                    raise ValueError("compensate=True: step() needs inverse_diag and inverse_product")
                pruned_now = {n: ~m for n, m in new.items()}
                self.moved_coupled = obs_compensate_(
                    self.parameters, pruned_now, inverse_diag, inverse_product, self.coupled, self.obs_iterations
                )
            self.masks = new
        self.apply_()
        self.position.advance(due)
        pruned = sum(int((~m).sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        return PruneEvent(due, self.scheduled_sparsity(position), pruned / total, pruned, total)

    def apply_(self) -> None:
        """Zero the pruned weights in place."""
        with torch.no_grad():
            for name, pruned in self._pruned.items():
                self.parameters[name].masked_fill_(pruned, 0)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Masks (CPU bool, by FQN), schedule position and RNG state; plain Python and CPU tensors."""
        if not self.prepared and self._pending_state is not None:
            return self._pending_state
        return {
            "version": STATE_VERSION,
            "masks": masks_state_dict(self.masks),
            "position": self.position.state_dict(),
            "rng_state": self._rng_state.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (strict: the mask FQNs must match the selected parameters).

        Before :meth:`prepare`, the state is kept and applied when the model is prepared.
        """
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"pruner state version {version!r}: expected {STATE_VERSION}")
        if not self.prepared:
            self._pending_state = dict(state)
            return
        self.masks = load_masks(self.parameters, state["masks"])
        self.position.load_state_dict(state["position"])
        self._rng_state = state["rng_state"].to("cpu", torch.uint8).clone()
        self.apply_()

    def __repr__(self) -> str:
        return (
            f"Pruner(target_sparsity={self.target_sparsity}, criterion={self.criterion!r}, "
            f"pattern={str(self.pattern)!r}, scope={self.scope!r}, schedule={self.schedule.kind!r})"
        )
