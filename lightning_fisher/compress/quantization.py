"""Quantization-aware training (fake quantization) and conversion to integer weights.

Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference" (CVPR 2018): during training, weights and activations are rounded to the integer grid in the
forward pass and gradients pass through the rounding unchanged (the straight-through estimator of
Bengio et al. 2013), so the network learns to live with the rounding.

Choices made here:

- Weights: symmetric, per output channel, ``scale_c = max|w_c| / (2^(b−1) − 1)``, integers in
  ``[−(2^(b−1) − 1), 2^(b−1) − 1]`` (the grid is symmetric, so 0 maps to 0 exactly: pruned weights stay
  zero through quantization and conversion).
- Activations (the input of each swapped layer): affine per tensor, ``b`` unsigned bits, range from an
  exponential moving average of the batch min/max (``momentum``), widened to include 0. In eval mode
  the stored range is used; a layer that never saw a training batch uses the current batch's range.
  The gradient passes straight through inside the range and is zero outside it (clipped).
- Swapping keeps the very same ``weight``/``bias`` Parameters, so the optimizer needs no rebuild and
  masks applied to those Parameters (``FisherPruning``) keep working. Forward hooks registered on the
  original modules (e.g. AdaFisher's) are not carried over.
- :func:`convert` stores integer weights (int8 for ``weight_bits ≤ 8``) and fp32 per-channel scales in
  :class:`QuantizedLinear`/:class:`QuantizedConv2d`. Their forward dequantizes the weight on the fly
  and runs the float kernel on the quantized activations, so on CPU it computes the same products as an
  integer kernel would (up to float rounding of the accumulation), without needing ``torch.ao``'s
  quantized engines. Sizes are reported in bits by :mod:`lightning_fisher.compress.metrics`.

Modules declare ``weight_bits`` and ``activation_bits``, which the metrics read.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FakeQuantConv2d",
    "FakeQuantLinear",
    "QuantizedConv2d",
    "QuantizedLinear",
    "check_bits",
    "convert",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "prepare_qat_",
    "quantize_weight",
]

log = logging.getLogger(__name__)

MIN_BITS, MAX_BITS = 2, 16


def check_bits(name: str, bits: Any) -> int:
    """Return ``bits`` if it is an integer in [2, 16], else raise ``ValueError`` naming ``name``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name}={bits!r}: must be an integer in [{MIN_BITS}, {MAX_BITS}]")
    return bits


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.reshape(-1, *([1] * (ndim - 1)))


def quantize_weight(weight: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel quantization: ``(integers, scales)`` with ``weight ≈ q·scale``.

    Integers are int8 for ``bits ≤ 8`` (int16 up to 16 bits); scales are fp32, one per output channel
    (dim 0). A channel of zeros gets scale 1.
    """
    check_bits("bits", bits)
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float()
    amax = w.abs().reshape(w.shape[0], -1).amax(dim=1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / _channel_view(scale, w.ndim)), -qmax, qmax)
    return q.to(torch.int8 if bits <= 8 else torch.int16), scale


def fake_quantize_weight(weight: Tensor, bits: int = 8) -> Tensor:
    """``weight`` rounded to its per-channel symmetric grid, with a straight-through gradient."""
    q, scale = quantize_weight(weight, bits)
    dequantized = (q.float() * _channel_view(scale, weight.ndim)).to(weight.dtype)
    return weight + (dequantized - weight).detach()


def _activation_qparams(low: Tensor, high: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale and zero point (as a float tensor holding an integer) of the affine grid over [low, high]."""
    qmax = 2**bits - 1
    low = torch.clamp(low, max=0.0)
    high = torch.clamp(high, min=0.0)
    scale = torch.clamp((high - low) / qmax, min=torch.finfo(torch.float32).eps)
    zero_point = torch.clamp(torch.round(-low / scale), 0, qmax)
    return scale, zero_point


def fake_quantize_activation(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Affine per-tensor fake quantization; the gradient is 1 inside the representable range, 0 outside."""
    qmax = 2**bits - 1
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, qmax)
    dequantized = ((q - zero_point) * scale).to(x.dtype)
    clipped = torch.clamp(x, ((0 - zero_point) * scale).to(x.dtype), ((qmax - zero_point) * scale).to(x.dtype))
    return clipped + (dequantized - clipped).detach()


class _FakeQuantMixin:
    """Shared state of the fake-quant layers: bit widths and the activation range observer."""

    weight: nn.Parameter
    weight_bits: int
    activation_bits: int
    momentum: float
    act_range: Tensor
    observed: Tensor

    def _init_quant(self, weight_bits: int, activation_bits: int, momentum: float, device: torch.device) -> None:
        self.weight_bits = check_bits("weight_bits", weight_bits)
        self.activation_bits = check_bits("activation_bits", activation_bits)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum={momentum!r}: must be in (0, 1]")
        self.momentum = momentum
        self.register_buffer("act_range", torch.zeros(2, device=device))  # type: ignore[attr-defined]
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool, device=device))  # type: ignore[attr-defined]

    def _quantize_input(self, x: Tensor) -> Tensor:
        if self.training:  # type: ignore[attr-defined]
            with torch.no_grad():
                batch = torch.stack([x.detach().min(), x.detach().max()]).float()
                if bool(self.observed):
                    self.act_range.lerp_(batch, self.momentum)
                else:
                    self.act_range.copy_(batch)
                    self.observed.fill_(True)
            low, high = self.act_range[0], self.act_range[1]
        elif bool(self.observed):
            low, high = self.act_range[0], self.act_range[1]
        else:
            low, high = x.detach().min().float(), x.detach().max().float()
        scale, zero_point = _activation_qparams(low, high, self.activation_bits)
        return fake_quantize_activation(x, scale, zero_point, self.activation_bits)

    def activation_qparams(self) -> tuple[Tensor, Tensor]:
        """The observed activation ``(scale, zero_point)``; raises if no training batch was seen."""
        if not bool(self.observed):
            raise RuntimeError(f"{type(self).__name__}: no activation range observed yet (train or calibrate first)")
        return _activation_qparams(self.act_range[0], self.act_range[1], self.activation_bits)

    def extra_repr(self) -> str:
        bits = f"weight_bits={self.weight_bits}, activation_bits={self.activation_bits}"
        return f"{super().extra_repr()}, {bits}"  # type: ignore[misc]


class FakeQuantLinear(_FakeQuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weights and inputs (Jacob et al., CVPR 2018), for QAT.

    Build it with :meth:`from_float`, which reuses the Linear's Parameters.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._quantize_input(x), fake_quantize_weight(self.weight, self.weight_bits), self.bias)

    @classmethod
    def from_float(
        cls, module: nn.Linear, weight_bits: int = 8, activation_bits: int = 8, momentum: float = 0.1
    ) -> FakeQuantLinear:
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        new.weight, new.bias = module.weight, module.bias
        new._init_quant(weight_bits, activation_bits, momentum, module.weight.device)
        new.train(module.training)
        return new


class FakeQuantConv2d(_FakeQuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weights and inputs (Jacob et al., CVPR 2018), for QAT.

    Build it with :meth:`from_float`, which reuses the Conv2d's Parameters.
    """

    def forward(self, x: Tensor) -> Tensor:
        weight = fake_quantize_weight(self.weight, self.weight_bits)
        return self._conv_forward(self._quantize_input(x), weight, self.bias)

    @classmethod
    def from_float(
        cls, module: nn.Conv2d, weight_bits: int = 8, activation_bits: int = 8, momentum: float = 0.1
    ) -> FakeQuantConv2d:
        new = cls(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups,
            bias=module.bias is not None, padding_mode=module.padding_mode, device="meta",
        )  # fmt: skip
        new.weight, new.bias = module.weight, module.bias
        new._init_quant(weight_bits, activation_bits, momentum, module.weight.device)
        new.train(module.training)
        return new


_FAKE_QUANT = {nn.Linear: FakeQuantLinear, nn.Conv2d: FakeQuantConv2d}


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def prepare_qat_(
    model: nn.Module,
    weight_bits: int = 8,
    activation_bits: int = 8,
    exclude: Sequence[str] = (),
    momentum: float = 0.1,
) -> list[str]:
    """Swap every ``nn.Linear``/``nn.Conv2d`` (exact types) for its fake-quant version, in place.

    Layers whose FQN matches an ``exclude`` ``fnmatch`` pattern stay float. Returns the swapped FQNs.
    """
    check_bits("weight_bits", weight_bits)
    check_bits("activation_bits", activation_bits)
    if isinstance(exclude, str):
        raise TypeError(f"exclude={exclude!r}: must be a list of patterns, not a string")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name and type(module) in _FAKE_QUANT and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    ]
    for name, module in targets:
        _set_submodule(model, name, _FAKE_QUANT[type(module)].from_float(module, weight_bits, activation_bits, momentum))
    log.info("prepare_qat_: %d layers fake-quantized (w%d/a%d)", len(targets), weight_bits, activation_bits)
    return [name for name, _ in targets]


class _QuantizedMixin:
    """Integer weight (buffer ``weight``), fp32 per-channel ``weight_scale``, fixed activation grid."""

    weight: Tensor
    weight_scale: Tensor
    bias: Tensor | None
    act_scale: Tensor
    act_zero_point: Tensor
    weight_bits: int
    activation_bits: int

    def _init_from(self, module: _FakeQuantMixin) -> None:
        q, scale = quantize_weight(module.weight, module.weight_bits)
        act_scale, act_zero_point = module.activation_qparams()
        self.weight_bits = module.weight_bits
        self.activation_bits = module.activation_bits
        self.register_buffer("weight", q)  # type: ignore[attr-defined]
        self.register_buffer("weight_scale", scale)  # type: ignore[attr-defined]
        bias = getattr(module, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())  # type: ignore[attr-defined]
        self.register_buffer("act_scale", act_scale.detach().clone())  # type: ignore[attr-defined]
        self.register_buffer("act_zero_point", act_zero_point.detach().clone())  # type: ignore[attr-defined]

    def dequantized_weight(self) -> Tensor:
        return self.weight.float() * _channel_view(self.weight_scale, self.weight.ndim)

    def _quantize_input(self, x: Tensor) -> Tensor:
        return fake_quantize_activation(x, self.act_scale, self.act_zero_point, self.activation_bits)


class QuantizedLinear(_QuantizedMixin, nn.Module):
    """A converted :class:`FakeQuantLinear`: int weights + fp32 per-channel scales (see module docstring)."""

    def __init__(self, module: FakeQuantLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = module.in_features, module.out_features
        self._init_from(module)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._quantize_input(x), self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight_bits={self.weight_bits}, activation_bits={self.activation_bits}"
        )


class QuantizedConv2d(_QuantizedMixin, nn.Module):
    """A converted :class:`FakeQuantConv2d`: int weights + fp32 per-channel scales (see module docstring)."""

    def __init__(self, module: FakeQuantConv2d) -> None:
        super().__init__()
        self.in_channels, self.out_channels = module.in_channels, module.out_channels
        self.kernel_size, self.stride, self.padding = module.kernel_size, module.stride, module.padding
        self.dilation, self.groups, self.padding_mode = module.dilation, module.groups, module.padding_mode
        self._reversed_padding_repeated_twice = module._reversed_padding_repeated_twice
        self._init_from(module)

    def forward(self, x: Tensor) -> Tensor:
        x = self._quantize_input(x)
        weight = self.dequantized_weight().to(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"weight_bits={self.weight_bits}, activation_bits={self.activation_bits}"
        )


def convert(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose fake-quant layers hold integer weights (``model`` is left unchanged).

    Raises:
        ValueError: the model has no fake-quant layer (run :func:`prepare_qat_` / QAT first).
        RuntimeError: a fake-quant layer never observed an activation range.
    """
    converted = copy.deepcopy(model)
    targets = [(n, m) for n, m in converted.named_modules() if isinstance(m, (FakeQuantLinear, FakeQuantConv2d))]
    if not targets:
        raise ValueError(f"model={type(model).__name__}: has no fake-quant layers; call prepare_qat_ and train first")
    for name, module in targets:
        quantized = QuantizedConv2d(module) if isinstance(module, FakeQuantConv2d) else QuantizedLinear(module)
        quantized.train(module.training)
        if name:
            _set_submodule(converted, name, quantized)
        else:
            converted = quantized
    return converted
