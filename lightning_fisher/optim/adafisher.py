"""AdaFisher and AdaFisherW: Adam-style momentum preconditioned by a diagonal Kronecker Fisher.

How it runs (the factor definitions are in :mod:`lightning_fisher.optim.factors`):

* The optimizer hooks the model's ``Linear``, ``Conv2d``, ``BatchNorm*`` and ``LayerNorm`` modules whose
  parameters it updates. A forward hook measures the layer input's second moments and registers a
  hook on the output tensor; when the backward pass reaches that output, the output gradient's second
  moments are measured and both are added to the step's pending sums. A forward pass that is never
  back-propagated (validation, or a forward under ``no_grad``) therefore contributes nothing. Tensor
  hooks rather than ``register_full_backward_hook``: the latter breaks on the in-place operations
  residual networks use after BatchNorm (``out += identity``, ``ReLU(inplace=True)``); a tensor hook
  receives the gradient of the value the layer produced, before any in-place change.
* Gradient accumulation: every micro-batch's forward/backward adds to the pending sums, and the step
  averages them (H over all samples and positions; S as n·Σs² with n the samples of the whole step,
  which is exact when the loss of each micro-batch is divided by the number of micro-batches, as
  Lightning does). ``zero_grad`` discards the pending sums together with the gradients, so a step
  that AMP's ``GradScaler`` skipped (non-finite gradients) leaves no trace in the factors.
* ``step()`` first commits the pending sums: under ``torch.distributed`` (initialised, world size > 1)
  they are all-reduced in one collective, because each rank sees different data and DDP needs every
  rank to apply the same update (gradients are averaged by DDP; the preconditioner must agree too).
  The factors' bias-corrected EMA (γ) is then updated and every parameter is stepped.
* Parameters are paired with their modules by identity (the Parameter objects of each hooked module),
  never by position in a list. Every other parameter the optimizer holds (embeddings, free
  parameters, layers of other types, parameters shared by two hooked modules) is updated by Adam with
  the group's ``lr``, ``betas``, ``eps`` and weight decay; nothing is left frozen. The construction log
  lists how many parameters each rule got.
* AMP: the output gradients are seen before unscaling, so a step's S is multiplied by the loss scale
  squared. The preconditioner min-max normalises S, which cancels any constant positive factor, and λ
  is added after normalisation, so while the scale is constant the updates do not depend on it
  (tested). When ``GradScaler`` changes its scale (it doubles after ``growth_interval`` = 2000 clean
  steps by default and halves after an overflow), the EMA briefly mixes S measured at two scales
  (weights off by 4× for about 1/(1 − γ) = 5 steps). :meth:`AdaFisher.attach_grad_scaler` removes
  even that: each step's S is divided by the scale squared before averaging. The raw factors that
  ``KroneckerFisher`` reads otherwise carry the scale squared: a factor common to every layer at a
  given step, so pruning rankings are unaffected.
* ``torch.compile``: the hooks are excluded from compilation (``torch.compiler.disable``), so a
  compiled model runs them eagerly between compiled regions (graph breaks at hooked layers: a
  conv-BN-ReLU-Linear model compiles to 3 graphs, against 6 when Dynamo tries to trace the hooks).
  Factors and updates match eager mode (tested with the ``aot_eager`` backend on CPU; ``inductor``
  checked by hand on CPU, differences of 2e-7).
* The hooks hold the optimizer weakly and are removed when it is garbage-collected (Lightning may
  build more than one optimizer on a model); copies of the model (``deepcopy``, pickling) carry inert
  hooks, so they never feed the original optimizer.
* Checkpoints: the factors live in the optimizer state of each layer's weight (keyed by torch's
  parameter numbering, like every optimizer's state); ``state_dict()["adafisher"]`` adds the step
  count and the module each factor belongs to, checked on load, so a different model fails with the
  module names instead of silently mixing factors.
* Host synchronisation: one per step (the finiteness check of all new factors together), none per
  layer, so a GPU step does not stall on every layer.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_fisher.optim.factors import (
    LayerKind,
    Role,
    activation_moments,
    ema_update_,
    expand,
    factor_sizes,
    gradient_moments,
    kronecker_diagonal,
    layer_kind,
    normalised,
)

__all__ = ["AdaFisher", "AdaFisherW"]

log = logging.getLogger(__name__)

STATE_VERSION = 1
_H, _S, _REFRESHES = "factor_h", "factor_s", "factor_refreshes"


@dataclass(eq=False)
class _Layer:
    """One hooked module, its parameters in this optimizer, and the sums pending for the next step."""

    name: str
    module: nn.Module
    kind: LayerKind
    params: dict[Role, nn.Parameter]
    h_size: int
    s_size: int
    act_sum: Tensor | None = None
    act_count: int = 0
    grad_sum: Tensor | None = None
    samples: int = 0
    handles: list[Any] = field(default_factory=list)

    @property
    def anchor(self) -> nn.Parameter:
        """The parameter whose optimizer state holds the layer's factors (the weight, else the bias)."""
        return self.params.get("weight", self.params.get("bias"))

    @property
    def has_bias_column(self) -> bool:
        return self.kind != "norm" and getattr(self.module, "bias", None) is not None

    def clear(self) -> None:
        self.act_sum = self.grad_sum = None
        self.act_count = self.samples = 0


def _transforms_active() -> bool:
    # Forward passes inside torch.func transforms (vmap/grad, as the per-sample Fisher estimators use)
    # carry wrapped tensors that must not escape into optimizer state.
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(check()) if check is not None else False


class _ForwardHook:
    """Measures one layer's input and arranges for its output gradient to be measured too.

    Holds the optimizer weakly: a model outlives optimizers built on it (Lightning may build several),
    and a discarded optimizer's hooks then do nothing. Unpickled or deep-copied hooks stay inert for
    any module other than the one they were registered on.
    """

    def __init__(self, optimizer: AdaFisher, layer: _Layer) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._layer = weakref.ref(layer)

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._optimizer = self._layer = lambda: None

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        optimizer, layer = self._optimizer(), self._layer()
        if optimizer is None or layer is None or layer.module is not module or not optimizer._collecting:
            return
        if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
            return
        if not args or not isinstance(args[0], Tensor) or _transforms_active():
            return
        with torch.no_grad():
            act_sum, act_count = activation_moments(module, layer.kind, args[0])
        output.register_hook(_GradHook(optimizer, layer, act_sum, act_count))


class _GradHook:
    """Fires when the backward pass reaches a hooked layer's output: adds this forward's sums."""

    def __init__(self, optimizer: AdaFisher, layer: _Layer, act_sum: Tensor, act_count: int) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._layer = layer
        self._act = (act_sum, act_count)

    @torch.compiler.disable
    def __call__(self, grad: Tensor) -> None:
        optimizer = self._optimizer()
        if optimizer is None or not optimizer._collecting:
            return
        with torch.no_grad():
            grad_sum, samples = gradient_moments(self._layer.module, self._layer.kind, grad)
            optimizer._add_pending(self._layer, *self._act, grad_sum, samples)


class AdaFisher(torch.optim.Optimizer):
    """AdaFisher: Adam-style momentum preconditioned by a diagonal Kronecker-factored Fisher, no square root.

    Implements Gomes, Zhang, Belilovsky, Wolf and Hosseini, "AdaFisher: Adaptive Second Order
    Optimization via Fisher Information" (ICLR 2025, arXiv 2405.16397), without the defects of the
    public reference code: parameters are paired with modules by identity, the factor EMA's weights
    sum to one, the factors are normalised after averaging (not before), and they are refreshed every
    step by default. Per hooked layer with averaged factor diagonals H (inputs) and S (output
    gradients), see :mod:`lightning_fisher.optim.factors`::

        H ← γ H + (1 − γ) H_new,  S ← γ S + (1 − γ) S_new          (bias-corrected, weights sum to 1)
        F̃ = minmax(H) ⊗ minmax(S) + λ                                (norm layers: H ⊙ minmax(S) + λ)
        m ← β₁ m + (1 − β₁) g,   m̂ = m / (1 − β₁^t)
        θ ← θ − lr · m̂ / F̃

    Every parameter of the optimizer that no hooked layer owns is updated by Adam
    (θ ← θ − lr · fallback_lr_scale · m̂ / (√v̂ + eps): Adam's own scale, 1e-3 at the default lr, and
    it follows any learning-rate schedule). Weight decay is coupled (added to the gradient, like
    ``torch.optim.Adam``); :class:`AdaFisherW` decouples it. Until a layer's factors have been
    measured once, its preconditioner is the identity.

    Defaults (``lr=1.0``, ``damping=0.3``, not the paper's 1e-3 and 1e-3). After min-max
    normalisation F̃ lies in [λ, 1 + λ], so a coordinate moves by between lr/(1 + λ) and lr/λ times its
    momentum: lr and λ set the step together, and the paper's pair gives steps from 1e-3 · m̂ (most
    curved) to 1 · m̂ (least curved). The reference code behaves well with that pair only because of its
    defects: its EMA weights (0.08 and 0.008 at γ = 0.8) shrink each factor to about 0.0087 of its
    normalised value, so its F̃ ≈ λ everywhere and its update is lr/λ · m̂ = m̂, i.e. SGD with momentum
    at an effective lr of 0.1. With the factors as the paper defines them, the paper's pair trains
    ResNet18 on our CPU proxy to 30.2% where Adam reaches 49.5% and SGD 59.6%; an lr × λ grid on
    the same proxy (``benchmarks/results/optimizers_cpu.md``) found lr ≈ 3λ with λ ≥ 0.1 best
    (λ = 0.3, lr = 1: 59.2%) and lr/λ ≥ 10 unstable. Retune both together for other models.

    Args:
        params: the model (``nn.Module``: all its parameters, and its layers are hooked), or parameters /
            parameter groups, in which case ``model`` must be given. Groups may set ``lr``, ``betas``,
            ``weight_decay`` and ``eps``.
        lr: learning rate (scale it with ``damping``: see "Defaults" above).
        betas: (β₁, β₂). β₁ is the momentum of every update (the paper's β = 0.9); β₂ is the
            second-moment decay of the Adam rule used for parameters without factors.
        gamma: EMA decay γ of the factors (the paper's 0.8).
        damping: Tikhonov damping λ added to the normalised Kronecker product (the paper's 1e-3; the
            largest step is lr/λ times the momentum).
        weight_decay: coupled L2 penalty (AdaFisher) or decoupled decay (AdaFisherW).
        eps: denominator term of the Adam rule (parameters without factors only).
        refresh_interval: measure and average the factors every this many steps (1 = every step, the
            default). In between, the hooks do nothing and the last factors are reused; the reference
            code's 100 leaves the preconditioner stale for long stretches.
        fallback_lr_scale: the Adam rule of parameters without factors uses ``lr × fallback_lr_scale``
            (AdaFisher's lr is on a different scale from Adam's; groups may set their own).
        model: the module to hook when ``params`` are parameters or groups (e.g. from a Hydra
            ``_partial_`` factory called as ``factory(param_groups, model=net)``).

    Raises:
        ValueError: a hyper-parameter out of range, or no model to hook.
        TypeError: ``model`` is not an ``nn.Module``.

    Example::

        optimizer = AdaFisher(model)                    # in a LightningModule: AdaFisher(self)
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    """

    decoupled_weight_decay: bool = False

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        gamma: float = 0.8,
        damping: float = 0.3,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        refresh_interval: int = 1,
        fallback_lr_scale: float = 1e-3,
        *,
        model: nn.Module | None = None,
    ) -> None:
        _check_hyperparameters(lr, betas, weight_decay, eps)
        if not (isinstance(gamma, (int, float)) and 0.0 <= gamma < 1.0):
            raise ValueError(f"gamma={gamma!r}: must be in [0, 1)")
        for name, value in (("damping", damping), ("fallback_lr_scale", fallback_lr_scale)):
            if not (isinstance(value, (int, float)) and 0.0 < value < math.inf):
                raise ValueError(f"{name}={value!r}: must be a positive finite number")
        if isinstance(refresh_interval, bool) or not isinstance(refresh_interval, int) or refresh_interval < 1:
            raise ValueError(f"refresh_interval={refresh_interval!r}: must be an integer >= 1")
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("model=...: pass the model either as the first argument or as model=, not both")
            model, params = params, list(params.parameters())
        elif model is None:
            raise ValueError(
                f"model=None: {type(self).__name__} hooks the model's Linear/Conv2d/norm layers, so it needs the "
                f"model: {type(self).__name__}(model, lr=...) or {type(self).__name__}(param_groups, model=model)"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model={type(model).__name__}: must be a torch.nn.Module")
        defaults = {
            "lr": lr, "betas": tuple(betas), "weight_decay": weight_decay, "eps": eps,
            "fallback_lr_scale": fallback_lr_scale,
        }
        self._model: nn.Module | None = None
        super().__init__(params, defaults)
        self.gamma = float(gamma)
        self.damping = float(damping)
        self.refresh_interval = refresh_interval
        self._model = model
        self._layers: list[_Layer] = []
        self._owner: dict[int, tuple[_Layer, Role]] = {}
        self._lock = threading.Lock()
        self._steps = 0
        self._collecting = True
        self._grad_scaler: Any = None
        self._handles: list[Any] = []
        # hooks of an optimizer that is garbage-collected are removed from the model too
        weakref.finalize(self, _remove_handles, self._handles)
        self._sync_layers()
        self._log_coverage()

    # ------------------------------------------------------------------ layers and hooks
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if self._model is not None:  # groups added after construction (e.g. unfreezing) get hooked too
            self._sync_layers()

    def _optimized(self) -> dict[int, nn.Parameter]:
        return {id(p): p for group in self.param_groups for p in group["params"]}

    def _sync_layers(self) -> None:
        """Hook every supported module owning optimized parameters; pair parameters by identity."""
        assert self._model is not None
        optimized = self._optimized()
        claims: dict[int, list[tuple[str, nn.Module, Role]]] = {}
        modules: list[tuple[str, nn.Module, LayerKind]] = []
        for name, module in self._model.named_modules():
            kind = layer_kind(module)
            if kind is None:
                continue
            modules.append((name, module, kind))
            for role in ("weight", "bias"):
                param = getattr(module, role, None)
                if isinstance(param, nn.Parameter):
                    claims.setdefault(id(param), []).append((name, module, role))
        shared = {pid for pid, owners in claims.items() if len(owners) > 1}
        for pid in shared & set(optimized):
            log.warning(
                "AdaFisher: a parameter is shared by %s; it gets the Adam rule (Kronecker factors are per module)",
                ", ".join(owner[0] or "<root>" for owner in claims[pid]),
            )
        existing = {id(layer.module): layer for layer in self._layers}
        layers = []
        for name, module, kind in modules:
            params: dict[Role, nn.Parameter] = {}
            for role in ("weight", "bias"):
                param = getattr(module, role, None)
                if isinstance(param, nn.Parameter) and id(param) in optimized and id(param) not in shared:
                    params[role] = param
            if not params:
                continue
            layer = existing.pop(id(module), None)
            if layer is None:
                h_size, s_size = factor_sizes(module, kind)
                layer = _Layer(name, module, kind, params, h_size, s_size)
                handle = module.register_forward_hook(_ForwardHook(self, layer))
                layer.handles.append(handle)
                self._handles.append(handle)
            layer.params = params
            layers.append(layer)
        for stale in existing.values():
            for handle in stale.handles:
                handle.remove()
        self._layers = layers
        self._owner = {id(p): (layer, role) for layer in layers for role, p in layer.params.items()}

    def _log_coverage(self) -> None:
        names = {id(p): n for n, p in self._model.named_parameters()} if self._model is not None else {}
        optimized = self._optimized()
        adam = [names.get(pid, "<not in model>") for pid in optimized if pid not in self._owner]
        kinds = {kind: sum(layer.kind == kind for layer in self._layers) for kind in ("linear", "conv2d", "norm")}
        log.info(
            "%s: Kronecker factors for %d layers (%d Linear, %d Conv2d, %d norm) covering %d parameter tensors; "
            "Adam rule for %d: %s",
            type(self).__name__, len(self._layers), kinds["linear"], kinds["conv2d"], kinds["norm"],
            len(self._owner), len(adam), ", ".join(adam) if adam else "none",
        )

    def attach_grad_scaler(self, scaler: Any) -> None:
        """Divide each step's S by the AMP loss scale squared (``scaler.get_scale()``; ``None`` detaches).

        Optional: min-max normalisation already cancels a constant scale. With the scaler attached the
        factors are in unscaled units, and scale changes leave no transient. In Lightning the scaler is
        ``trainer.precision_plugin.scaler`` (``16-mixed`` precision).
        """
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(f"scaler={type(scaler).__name__}: needs a get_scale() method like torch.amp.GradScaler")
        self._grad_scaler = scaler

    def remove_hooks(self) -> None:
        """Detach the hooks from the model (the optimizer then keeps its last factors)."""
        for layer in self._layers:
            layer.handles.clear()
        _remove_handles(self._handles)

    # ------------------------------------------------------------------ pending sums
    def _add_pending(self, layer: _Layer, act_sum: Tensor, act_count: int, grad_sum: Tensor, samples: int) -> None:
        with self._lock:
            layer.act_sum = act_sum if layer.act_sum is None else layer.act_sum + act_sum.to(layer.act_sum)
            layer.grad_sum = grad_sum if layer.grad_sum is None else layer.grad_sum + grad_sum.to(layer.grad_sum)
            layer.act_count += act_count
            layer.samples += samples

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and discard the factor sums measured since the last step, like the gradients."""
        super().zero_grad(set_to_none=set_to_none)
        for layer in self._layers:
            layer.clear()

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _local_factors(self, layer: _Layer) -> tuple[Tensor, Tensor, bool]:
        """(H sums with the bias column, n·Σs², present) of this rank; zeros when the layer saw nothing."""
        device = layer.anchor.device
        h = torch.zeros(layer.h_size, device=device)
        s = torch.zeros(layer.s_size, device=device)
        if layer.act_sum is None or layer.samples == 0:
            return h, s, False
        width = layer.act_sum.numel()
        h[:width] = layer.act_sum.to(device)
        if layer.has_bias_column:
            h[width:] = layer.act_count  # the constant 1 squared, summed like the inputs
        s.copy_(layer.grad_sum.to(device)).mul_(layer.samples)
        return h, s, True

    @torch.no_grad()
    def _commit(self) -> None:
        """Turn the pending sums into this step's factors (all-reduced across ranks) and average them."""
        if not self._collecting:
            return
        rows = []
        for layer in self._layers:
            h, s, present = self._local_factors(layer)
            rows.append((h, float(layer.act_count), s, float(present)))
            layer.clear()
        if not rows:
            return
        if self._distributed():
            rows = self._all_reduce(rows)
        updates = []
        for layer, (h, count, s, present) in zip(self._layers, rows):
            if present > 0 and count > 0:
                updates.append((layer, h / count, s / present))
        if not updates:
            return
        if self._grad_scaler is not None:
            inverse_square = 1.0 / float(self._grad_scaler.get_scale()) ** 2
            updates = [(layer, h, s * inverse_square) for layer, h, s in updates]
        device = updates[0][1].device
        finite = torch.stack(
            [(torch.isfinite(h).all() & torch.isfinite(s).all()).to(device) for _, h, s in updates]
        ).tolist()  # one host synchronisation per step, not one per layer
        for (layer, h_new, s_new), ok in zip(updates, finite):
            if not ok:
                log.warning("AdaFisher: non-finite factors for %s skipped at step %d", layer.name, self._steps + 1)
                continue
            state = self.state[layer.anchor]
            if _H not in state:
                state[_H] = torch.zeros(layer.h_size, device=layer.anchor.device)
                state[_S] = torch.zeros(layer.s_size, device=layer.anchor.device)
                state[_REFRESHES] = 0
            state[_REFRESHES] += 1
            ema_update_(state[_H], h_new, self.gamma, state[_REFRESHES])
            ema_update_(state[_S], s_new, self.gamma, state[_REFRESHES])

    def _all_reduce(self, rows: list[tuple[Tensor, float, Tensor, float]]) -> list[tuple[Tensor, float, Tensor, float]]:
        """Sum every layer's (H sums, count, n·Σs², present) over the ranks in one collective."""
        device = self._layers[0].anchor.device
        pieces = []
        for h, count, s, present in rows:
            pieces += [
                h.to(device), torch.tensor([count], device=device), s.to(device), torch.tensor([present], device=device)
            ]
        flat = torch.cat(pieces)
        dist.all_reduce(flat)
        sizes = [size for layer in self._layers for size in (layer.h_size, 1, layer.s_size, 1)]
        parts = flat.split(sizes)
        scalars = torch.cat([parts[i] for i in range(len(parts)) if i % 2 == 1]).tolist()
        return [
            (parts[4 * i], scalars[2 * i], parts[4 * i + 2], scalars[2 * i + 1]) for i in range(len(self._layers))
        ]

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._commit()
        normalised_factors: dict[int, tuple[Tensor, Tensor] | None] = {}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, decay, eps = group["lr"], group["weight_decay"], group["eps"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                grad = param.grad
                if decay != 0.0:
                    if self.decoupled_weight_decay:
                        param.mul_(1.0 - lr * decay)
                    else:
                        grad = grad.add(param, alpha=decay)
                state = self.state[param]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                exp_avg = state["exp_avg"]
                exp_avg.lerp_(grad, 1.0 - beta1)
                bias1 = 1.0 - beta1 ** state["step"]
                owner = self._owner.get(id(param))
                if owner is None:
                    self._adam_update(param, grad, state, lr * group["fallback_lr_scale"], beta2, eps, bias1)
                    continue
                layer, role = owner
                if id(layer) not in normalised_factors:
                    normalised_factors[id(layer)] = self._normalised(layer)
                factors = normalised_factors[id(layer)]
                if factors is None:  # no measurement yet: identity preconditioner
                    param.add_(exp_avg, alpha=-lr / bias1)
                    continue
                curvature = expand(layer.module, layer.kind, role, *factors).add_(self.damping)
                param.addcdiv_(exp_avg, curvature.to(param.dtype), value=-lr / bias1)
        self._steps += 1
        self._collecting = self._steps % self.refresh_interval == 0
        return loss

    @staticmethod
    def _adam_update(
        param: Tensor, grad: Tensor, state: dict[str, Any], lr: float, beta2: float, eps: float, bias1: float
    ) -> None:
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bias2 = 1.0 - beta2 ** state["step"]
        denom = (exp_avg_sq / bias2).sqrt_().add_(eps)
        param.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)

    def _normalised(self, layer: _Layer) -> tuple[Tensor, Tensor] | None:
        state = self.state.get(layer.anchor, {})
        if not state.get(_REFRESHES):
            return None
        return normalised(layer.kind, state[_H], state[_S])

    # ------------------------------------------------------------------ what KroneckerFisher reads
    def covers(self, param: Tensor) -> bool:
        """Whether ``param`` is preconditioned by Kronecker factors (else it gets the Adam rule)."""
        return id(param) in self._owner and self._owner[id(param)][0].params[self._owner[id(param)][1]] is param

    def fisher_diagonal(self, param: Tensor) -> Tensor:
        """diag(H) ⊗ diag(S) from the raw averaged factors, shaped like ``param`` (float32).

        Raises:
            KeyError: ``param`` has no factors (it is updated by the Adam rule).
            RuntimeError: the factors have not been measured yet (no step with a backward pass).
        """
        if not self.covers(param):
            raise KeyError("parameter is not covered by AdaFisher's Kronecker factors (it gets the Adam rule)")
        layer, role = self._owner[id(param)]
        state = self.state.get(layer.anchor, {})
        if not state.get(_REFRESHES):
            raise RuntimeError(f"{layer.name}: no Kronecker factors yet (no optimizer step after a backward pass)")
        return kronecker_diagonal(layer.module, layer.kind, role, state[_H].float(), state[_S].float())

    def preconditioner(self, param: Tensor) -> Tensor:
        """The F̃ the next step divides ``param``'s momentum by (identity before the first measurement)."""
        if not self.covers(param):
            raise KeyError("parameter is not covered by AdaFisher's Kronecker factors (it gets the Adam rule)")
        layer, role = self._owner[id(param)]
        factors = self._normalised(layer)
        if factors is None:
            return torch.ones_like(param, dtype=torch.float32)
        return expand(layer.module, layer.kind, role, *factors).add_(self.damping)

    def factors(self) -> dict[str, dict[str, Any]]:
        """``{module name: {"kind", "H", "S", "refreshes"}}``: copies of the averaged raw factors."""
        out = {}
        for layer in self._layers:
            state = self.state.get(layer.anchor, {})
            if state.get(_REFRESHES):
                out[layer.name] = {
                    "kind": layer.kind, "H": state[_H].clone(), "S": state[_S].clone(), "refreshes": state[_REFRESHES]
                }
        return out

    @property
    def steps(self) -> int:
        """Optimizer steps taken (decides the refresh schedule)."""
        return self._steps

    # ------------------------------------------------------------------ checkpoints
    def _indices(self) -> dict[int, int]:
        """Each parameter's position in torch's state-dict numbering (groups in order, then params)."""
        order = (p for group in self.param_groups for p in group["params"])
        return {id(p): i for i, p in enumerate(order)}

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state (factors live in each layer's weight state) plus the step count.

        ``adafisher.layers`` names the module whose factors each state entry holds, so loading into a
        different model fails with the module names rather than silently mixing factors.
        """
        state = super().state_dict()
        indices = self._indices()
        layers = {
            layer.name: indices[id(layer.anchor)] for layer in self._layers if _H in self.state.get(layer.anchor, {})
        }
        state["adafisher"] = {"version": STATE_VERSION, "steps": self._steps, "layers": layers}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("adafisher", None)
        if not isinstance(extra, dict) or extra.get("version") != STATE_VERSION:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: not an AdaFisher state (its 'adafisher' entry is "
                f"{extra!r}; expected version {STATE_VERSION})"
            )
        indices = self._indices()
        ours = {layer.name: indices[id(layer.anchor)] for layer in self._layers}
        saved = dict(extra.get("layers", {}))
        problems = [
            f"{name}: not a hooked layer of this model" if name not in ours else f"{name}: its parameters moved"
            for name, index in saved.items()
            if ours.get(name) != index
        ]
        if not problems:
            for layer in self._layers:
                if layer.name not in saved:
                    continue
                entry = state_dict["state"].get(saved[layer.name], {})
                sizes = (entry[_H].numel(), entry[_S].numel()) if _H in entry and _S in entry else None
                if sizes != (layer.h_size, layer.s_size):
                    problems.append(f"{layer.name}: saved factor sizes {sizes} != ({layer.h_size}, {layer.s_size})")
        if problems:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the model does not match: " + "; ".join(problems))
        super().load_state_dict(state_dict)
        for layer in self._layers:
            state = self.state.get(layer.anchor, {})
            if _H in state:  # torch casts state to the parameter's dtype on load; factors stay float32
                state[_H] = state[_H].float()
                state[_S] = state[_S].float()
            layer.clear()
        self._steps = int(extra["steps"])
        self._collecting = self._steps % self.refresh_interval == 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={len(getattr(self, '_layers', []))}, gamma={getattr(self, 'gamma', None)}, "
            f"damping={getattr(self, 'damping', None)}, refresh_interval={getattr(self, 'refresh_interval', None)}, "
            f"param_groups={len(self.param_groups)})"
        )


class AdaFisherW(AdaFisher):
    """AdaFisher with decoupled weight decay θ ← θ (1 − lr · weight_decay) (Loshchilov & Hutter, ICLR 2019).

    The AdaFisherW variant of Gomes et al. (ICLR 2025, arXiv 2405.16397). Same arguments as
    :class:`AdaFisher`; the decay is applied to every parameter of a group with ``weight_decay > 0``,
    outside the preconditioner. Its default 5e-5 shrinks the weights by lr · 5e-5 = 5e-5 per step at
    the default lr of 1, what SGD's coupled 5e-4 does at lr 0.1 (AdamW's 1e-2 is for lr ≈ 1e-3: at
    lr 1 it would remove 1% of every weight at every step).
    """

    decoupled_weight_decay = True

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        gamma: float = 0.8,
        damping: float = 0.3,
        weight_decay: float = 5e-5,
        eps: float = 1e-8,
        refresh_interval: int = 1,
        fallback_lr_scale: float = 1e-3,
        *,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, gamma=gamma, damping=damping, weight_decay=weight_decay, eps=eps,
            refresh_interval=refresh_interval, fallback_lr_scale=fallback_lr_scale, model=model,
        )


def _remove_handles(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _check_hyperparameters(lr: float, betas: Any, weight_decay: float, eps: float) -> None:
    if not (isinstance(lr, (int, float)) and 0.0 <= lr < math.inf):
        raise ValueError(f"lr={lr!r}: must be a non-negative finite number")
    if (
        isinstance(betas, str)
        or not isinstance(betas, Sequence)
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ValueError(f"betas={betas!r}: must be two numbers in [0, 1)")
    if not (isinstance(weight_decay, (int, float)) and 0.0 <= weight_decay < math.inf):
        raise ValueError(f"weight_decay={weight_decay!r}: must be a non-negative finite number")
    if not (isinstance(eps, (int, float)) and 0.0 < eps < math.inf):
        raise ValueError(f"eps={eps!r}: must be a positive finite number")
