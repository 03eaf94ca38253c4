"""AdaFisher's per-layer Kronecker factors: what the hooks measure, how it is averaged, how it is used.

Exact definitions (Gomes et al., "AdaFisher: Adaptive Second Order Optimization via Fisher
Information", ICLR 2025, arXiv 2405.16397; conventions of K-FAC, Martens & Grosse 2015, and of its
convolutional form KFC, Grosse & Martens 2016). For one optimizer step that averaged the loss over n
samples (all micro-batches of the step; one rank), with a_{n,t} the layer input at sample n and
position t (a patch of the unfolded input for Conv2d, a token for a Linear applied to sequences, a
single position otherwise), and s_{n,t} = ∂(mean loss)/∂(layer output) the gradient the backward pass
delivers, so that n·s_{n,t} is the gradient of sample n's own loss:

* activation factor ``H[j] = mean over (n, t) of a_{n,t,j}²`` — the diagonal of K-FAC's Ā. For layers
  with a bias the input is extended by a constant 1 (the "bias column"), whose entry is exactly 1.
  Conv2d entries are ordered like ``weight[o].flatten()`` (input channel, kernel row, kernel column),
  computed from the zero- (or reflect/replicate/circular-) padded input at every stride/dilation
  position, without materialising the unfolded patches (the input is squared and summed over the
  batch first).
* gradient factor ``S[i] = mean over n of Σ_t (n·s_{n,t,i})² = n · Σ_{n,t} s_{n,t,i}²`` — the diagonal
  of K-FAC's G for per-sample losses, summed over positions as in KFC (under KFC's spatially
  uncorrelated derivatives, E[(Σ_t δ_t a_t)²] ≈ Σ_t E[δ_t²] E[a_t²] = S·H).
* The Fisher diagonal of the layer is then ``F[i, j] = S[i] · H[j]`` (diag H ⊗ diag S): for a Linear
  layer exactly K-FAC's diagonal E[a²]·E[g²], for Conv2d KFC's. A grouped convolution pairs output
  channel i with the inputs of its own group.
* Normalisation layers (``BatchNorm1d/2d/3d`` and ``LayerNorm`` with affine parameters) get their own
  diagonal form. They compute y = γ ⊙ x̂ + β, a per-feature (diagonal) affine map of the normalised
  input x̂, so the Kronecker product collapses to a product per feature: ``H[c] = mean over (n, t) of
  x̂_{n,t,c}²`` (with the batch statistics in training mode, the running ones in evaluation mode, like
  the layer itself), ``S[c]`` as above, ``F_γ[c] = H[c]·S[c]`` and ``F_β[c] = S[c]``. The paper's form
  keeps a two-entry H (one value shared by all scales, one by all shifts); min-max normalising a
  two-entry vector always yields {0, 1}, which would give every scale (or every shift) the damping λ
  alone as curvature, so we keep the per-feature product instead (see :func:`preconditioner`).

Averaging over steps is a bias-corrected exponential moving average whose weights sum to one at every
refresh k: X_k = X_{k−1} + w_k (X_new − X_{k−1}) with w_k = (1 − γ)/(1 − γ^k), i.e.
X_k = Σ_j (1 − γ) γ^{k−j} X_j / (1 − γ^k); the first refresh takes X_new as it is.

The preconditioner (paper, eq. for F̃) min-max normalises the averaged factors, after averaging:
minmax(v) = (v − min v)/(max v − min v), then F̃ = minmax(H) ⊗ minmax(S) + λ. A factor whose entries
are all equal (up to rounding, see :func:`min_max`) carries no relative information and normalises to
all ones. For normalisation layers only
S is min-max normalised: their H is already scale-free (a second moment of a standardised quantity,
≈ 1 per feature under BatchNorm), and min-max over values that are nearly equal would only amplify
their noise. The raw (not normalised) averaged factors are the Fisher estimate
(:func:`kronecker_diagonal`), which ``KroneckerFisher`` reads for pruning.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "MIN_MAX_RELATIVE_SPREAD",
    "LayerKind",
    "Role",
    "activation_moments",
    "ema_update_",
    "expand",
    "factor_sizes",
    "gradient_moments",
    "kronecker_diagonal",
    "layer_kind",
    "min_max",
    "normalised",
    "preconditioner",
]

LayerKind = Literal["linear", "conv2d", "norm"]
Role = Literal["weight", "bias"]


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The factor form of ``module``, or ``None`` when AdaFisher keeps no factors for it."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, (_BatchNorm, nn.LayerNorm)):
        return "norm"
    return None


def _has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def _feature_shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, nn.LayerNorm):
        return tuple(module.normalized_shape)
    return (module.num_features,)


def factor_sizes(module: nn.Module, kind: LayerKind) -> tuple[int, int]:
    """Lengths of the flat H and S vectors of ``module`` (H includes the bias column when there is one)."""
    bias = int(_has_bias(module))
    if kind == "linear":
        return module.in_features + bias, module.out_features
    if kind == "conv2d":
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw + bias, module.out_channels
    features = math.prod(_feature_shape(module))
    return features, features


# ---------------------------------------------------------------------------------------- measurement
def _conv_padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of the input, as F.pad takes it."""
    if module.padding == "valid":
        return 0, 0, 0, 0
    if module.padding == "same":
        pads = []
        for k, d in zip(module.kernel_size, module.dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return left, right, top, bottom
    ph, pw = module.padding
    return pw, pw, ph, ph


def _standardised(module: nn.LayerNorm, x: Tensor) -> Tensor:
    """x̂ as LayerNorm computes it (before its affine map)."""
    dims = tuple(range(x.ndim - len(module.normalized_shape), x.ndim))
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + module.eps)


def _sum_of_squares(x: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    # vector_norm reduces without materialising x², several times faster than x.square().sum() on CPU
    return torch.linalg.vector_norm(x, 2, dim=dim).square()


def activation_moments(module: nn.Module, kind: LayerKind, x: Tensor) -> tuple[Tensor, int]:
    """(Σ over samples and positions of a², number of (sample, position) pairs) for one forward.

    The sum has the length of H without its bias column (the bias entry is the constant 1).
    """
    x = x.detach().float()
    if kind == "linear":
        features = module.in_features
        return _sum_of_squares(x.reshape(-1, features), 0), x.numel() // features
    if kind == "conv2d":
        if x.ndim == 3:  # an unbatched image
            x = x.unsqueeze(0)
        squares = _sum_of_squares(x, 0).unsqueeze(0)
        pads = _conv_padding(module)
        if any(pads):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            squares = F.pad(squares, pads, mode=mode)
        patches = F.unfold(squares, module.kernel_size, dilation=module.dilation, stride=module.stride)
        return patches.sum((0, 2)), x.shape[0] * patches.shape[-1]
    if isinstance(module, nn.LayerNorm):
        features = math.prod(module.normalized_shape)
        return _sum_of_squares(_standardised(module, x).reshape(-1, features), 0), x.numel() // features
    # BatchNorm: the mean of x̂² per channel needs only the batch mean and variance of x, one pass:
    # E[(x − m)²]/(v + eps) = (var + (mean − m)²)/(v + eps), with (m, v) = (mean, var) in training mode.
    count = x.numel() // x.shape[1]
    dims = tuple(d for d in range(x.ndim) if d != 1)
    var, mean = torch.var_mean(x, dims, correction=0)
    if module.training or (module.running_mean is None and module.running_var is None):
        return var / (var + module.eps) * count, count
    second = var + (mean - module.running_mean.float()).square()
    return second / (module.running_var.float() + module.eps) * count, count


def gradient_moments(module: nn.Module, kind: LayerKind, grad: Tensor) -> tuple[Tensor, int]:
    """(Σ over samples and positions of s², number of samples) for the output gradient ``grad``."""
    grad = grad.detach().float()
    if kind == "linear":
        samples = grad.shape[0] if grad.ndim >= 2 else 1
        return _sum_of_squares(grad.reshape(-1, grad.shape[-1]), 0), samples
    if kind == "conv2d":
        if grad.ndim == 3:
            grad = grad.unsqueeze(0)
        return _sum_of_squares(grad, (0, 2, 3)), grad.shape[0]
    if isinstance(module, nn.LayerNorm):
        feature_dims = len(module.normalized_shape)
        features = math.prod(module.normalized_shape)
        samples = grad.shape[0] if grad.ndim > feature_dims else 1
        return _sum_of_squares(grad.reshape(-1, features), 0), samples
    dims = tuple(d for d in range(grad.ndim) if d != 1)
    return _sum_of_squares(grad, dims), grad.shape[0]


# ------------------------------------------------------------------------------------------ averaging
def ema_update_(average: Tensor, new: Tensor, gamma: float, refresh: int) -> Tensor:
    """Bias-corrected EMA in place: after ``refresh`` (≥ 1) updates the weights sum to exactly one."""
    weight = (1.0 - gamma) / (1.0 - gamma**refresh)
    return average.add_(new.to(average) - average, alpha=weight)


MIN_MAX_RELATIVE_SPREAD = 1e-5
"""Spreads below this fraction of the largest magnitude count as rounding noise (about 100 float32 ulps)."""


def min_max(values: Tensor) -> Tensor:
    """(v − min v)/(max v − min v); all ones when the entries are equal up to rounding.

    "Equal up to rounding" means max − min ≤ 1e-5 · max |v|, or a non-finite range. Without that
    tolerance, entries that are equal in exact arithmetic (the two output-gradient moments of a
    two-class softmax layer, for instance) normalise to an arbitrary {0, 1} decided by rounding,
    and the entry that lands on 0 gets the damping λ alone as curvature. Written without host
    synchronisation (no ``.item()``), so a GPU step does not stall once per layer.
    """
    low, high = torch.aminmax(values)
    spread = high - low
    scale = torch.maximum(high.abs(), low.abs())
    usable = torch.isfinite(spread) & (spread > MIN_MAX_RELATIVE_SPREAD * scale)
    scaled = (values - low) / torch.where(usable, spread, torch.ones_like(spread))
    return torch.where(usable, scaled, torch.ones_like(values))


# ---------------------------------------------------------------------------------------- expansion
def expand(module: nn.Module, kind: LayerKind, role: Role, h: Tensor, s: Tensor) -> Tensor:
    """diag(H) ⊗ diag(S) restricted to one parameter of ``module``, shaped like that parameter.

    For norm layers ``h`` has one entry per feature and the shift (bias) uses an implicit 1.
    """
    if kind == "norm":
        shape = _feature_shape(module)
        if role == "weight":
            return (h * s).reshape(shape)
        return s.reshape(shape).clone()
    if kind == "linear":
        if role == "weight":
            return s[:, None] * h[None, : module.in_features]
        return s * h[-1]
    # conv2d: pair each output channel with the inputs of its own group
    groups = module.groups
    if role == "bias":
        return s * h[-1]
    kh, kw = module.kernel_size
    in_per_group = module.in_channels // groups
    weight_h = h[: module.in_channels * kh * kw].reshape(groups, 1, in_per_group * kh * kw)
    per_group = s.reshape(groups, module.out_channels // groups, 1) * weight_h
    return per_group.reshape(module.weight.shape)


def kronecker_diagonal(module: nn.Module, kind: LayerKind, role: Role, h: Tensor, s: Tensor) -> Tensor:
    """The Fisher diagonal of one parameter from the raw averaged factors (no normalisation)."""
    return expand(module, kind, role, h, s)


def normalised(kind: LayerKind, h: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """The factors the preconditioner uses: (minmax(H), minmax(S)); norm layers keep their raw H."""
    return (h if kind == "norm" else min_max(h)), min_max(s)


def preconditioner(
    module: nn.Module, kind: LayerKind, role: Role, h: Tensor, s: Tensor, damping: float
) -> Tensor:
    """F̃ = minmax(H) ⊗ minmax(S) + λ for one parameter (norm layers: H ⊙ minmax(S) + λ)."""
    return expand(module, kind, role, *normalised(kind, h, s)).add_(damping)
