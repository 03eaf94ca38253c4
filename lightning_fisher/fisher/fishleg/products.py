"""Fisher-vector products F·v for FishLeg's auxiliary loss: on labels sampled from the model, or exact (GGN).

F = E_x E_{ŷ~p(·|x)}[g gᵀ] with g = ∇θ(−log p(ŷ|x)). Two estimates on a mini-batch of B inputs with
labels ŷ drawn once per input from the model's softmax (``torch.multinomial``, a seeded generator), and
the exact product on the mini-batch, where the expectation over ŷ is taken in closed form:

- ``"finite_difference"``: central differences of the sampled-label gradient,
  F·v ≈ [ḡ(θ + εv) − ḡ(θ − εv)] / 2ε, with ḡ the batch-mean gradient at the fixed labels ŷ. This is
  the Hessian of the sampled-label loss times v, whose expectation over ŷ is F·v (the term with the
  logits' second derivative is weighted by (p − e_ŷ) and averages out). ε = ``fd_eps``·(1 + ‖θ‖)/‖v‖,
  the usual √(machine ε)-sized relative step; error O(ε²). Three forwards, two backwards.
- ``"rank1"``: F·v ≈ B · ḡ (ḡᵀv), ḡ the batch-mean sampled-label gradient. Unbiased (per-sample
  gradients at sampled labels have zero mean, so cross terms vanish in expectation) but noisy; one
  forward and one backward.
- ``"ggn"``: F·v = (1/B) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i v, J_i the Jacobian of input i's logits and
  p_i its softmax: for softmax cross-entropy the Fisher is the generalised Gauss-Newton matrix
  (Schraudolph 2002; Martens 2014, "New insights and perspectives on the natural gradient method"). No
  labels are drawn, and the estimate is positive semi-definite on every batch. The sampled-label
  Hessian of ``"finite_difference"`` is not: with a damping γ below the size of its negative
  eigenvalues the auxiliary loss of a batch is unbounded below. One forward-mode and one reverse-mode
  pass (``torch.func.jvp``, ``torch.func.vjp``).

The model runs in eval mode during a product (BatchNorm uses its running statistics and keeps them,
dropout is off) and the parameters are never modified: perturbed copies go through
``torch.func.functional_call``. The loss is plain cross-entropy on ``[batch, classes]`` logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "FVP_METHODS",
    "eval_mode",
    "FvpMethod",
    "fisher_vector_product",
    "loss_gradient",
    "sample_labels",
    "sampled_squared_gradient",
]

FvpMethod = Literal["finite_difference", "rank1", "ggn"]
FVP_METHODS: tuple[str, ...] = ("finite_difference", "rank1", "ggn")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block, each one's own flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training


def sample_labels(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One label per row drawn from ``softmax(logits)``."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _gradients(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    loss: Callable[[Tensor], Tensor],
) -> dict[str, Tensor]:
    """∇ loss(model(x)) w.r.t. ``params`` ({name in model.named_parameters(): value}) at those values."""
    leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
    out = loss(functional_call(model, leaves, (x,), strict=False))
    grads = torch.autograd.grad(out, list(leaves.values()), allow_unused=True)
    return {name: torch.zeros_like(v) if g is None else g for (name, v), g in zip(leaves.items(), grads)}


def fisher_vector_product(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    vectors: Mapping[str, Tensor],
    method: FvpMethod = "finite_difference",
    generator: torch.Generator | None = None,
    fd_eps: float = 1e-3,
) -> dict[str, Tensor]:
    """F·v restricted to ``params`` (keys: names in ``model.named_parameters()``) on the batch ``x``.

    ``vectors`` has one tensor per key of ``params``; the product has the same keys. The Fisher block
    is the one of ``params`` only: the other parameters stay at their values.
    """
    if method not in FVP_METHODS:
        raise ValueError(f"method={method!r}: must be one of {FVP_METHODS}")
    if method == "ggn":
        return _ggn_vector_product(model, params, x, vectors)
    with eval_mode(model):
        with torch.no_grad():
            labels = sample_labels(model(x), generator)

        def loss(logits: Tensor) -> Tensor:
            return F.cross_entropy(logits.float(), labels)

        if method == "rank1":
            grads = _gradients(model, params, x, loss)
            dot = sum((grads[n].float() * vectors[n].float()).sum() for n in params)
            return {n: grads[n] * (dot * len(x)) for n in params}
        v_norm = torch.sqrt(sum(vectors[n].float().square().sum() for n in params))
        if float(v_norm) == 0.0:
            return {n: torch.zeros_like(p) for n, p in params.items()}
        theta_norm = torch.sqrt(sum(p.detach().float().square().sum() for p in params.values()))
        eps = fd_eps * (1.0 + theta_norm) / v_norm
        plus = _gradients(model, {n: p.detach() + eps * vectors[n] for n, p in params.items()}, x, loss)
        minus = _gradients(model, {n: p.detach() - eps * vectors[n] for n, p in params.items()}, x, loss)
        return {n: (plus[n] - minus[n]) / (2 * eps) for n in params}


def _ggn_vector_product(
    model: nn.Module, params: Mapping[str, Tensor], x: Tensor, vectors: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """(1/B) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i v: the exact Fisher-vector product of softmax outputs."""
    primals = {n: p.detach() for n, p in params.items()}
    tangents = {n: vectors[n].to(p.dtype) for n, p in primals.items()}

    def logits_of(values: dict[str, Tensor]) -> Tensor:
        return functional_call(model, values, (x,), strict=False).float()

    with eval_mode(model):
        logits, jv = torch.func.jvp(logits_of, (primals,), (tangents,))
        probs = torch.softmax(logits, dim=-1)
        hjv = probs * (jv - (probs * jv).sum(dim=-1, keepdim=True)) / len(x)
        _, pullback = torch.func.vjp(logits_of, primals)
        (product,) = pullback(hjv)
    return {n: product[n].detach() for n in params}


def sampled_squared_gradient(
    model: nn.Module, params: Mapping[str, Tensor], x: Tensor, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """B·ḡ² with ḡ the batch-mean gradient at labels sampled from the model: unbiased for diag(F)."""
    with eval_mode(model):
        with torch.no_grad():
            labels = sample_labels(model(x), generator)
        grads = _gradients(model, params, x, lambda logits: F.cross_entropy(logits.float(), labels))
    return {n: g.square() * len(x) for n, g in grads.items()}


def loss_gradient(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """∇ of the training loss (true labels) w.r.t. ``params``: FishLeg's gradient probe."""
    loss_fn = loss_fn or F.cross_entropy
    with eval_mode(model):
        return _gradients(model, params, x, lambda logits: loss_fn(logits, targets))
