"""``FishLegFisher``: the inverse Fisher learned with FishLeg's auxiliary loss, for FishLeg Surgeon."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_fisher.fisher.base import FisherContext, FisherEstimator
from lightning_fisher.fisher.fishleg.forms import CONV_FORMS, LayerForm, forms_for
from lightning_fisher.fisher.fishleg.products import (
    FVP_METHODS,
    FvpMethod,
    fisher_vector_product,
    loss_gradient,
    sampled_squared_gradient,
)
from lightning_fisher.fisher.squisher import Squisher

__all__ = ["FishLegFisher", "INITS", "PROBES", "REFRESH_MATCHES", "STATE_VERSION"]

log = logging.getLogger(__name__)

PROBES: tuple[str, ...] = ("gaussian", "gradient")
INITS: tuple[str, ...] = ("auto", "squisher", "gradients", "identity")
REFRESH_MATCHES: tuple[str, ...] = ("inverse", "fisher")
STATE_VERSION = 1


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < math.inf:
        raise ValueError(f"{name}={value!r}: must be a positive finite number")
    return float(value)


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
    return value


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> Any:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: must be one of {allowed}")
    return value


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return copy.deepcopy(value)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _average_over_ranks_(tensors: Iterable[Tensor]) -> None:
    """Replace every tensor by its mean over the data-parallel ranks (nothing to do on one process)."""
    if not _distributed():
        return
    for t in tensors:
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()


def _mask_key(masks: Mapping[str, Tensor]) -> tuple | None:
    """Which masks these are and how often each was written to; None for inference tensors (no version)."""
    try:
        return tuple((name, id(mask), mask._version) for name, mask in masks.items())
    except RuntimeError:
        return None


class _MaskDerived:
    """A value derived from the pruner's masks, recomputed only when a mask changes (a prune).

    Deriving it reads the masks on the host (which weights survive, how many), a host-device sync per
    layer on a GPU, and the auxiliary update and its metric need it at every call. A mask changes by
    being replaced (its identity) or written in place (its version counter); the masks are kept
    referenced so that their identities cannot be reused by others."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._masks: tuple[Tensor, ...] = ()
        self._value: Any = None

    def get(self, masks: Mapping[str, Tensor], names: Iterable[str], derive: Callable[[], Any]) -> Any:
        """``derive()``, or its value from the last call with the same masks, unchanged, and ``names``."""
        key = _mask_key(masks)
        key = None if key is None else (tuple(names), key)
        if key is None or key != self._key:
            self._value = derive()
            self._key, self._masks = key, tuple(masks.values())
        return self._value


def _masks_of(context: FisherContext, names: Iterable[str]) -> dict[str, Tensor]:
    """The pruner's masks (``context.extra["masks"]``) of ``names``."""
    masks = context.extra.get("masks", {})
    return {n: masks[n] for n in names if n in masks}


def _partial_and_active(masks: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """The masks holding at least one pruned weight, and the coordinates Q is learned on: the surviving
    weights where a mask is given, every one elsewhere."""
    kept = torch.stack([m.sum() for m in masks.values()]).tolist() if masks else []  # one host read for all
    partial = {n: m for (n, m), k in zip(masks.items(), kept) if k < m.numel()}
    return partial, sum(kept) + sum(p.numel() for n, p in params.items() if n not in masks)


def _kept_positions(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> Tensor | None:
    """Positions of the surviving weights among ``params`` flattened and concatenated; None without masks."""
    if not masks:
        return None
    kept = [masks[n].flatten() if n in masks else torch.ones(p.numel(), dtype=torch.bool, device=p.device) for n, p in params.items()]
    return torch.cat(kept).nonzero().squeeze(1)


def _masked(values: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: v * masks[n] if n in masks else v for n, v in values.items()}


def _spearman(a: Tensor, b: Tensor) -> float:
    ranks_a = a.argsort().argsort().float()
    ranks_b = b.argsort().argsort().float()
    ranks_a -= ranks_a.mean()
    ranks_b -= ranks_b.mean()
    denominator = ranks_a.norm() * ranks_b.norm()
    correlation = torch.where(denominator > 0, (ranks_a @ ranks_b) / denominator, torch.nan)
    return float(correlation)  # the one host read


class FishLegFisher(FisherEstimator):
    """An inverse Fisher Q(λ) ≈ (F + γI)⁻¹, learned per layer, for OBS pruning (FishLeg Surgeon).

    Implements FishLeg (Garcia, Tam, Dangel, ..., ICLR 2023, "Fisher-Legendre (FishLeg) optimization of
    deep neural networks") with the changes of FishLeg Surgeon (McGowan et al., arXiv 2412.02328):
    Q(λ) is block-diagonal over layers, each block a PSD form of :mod:`.forms`, learned by minimising the
    auxiliary loss A(λ; u) = ½ uᵀQF_γQu − uᵀQu (minimum at Q = F_γ⁻¹, F_γ = F + γI) with Adam on λ.
    ∇λA = ∇λ⟨Q(λ)u, h⟩ with h = F_γQu − u held fixed, F·v from :mod:`.products` (labels sampled from the
    model). FishLeg Surgeon's changes: Gaussian probes u (``probe="gaussian"``; ``"gradient"`` is
    FishLeg's original probe), the gradient preconditioned by Q itself (``precondition=True``: the
    Newton-like step ΔQ ∝ −Q(∇_Q A)Q, i.e. ∇λ⟨Q(λ)·Qu, Q·h⟩), and the initialisation
    Q₀ = diag(1/(E[g²] + γ)). After pruning, probes, products and h are masked to the surviving weights
    (``context.extra["masks"]``, the pruner's masks), so Q is refined on the survivors and the per-weight
    entries of λ that belong to pruned weights are frozen.

    Which layers: every layer owning a parameter in ``context.parameters`` (the pruned weights) gets a
    block covering its weight and bias: Linear → two Kronecker factors over out × (in + 1); Conv2d →
    ``conv_form``; BatchNorm/LayerNorm/GroupNorm → diagonal. Parameters of any other layer type fall back
    to a diagonal form, with one warning listing the layers. The bias is in Q, and where the form couples
    it to the weight (Linear, two-factor Conv2d: one Kronecker block over [W | b]) :meth:`inverse_product`
    also returns its block, so OBS compensation moves the bias with the surviving weights
    (δb = −[Q e_q]_bias θ_q/Q_qq for a single pruned weight q). Biases are never pruned, only moved.

    E[g²] for Q₀ (``init="auto"``): the Squisher's B·v̂ from the training optimizer's ``exp_avg_sq``
    when it is Adam-family and has state, else B·ḡ² at sampled labels averaged over ``init_batches``
    batches (an unbiased diag(F), in the same per-sample units). ``diagonal()`` returns
    max(1/diag(Q) − γ, 0): the diagonal Fisher implied by Q, so ``criterion="fisher"`` without
    ``compensate`` scores θ²F/2 with it (with ``refresh_diagonal`` and ``refresh_match="inverse"``, the
    refreshed F̂ itself: OBD on F̂, FishLeg Surgeon's ranking without its OBS update).

    When Q learns: every ``update_every`` optimizer steps (the callback calls :meth:`on_train_step`
    with the current batch), and ``pretrain_steps`` updates on the context's batches just before the
    first score is asked for (the first prune). Randomness: update k (counting from 0) draws its probes
    and labels from a generator seeded with ``seed`` and k, and k is in :meth:`state_dict`, so a
    resumed run repeats the uninterrupted one. Under data parallelism the λ gradients are averaged over
    the ranks (``torch.distributed``), probes and labels use the same seeds everywhere, and Q₀ comes from
    the (rank-identical) optimizer state or all-reduced gradients, so Q stays identical on every rank;
    so does an OBS step, bias blocks included, as it reads only Q, the synced masks and the weights.

    Memory (:meth:`num_parameters`; ResNet18 width 64, a block for every Conv2d/Linear): two-factor
    convs 105.2M λ entries (94.0M in the factors), three-factor 14.4M (3.2M in the factors); both hold
    the per-weight D, 11.2M entries. Adam's state of λ doubles it again (fp32: ×4 bytes ×3).

    Args:
        damping: γ > 0 in (F + γI)⁻¹, in the units of F (mean squared per-sample gradients); with
            ``relative_damping`` a multiple δ of the mean Fisher instead.
        relative_damping: γ = ``damping`` × the mean of F̂ over the pruned parameters, with F̂ the diagonal
            Fisher Q₀ is made from (``init`` or ``diagonal_source``), taken when Q₀ is built and again at
            every refresh (``refresh_diagonal``), so that one δ suits models and training stages whose
            Fisher scales differ (the pruner's ``fisher_damping`` is the same relative damping for OBD
            scores). The current γ is :attr:`gamma`, saved in :meth:`state_dict`. Needs ``init`` other
            than ``"identity"``.
        conv_form: ``"two_factor"`` or ``"three_factor"`` (memory-light) for Conv2d layers.
        lr: Adam's learning rate on λ.
        update_every: auxiliary updates every this many optimizer steps (≥ 1), or ``None`` for none
            during training (only ``pretrain_steps``).
        pretrain_steps: auxiliary updates at the first prune, before Q is used (≥ 0).
        probe: ``"gaussian"`` (u ~ N(0, I)) or ``"gradient"`` (the training-loss gradient).
        fvp: ``"finite_difference"``, ``"rank1"`` (labels sampled from the model) or ``"ggn"`` (exact on
            the batch, positive semi-definite) Fisher-vector products (see :mod:`.products`).
        fd_eps: the relative finite-difference step (> 0).
        precondition: precondition the auxiliary gradient by Q (FishLeg Surgeon).
        init: ``"auto"``, ``"squisher"`` (fail without Adam-family state), ``"gradients"``, or
            ``"identity"`` (Q₀ = I/γ).
        init_batches: batches averaged for ``init="gradients"`` (≥ 1).
        floor: lower bound of :meth:`inverse_diagonal` (> 0), so OBS scores stay finite.
        seed: base seed of probes and sampled labels (≥ 0).
        refresh_diagonal: before every read of Q's diagonal (each prune), rescale D so that
            diag(Q) = 1/(F̂ + γ) with F̂ the current diagonal Fisher, from the same source as Q₀
            (``diagonal_source``, else the optimizer's second moment, else ``init_batches``
            sampled-gradient batches). D_q is multiplied
            by √(target_q / Q_qq), so the correlations Q_ij/√(Q_ii Q_jj) that FishLeg learned are kept and
            only each weight's own scale follows the network as it trains and loses weights. Pruned
            coordinates are rescaled too, so that the Fisher Q implies (:meth:`diagonal`) is the current
            F̂ on every coordinate. Their D is frozen in learning and meets only zeros in its products
            and in the independent OBS update, so nothing else changes there; the joint OBS update (the
            pruner's ``obs_iterations``), which solves over every zeroed weight, does read them. Without
            it Q's diagonal is the one of the first prune, moved only by the auxiliary updates. Needs
            ``init`` other than ``"identity"``.
        refresh_match: what the refresh matches to F̂ + γ. ``"inverse"``: diag(Q) = 1/(F̂ + γ), so the
            OBS score θ²/(2Q_qq) is the damped OBD score. ``"fisher"``: diag(Q⁻¹) = F̂ + γ, i.e. the
            Fisher that Q implies has the current diagonal; then Q_qq = ρ_q/(F̂_q + γ) with
            ρ_q = K_qq[K⁻¹]_qq ≥ 1 from the learned Kronecker factors K
            (:meth:`LayerForm.correlation_inflation`), and the OBS score θ²(F̂_q + γ)/(2ρ_q) discounts a
            weight whose loss the correlated survivors can absorb, as OBS does with the exact inverse.
        diagonal_source: the estimator F̂ comes from, for Q₀, ``relative_damping`` and every refresh, in
            place of ``init``'s choice (which must stay ``"auto"``), e.g.
            ``EmpiricalFisher(num_samples=1024)``: a fresh per-sample estimate at each read, where the
            Squisher is free but averages the squared gradients of the last ~1/(1 − β₂) steps. It reads
            the context's batches and is averaged over data-parallel ranks when it says it
            ``needs_all_reduce``; its state is saved with Q's.
        agreement_samples: entries subsampled for the ``fishleg/diag_agreement`` metric (≥ 0; 0 = off).

    Raises:
        ValueError: any argument outside the ranges above, naming the value.

    Example::

        FisherPruning(estimator=FishLegFisher(damping=0.1, conv_form="three_factor"), compensate=True,
                      target_sparsity=0.95, pattern="unstructured", start_epoch=0, end_epoch=20)
        # the setting that measured best on our CPU proxy (the recipe's, conf/fisher/fishleg.yaml):
        FishLegFisher(damping=1.0, relative_damping=True, fvp="ggn", lr=1e-3, refresh_diagonal=True,
                      update_every=50, diagonal_source=EmpiricalFisher(num_samples=1024))
    """

    requires_data = True
    needs_all_reduce = False  # λ gradients are averaged over ranks, so Q is the same everywhere

    def __init__(
        self,
        damping: float = 0.1,
        conv_form: Literal["two_factor", "three_factor"] = "three_factor",
        lr: float = 1e-2,
        update_every: int | None = 10,
        pretrain_steps: int = 0,
        probe: Literal["gaussian", "gradient"] = "gaussian",
        fvp: FvpMethod = "finite_difference",
        fd_eps: float = 1e-3,
        precondition: bool = True,
        init: Literal["auto", "squisher", "gradients", "identity"] = "auto",
        init_batches: int = 4,
        floor: float = 1e-12,
        seed: int = 0,
        refresh_diagonal: bool = False,
        agreement_samples: int = 100_000,
        relative_damping: bool = False,
        refresh_match: Literal["inverse", "fisher"] = "inverse",
        diagonal_source: FisherEstimator | None = None,
    ) -> None:
        self.damping = _positive("damping", damping)
        self.relative_damping = bool(relative_damping)
        self.gamma = self.damping
        """The current γ: ``damping``, or with ``relative_damping`` δ × the mean of the last F̂."""
        _one_of("conv_form", conv_form, CONV_FORMS)
        self.lr = _positive("lr", lr)
        self.update_every = None if update_every is None else _integer("update_every", update_every, 1)
        self.pretrain_steps = _integer("pretrain_steps", pretrain_steps, 0)
        _one_of("probe", probe, PROBES)
        _one_of("fvp", fvp, FVP_METHODS)
        self.fd_eps = _positive("fd_eps", fd_eps)
        _one_of("init", init, INITS)
        if refresh_diagonal and init == "identity":
            raise ValueError("refresh_diagonal=True with init='identity': the identity has no Fisher to refresh from")
        if relative_damping and init == "identity":
            raise ValueError("relative_damping=True with init='identity': the identity has no Fisher to scale γ by")
        self.refresh_match = _one_of("refresh_match", refresh_match, REFRESH_MATCHES)
        if diagonal_source is not None:
            if not isinstance(diagonal_source, FisherEstimator) or isinstance(diagonal_source, FishLegFisher):
                raise ValueError(f"diagonal_source={diagonal_source!r}: must be a diagonal FisherEstimator other than FishLegFisher")
            if init != "auto":
                raise ValueError(f"init={init!r} with a diagonal_source: Q₀ comes from the source; leave init='auto'")
        self.diagonal_source = diagonal_source
        self.init_batches = _integer("init_batches", init_batches, 1)
        self.floor = _positive("floor", floor)
        self.seed = _integer("seed", seed, 0)
        self.agreement_samples = _integer("agreement_samples", agreement_samples, 0)
        self._agreement_pick: tuple[int, Tensor] | None = None  # (entry count, its subsample): diag_agreement
        self._agreement_kept = _MaskDerived()  # where the survivors sit among diag_agreement's entries
        self._learning_masks = _MaskDerived()  # the partial masks and the active count of every update
        self._squisher = Squisher()
        self.conv_form = conv_form
        self.probe = probe
        self.fvp = fvp
        self.precondition = bool(precondition)
        self.refresh_diagonal = bool(refresh_diagonal)
        self.init = init
        self.updates = 0
        self.pretrained = False
        self.forms: list[LayerForm] = []
        self._holder: nn.ModuleList | None = None
        self._adam: torch.optim.Adam | None = None
        self._where: dict[str, tuple[LayerForm, int]] = {}
        self._real: dict[str, str] = {}
        self._pending: dict[str, Any] | None = None

    # ------------------------------------------------------------ interface
    @property
    def supports_inverse(self) -> bool:
        return True

    def num_parameters(self) -> int:
        """Entries of λ over every block built so far (0 before the first use)."""
        return sum(form.num_parameters() for form in self.forms)

    def build(self, context: FisherContext) -> None:
        """Create the forms for ``context`` (once) and initialise them, or load pending state."""
        missing = [n for n in context.parameters if n not in self._where]
        if self._holder is not None and not missing:
            return
        if self._holder is not None:
            raise ValueError(f"FishLegFisher: Q was built for other parameters; no block for {missing}")
        forms, fallback = forms_for(context.model, list(context.parameters), self.conv_form)
        if fallback:
            warnings.warn(
                f"FishLegFisher: no Kronecker form for these layers, their Q falls back to a diagonal: {fallback}",
                UserWarning,
                stacklevel=3,
            )
        device = next(iter(context.parameters.values())).device
        self.forms = forms
        self._holder = nn.ModuleList(forms).to(device)
        self._adam = torch.optim.Adam(self._holder.parameters(), lr=self.lr)
        self._where = {name: (form, i) for form in forms for i, name in enumerate(form.names)}
        self._real = {}
        for real in (n for n, _ in context.model.named_parameters()):
            self._real[".".join(p for p in real.split(".") if p != "_orig_mod")] = real
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._load(state)
        else:
            inverse = self._damped_inverse(context, self._fisher_estimate(context))
            for form in forms:
                form.init_diagonal_([inverse[n] for n in form.names])
        log.debug("FishLegFisher: %d blocks, %d λ entries", len(forms), self.num_parameters())

    def diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        """max(1/diag(Q) − γ, 0): the diagonal Fisher Q implies (see the class docstring).

        With ``refresh_diagonal`` and ``refresh_match="inverse"`` the refresh has just made
        diag(Q) = 1/(F̂ + γ), so this is F̂, returned as estimated: 1/Q_qq − γ would keep only the digits
        of F̂_q that survive the cancellation against γ, few where F̂_q ≪ γ, and move nearly tied OBD
        scores off damped OBD's on the same F̂."""
        inverse, fisher = self._refreshed_inverse_diagonal(context)
        if fisher is not None and self.refresh_match == "inverse":
            return {n: fisher[n].float().clamp_min(0.0) for n in inverse}
        return {n: (1.0 / q - self.gamma).clamp_min_(0.0) for n, q in inverse.items()}

    def inverse_diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        """diag(Q) for the parameters of ``context`` (closed form), floored at ``floor``.

        With ``refresh_diagonal`` the scales D are first rescaled to the current Fisher (see the class)."""
        return self._refreshed_inverse_diagonal(context)[0]

    def _refreshed_inverse_diagonal(self, context: FisherContext) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """:meth:`inverse_diagonal`, and the F̂ its refresh matched (None without ``refresh_diagonal``)."""
        self._ready(context)
        fisher = self._rescale_diagonal(context) if self.refresh_diagonal else None
        diag = self._diag()
        return {n: diag[n].clamp_min(self.floor) for n in context.parameters}, fisher

    @torch.no_grad()
    def inverse_product(self, context: FisherContext, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Q·v for the given parameters (the other parameters of their blocks taken as zero).

        Besides a block for every key of ``vectors``, the result holds a block for each parameter the
        forms couple to them (:meth:`LayerForm.coupled_names`): the bias of a Linear layer, or of a
        Conv2d with ``conv_form="two_factor"``, when its weight is given. Those keys are the model's
        parameter FQNs without ``_orig_mod`` segments (as the pruner names them); OBS moves them too.
        The three-factor conv form and the diagonal forms couple nothing, so nothing is added for them.
        """
        unknown = sorted(set(vectors) - set(context.parameters))
        if unknown:
            raise KeyError(f"FishLegFisher.inverse_product: vectors for unknown parameters {unknown}")
        self._ready(context)
        full = {}
        for name, vector in vectors.items():
            if vector.shape != context.parameters[name].shape:
                raise ValueError(f"{name}: vector shape {tuple(vector.shape)} != parameter shape {tuple(context.parameters[name].shape)}")
            full[name] = vector.float()
        product = self._q(full, only=set(vectors))
        out = {name: product[name] for name in vectors}
        for form in self.forms:
            out.update((name, product[name]) for name in form.coupled_names(vectors))
        return out

    def check(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The ``diagonal_source``'s own check (the optimizer it needs, say)."""
        if self.diagonal_source is not None:
            self.diagonal_source.check(optimizer)

    def on_train_step(self, context: FisherContext, step: int) -> dict[str, float]:
        """One auxiliary update on the context's (current) batch every ``update_every`` steps (and the
        ``diagonal_source``'s own step hook, every step)."""
        metrics = {} if self.diagonal_source is None else dict(self.diagonal_source.on_train_step(context, step))
        if self.update_every is None or step <= 0 or step % self.update_every != 0:
            return metrics
        self.build(context)
        x, y = next(context.iter_batches())
        metrics["fishleg/aux_loss"] = self._update(context, x, y)
        agreement = self.diag_agreement(context)
        if agreement is not None:
            metrics["fishleg/diag_agreement"] = agreement
        return metrics

    def pretrain(self, context: FisherContext, steps: int) -> list[float]:
        """``steps`` auxiliary updates cycling over the context's batches; returns the auxiliary losses."""
        self.build(context)
        losses = []
        batches: Iterator = context.iter_batches()
        while len(losses) < steps:
            batch = next(batches, None)
            if batch is None:
                batches = context.iter_batches()
                batch = next(batches, None)
                if batch is None:
                    raise ValueError("FishLegFisher.pretrain: the context's batches are empty")
            losses.append(self._update(context, batch[0], batch[1]))
        return losses

    def auxiliary_loss(self, context: FisherContext, batches: int = 8, seed: int = 0, fvp: FvpMethod | None = None) -> float:
        """A(λ; u) per active coordinate, averaged over the first ``batches`` of the context's batches.

        A held-out measure of how close Q is to F_γ⁻¹: E_u[A] = ½tr(QF_γQ) − tr(Q) is minimal at
        Q = F_γ⁻¹ and exceeds its minimum by ½‖Q − F_γ⁻¹‖² in the F_γ norm (Gaussian probes), so lower is
        closer. Probes and sampled labels of batch i come from a generator seeded with ``seed`` and i,
        never from the training stream: calls with the same arguments on the same model and batches see
        the same draws, so two Qs (or one Q before and after learning) are compared on common random
        numbers. λ, Adam's state and the update count do not change. Masks in ``context.extra`` restrict
        it to the survivors, as in learning. With ``probe="gradient"`` the probes are the batches'
        training-loss gradients instead, and A then weighs the directions gradients take.

        ``fvp`` picks the Fisher-vector product (default: the estimator's own). ``"ggn"`` measures with
        the exact Fisher of each batch, positive semi-definite, so A ≥ −‖u‖²/2γ on every probe; the
        sampled-label products are unbiased but a single draw can have negative curvature, and a Q
        that grows along such a direction then scores lower without being closer.

        Raises:
            ValueError: ``batches`` < 1, ``seed`` < 0 or an unknown ``fvp`` (naming the value), or no
                batches in the context.
        """
        _integer("batches", batches, 1)
        _integer("seed", seed, 0)
        fvp = self.fvp if fvp is None else _one_of("fvp", fvp, FVP_METHODS)
        self.build(context)
        params = self._params(context)
        masks, active = self._mask_view(context, params)
        device = next(iter(params.values())).device
        losses = []
        for i, (x, y) in enumerate(context.iter_batches()):
            if i >= batches:
                break
            # seeds from 2**62 up: a range the learning stream (self._generator) does not reach
            generator = torch.Generator(device=device).manual_seed(2**62 + seed * 1_000_003 + i)
            losses.append(float(self._probe_terms(context, params, x, y, generator, masks, fvp)[3]) / active)
        if not losses:
            raise ValueError("FishLegFisher.auxiliary_loss: the context's batches are empty")
        return sum(losses) / len(losses)

    def diag_agreement(self, context: FisherContext) -> float | None:
        """Spearman correlation of 1/diag(Q) − γ with the Squisher's diagonal (Adam-family only)."""
        if self.agreement_samples == 0 or not self._has_optimizer_state(context):
            return None
        squisher = self._squisher.diagonal(context)
        names = list(context.parameters)
        masks = _masks_of(context, names)
        kept = self._agreement_kept.get(masks, names, lambda: _kept_positions(context.parameters, masks))
        with torch.no_grad():
            diag = self._diag()
            a = torch.cat([(1.0 / diag[n].clamp_min(self.floor) - self.gamma).flatten() for n in names])
            b = torch.cat([squisher[n].flatten() for n in names])
            count = a.numel() if kept is None else kept.numel()
            index = kept
            if count > self.agreement_samples:  # one gather of the subsample, not one of every survivor first
                pick = self._agreement_subsample(count, a.device)
                index = pick if kept is None else kept[pick]
            if index is not None:
                a, b = a[index], b[index]
            return _spearman(a, b) if a.numel() > 1 else None

    def _agreement_subsample(self, count: int, device: torch.device) -> Tensor:
        """``agreement_samples`` of ``count`` entries, the same draw for the same count (seeded): kept until the
        count changes (a prune), since a permutation of a full ResNet18's 11M entries costs about 0.4 s of CPU
        at every update otherwise."""
        if self._agreement_pick is None or self._agreement_pick[0] != count or self._agreement_pick[1].device != device:
            generator = torch.Generator().manual_seed(self.seed)
            pick = torch.randperm(count, generator=generator)[: self.agreement_samples].to(device)
            self._agreement_pick = (count, pick)
        return self._agreement_pick[1]

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """λ of every block (by parameter FQNs), Adam's state of λ, the update count, γ, and the
        ``diagonal_source``'s state when it has one; CPU tensors."""
        source_state = {} if self.diagonal_source is None else self.diagonal_source.state_dict()
        source = {"diagonal_source": _to_cpu(source_state)} if source_state else {}
        if self._holder is None:
            if self._pending is not None:
                return {**self._pending, **source}
            return {"version": STATE_VERSION, "updates": self.updates, "pretrained": self.pretrained, "gamma": self.gamma, **source}
        assert self._adam is not None
        return {
            **source,
            "version": STATE_VERSION,
            "updates": self.updates,
            "pretrained": self.pretrained,
            "gamma": self.gamma,
            "conv_form": self.conv_form,
            "blocks": [{"kind": f.kind, "names": list(f.names), "lambda": _to_cpu(f.state_dict())} for f in self.forms],
            "optimizer": _to_cpu(self._adam.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; before the forms exist the state waits for :meth:`build`.

        An empty dict (a checkpoint written with a stateless estimator, or a dense one) changes nothing.
        """
        if not state:
            return
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"FishLegFisher state version {state.get('version')!r}: expected {STATE_VERSION}")
        known = {"version", "updates", "pretrained", "gamma", "conv_form", "blocks", "optimizer", "diagonal_source"}
        unexpected = sorted(set(state) - known)
        if unexpected:
            raise ValueError(f"FishLegFisher.load_state_dict: unexpected keys {unexpected}")
        if "diagonal_source" in state:
            if self.diagonal_source is None:
                raise ValueError("FishLegFisher.load_state_dict: the state holds a diagonal_source's state; this estimator has none")
            self.diagonal_source.load_state_dict(state["diagonal_source"])
            state = {k: v for k, v in state.items() if k != "diagonal_source"}
        if "conv_form" in state and state["conv_form"] != self.conv_form:
            raise ValueError(f"conv_form={self.conv_form!r}: the state was saved with conv_form={state['conv_form']!r}")
        if self._holder is None and "blocks" in state:
            self._pending = dict(state)
        elif "blocks" in state:
            self._load(state)
        self.updates = int(state.get("updates", self.updates))
        self.pretrained = bool(state.get("pretrained", self.pretrained))
        self._load_gamma(state)

    def _load_gamma(self, state: Mapping[str, Any]) -> None:
        if self.relative_damping:
            self.gamma = float(state.get("gamma", self.gamma))
        elif "gamma" in state and float(state["gamma"]) != self.damping:
            raise ValueError(
                f"damping={self.damping!r}: the state was saved with γ={float(state['gamma'])!r} "
                "(relative_damping, or another damping); construct the estimator as it was saved"
            )

    def _load(self, state: Mapping[str, Any]) -> None:
        assert self._adam is not None
        saved = {tuple(block["names"]): block for block in state["blocks"]}
        mine = {tuple(f.names): f for f in self.forms}
        if set(saved) != set(mine):
            missing = sorted(n for names in set(mine) - set(saved) for n in names)
            extra = sorted(n for names in set(saved) - set(mine) for n in names)
            raise ValueError(f"FishLegFisher.load_state_dict: blocks differ; missing {missing}, unexpected {extra}")
        for names, form in mine.items():
            if saved[names]["kind"] != form.kind:
                raise ValueError(f"{list(names)}: saved as a {saved[names]['kind']!r} form, built as {form.kind!r}")
            form.load_state_dict(saved[names]["lambda"])
        self._adam.load_state_dict(state["optimizer"])
        self.updates = int(state.get("updates", self.updates))
        self.pretrained = bool(state.get("pretrained", self.pretrained))
        self._load_gamma(state)

    # -------------------------------------------------------------- internals
    def _ready(self, context: FisherContext) -> None:
        self.build(context)
        if self.pretrain_steps and not self.pretrained:
            losses = self.pretrain(context, self.pretrain_steps)
            self.pretrained = True
            log.info("FishLegFisher: %d pre-training updates, auxiliary loss %.4g -> %.4g", len(losses), losses[0], losses[-1])

    def _mask_view(self, context: FisherContext, params: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int]:
        """The pruner's masks of ``params`` that hold a pruned weight, and the active coordinate count,
        derived again only after the masks change."""
        masks = _masks_of(context, params)
        return self._learning_masks.get(masks, params, lambda: _partial_and_active(masks, params))

    def _params(self, context: FisherContext) -> dict[str, Tensor]:
        by_real = dict(context.model.named_parameters())
        return {name: by_real[self._real[name]] for name in self._where}

    def _diag(self) -> dict[str, Tensor]:
        with torch.no_grad():
            return {n: d.detach() for f in self.forms for n, d in zip(f.names, f.diagQ())}

    def _q(self, vectors: Mapping[str, Tensor], only: set[str] | None = None) -> dict[str, Tensor]:
        """Q·v block by block (zeros where a block's vector is not given); differentiable in λ."""
        out = {}
        for form in self.forms:
            if only is not None and not any(n in only for n in form.names):
                continue
            inputs = [vectors[n] if n in vectors else torch.zeros(s, device=form.scales[0].device) for n, s in zip(form.names, form.shapes)]
            out.update(zip(form.names, form.Qv(inputs)))
        return out

    def _has_optimizer_state(self, context: FisherContext) -> bool:
        if context.optimizer is None or context.effective_batch_size is None:
            return False
        try:
            self._squisher.check(context.optimizer)
        except (TypeError, ValueError):
            return False
        optimizer = context.optimizer
        while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        return any(optimizer.state.get(p) for p in context.parameters.values())

    def _fisher_estimate(self, context: FisherContext) -> dict[str, Tensor] | None:
        """F̂ for Q₀ and refreshes: ``diagonal_source``, else the Squisher or sampled-gradient batches
        (``init``); None for the identity."""
        params = self._params(context)
        if self.diagonal_source is not None:
            fisher = self.diagonal_source.diagonal(dataclasses.replace(context, parameters=params))
            if self.diagonal_source.needs_all_reduce:
                _average_over_ranks_(fisher.values())
            return fisher
        if self.init == "identity":
            return None
        if self.init in ("auto", "squisher"):
            if self._has_optimizer_state(context):
                return self._squisher.diagonal(dataclasses.replace(context, parameters=params))
            if self.init == "squisher":
                raise ValueError(
                    "init='squisher': the optimizer keeps no Adam-family squared-gradient state for these "
                    "parameters (or the batch size is unknown); use init='auto' or 'gradients'"
                )
        real = {self._real[n]: p for n, p in params.items()}
        sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in real.items()}
        count = 0
        generator = self._generator(params, salt=-1)
        for x, _ in context.iter_batches():
            for n, g in sampled_squared_gradient(context.model, real, x, generator).items():
                sums[n] += g.float()
            count += 1
            if count >= self.init_batches:
                break
        if count == 0:
            raise ValueError("FishLegFisher: init from gradients needs batches, but the context's batches are empty")
        _average_over_ranks_(sums.values())
        return {n: sums[self._real[n]] / count for n in params}

    def _damped_inverse(self, context: FisherContext, fisher: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """1/(F̂ + γ) per covered parameter (I/γ without F̂), after setting γ from F̂ if it is relative."""
        if fisher is None:
            return {n: torch.full_like(p, 1.0 / self.gamma, dtype=torch.float32) for n, p in self._params(context).items()}
        if self.relative_damping:
            total = sum(float(fisher[n].double().sum()) for n in context.parameters)
            count = sum(fisher[n].numel() for n in context.parameters)
            self.gamma = self.damping * total / count
            if not 0.0 < self.gamma < math.inf:
                raise ValueError(f"relative_damping: the mean Fisher of the pruned parameters is {total / count!r}; γ needs it > 0")
            log.info("FishLegFisher: γ = %.4g (%g × the mean Fisher %.4g)", self.gamma, self.damping, total / count)
        return {n: 1.0 / (f.float() + self.gamma) for n, f in fisher.items()}

    @torch.no_grad()
    def _rescale_diagonal(self, context: FisherContext) -> dict[str, Tensor]:
        """D_q ← D_q·√(target_q / Q_qq), target = 1/(F̂ + γ) now (× ρ_q for ``refresh_match="fisher"``);
        returns F̂.

        Pruned coordinates too: left at the scale of an earlier prune, their implied Fisher 1/Q_qq − γ
        would enter ``criterion="fisher"``'s relative damping (the mean of the whole diagonal) stale, so
        FishLeg without compensation would no longer damp, and rank, as OBD does on the same F̂."""
        fisher = self._fisher_estimate(context)
        assert fisher is not None  # refresh_diagonal rules out init="identity"
        target = self._damped_inverse(context, fisher)
        current = self._diag()
        for form in self.forms:
            inflation = form.correlation_inflation() if self.refresh_match == "fisher" else None
            for i, (name, scale) in enumerate(zip(form.names, form.coordinate_scales())):
                wanted = target[name].to(scale) if inflation is None else target[name].to(scale) * inflation[i]
                scale.mul_((wanted / current[name].clamp_min(self.floor)).sqrt())
        return fisher

    def _generator(self, params: Mapping[str, Tensor], salt: int) -> torch.Generator:
        device = next(iter(params.values())).device
        generator = torch.Generator(device=device)
        generator.manual_seed((self.seed * 1_000_003 + salt + 1) % (2**63))
        return generator

    def _probe_terms(
        self,
        context: FisherContext,
        params: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        generator: torch.Generator,
        masks: Mapping[str, Tensor],
        fvp: FvpMethod,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Probe u, w = Qu, h = F_γw − u (masked to the survivors, F·w by ``fvp``) and A(λ; u) summed over
        the coordinates (a 0-dim tensor, left on the device)."""
        if self.probe == "gaussian":
            u = {n: torch.randn(p.shape, generator=generator, device=p.device) for n, p in params.items()}
        else:
            real = {self._real[n]: p for n, p in params.items()}
            grads = loss_gradient(context.model, real, x, y, context.loss_fn)
            u = {n: grads[self._real[n]].float() for n in params}
        u = _masked(u, masks)
        with torch.no_grad():
            w = _masked(self._q(u), masks)
        real_w = {self._real[n]: w[n] for n in params}
        fw_real = fisher_vector_product(
            context.model, {self._real[n]: p for n, p in params.items()}, x, real_w, fvp, generator, self.fd_eps
        )
        fw = {n: fw_real[self._real[n]].float() for n in params}
        h = _masked({n: fw[n] + self.gamma * w[n] - u[n] for n in params}, masks)
        terms = sum(0.5 * (w[n] * (fw[n] + self.gamma * w[n])).sum() - (u[n] * w[n]).sum() for n in params)
        return u, w, h, terms

    def _update(self, context: FisherContext, x: Tensor, y: Tensor) -> float:
        """One Adam step on λ; returns the auxiliary loss A per active coordinate (before the step)."""
        assert self._adam is not None
        params = self._params(context)
        masks, active = self._mask_view(context, params)
        generator = self._generator(params, salt=self.updates)
        u, w, h, aux_sum = self._probe_terms(context, params, x, y, generator, masks, self.fvp)
        if self.precondition:
            with torch.no_grad():
                a, b = w, _masked(self._q(h), masks)
        else:
            a, b = u, h
        self._adam.zero_grad(set_to_none=True)
        with torch.enable_grad(), torch.inference_mode(False):
            qa = self._q(a)
            surrogate = sum((qa[n] * b[n]).sum() for n in qa) / active
            surrogate.backward()
        assert self._holder is not None
        _average_over_ranks_(p.grad for p in self._holder.parameters() if p.grad is not None)
        frozen = []
        for form in self.forms:
            for name, scale in zip(form.names, form.coordinate_scales()):
                if name in masks and scale.grad is not None:
                    kept = masks[name].to(scale.device)
                    scale.grad.masked_fill_(~kept, 0)
                    frozen.append((scale, kept, scale.detach().clone()))
        self._adam.step()
        with torch.no_grad():
            # Adam's momentum would keep moving them even at zero gradient
            for scale, kept, before in frozen:
                scale.copy_(torch.where(kept, scale, before))
        self.updates += 1
        return float(aux_sum) / active  # the update's one host-device sync

    def __repr__(self) -> str:
        return (
            f"FishLegFisher(damping={self.damping:g}, relative_damping={self.relative_damping}, "
            f"conv_form={self.conv_form!r}, lr={self.lr:g}, "
            f"update_every={self.update_every}, pretrain_steps={self.pretrain_steps}, probe={self.probe!r}, "
            f"fvp={self.fvp!r}, precondition={self.precondition}, init={self.init!r}, "
            f"refresh_diagonal={self.refresh_diagonal}, refresh_match={self.refresh_match!r}, "
            f"diagonal_source={self.diagonal_source!r})"
        )
