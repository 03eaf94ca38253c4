"""How big and how costly a (compressed) model is: storage bits and bit-operations per sample.

The measures follow "Order of Compression" (Shen et al., arXiv 2403.17447), which compares compression
pipelines by model size in bits and by bit-operations (BOPs: multiply-accumulates × weight bits ×
activation bits).

How layers declare their bit widths (the only contract between the stages and these metrics):

- ``weight_bits`` (int attribute on a module): bits per stored element of its ``weight``. Without it a
  tensor costs its dtype's width (fp32 32, fp16 16, int8 8, bool 1).
- ``activation_bits`` (int attribute): bits of the activations the layer multiplies with; 32 without it.
- A layer whose ``weight`` is a floating tensor but declares fewer ``weight_bits`` (a fake-quant layer)
  is stored as if converted: ``weight_bits`` per weight plus one fp32 scale per output channel. A
  converted layer keeps its scales as buffers, which are counted like every other tensor.

What :func:`model_bits` counts: every parameter and persistent buffer of every module (norm statistics,
biases, quantization scales, observer ranges, exit heads), except the ``num_batches_tracked`` counters
of BatchNorm, which inference never reads. A weight (a tensor named ``weight`` with 2 or more
dimensions) is stored in the cheapest of three layouts: dense (``numel × bits``); sparse with a bitmap
(``nonzeros × bits + numel`` mask bits); or N:M for M in (4, 8) when every group of M consecutive
weights along the reduction dimension (input channels at each kernel position for a Conv2d) holds at
most N non-zeros (``numel·N/M`` kept slots of ``bits + log2(M)`` bits each: values plus indices, as
section 6 of ``docs/algorithms.md`` describes for 2:4).

What :func:`bit_operations` counts: the multiply-accumulates of every Conv2d and Linear (and of every
module with ``weight_bits`` and a 2-D or 4-D ``weight``) that actually runs in one eval-mode forward,
counting only the non-zero weights, times ``weight_bits × activation_bits``, divided by the batch size.
Layers skipped for some samples (an early exit) see smaller batches, so the figure is the average over
the samples. Element-wise work (norms, activations, pooling, additions) is not counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CompressionReport",
    "bit_operations",
    "compression_report",
    "dtype_bits",
    "model_bits",
    "weight_storage_bits",
]

FLOAT_BITS = 32
NM_GROUP_SIZES: tuple[int, ...] = (4, 8)
_SKIPPED_BUFFERS = ("num_batches_tracked",)


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits per element of ``dtype`` (bool counts as 1)."""
    return 1 if dtype == torch.bool else dtype.itemsize * 8


def _reduction_groups(weight: Tensor) -> Tensor | None:
    """The weight as (rows, reduction) with the reduction ordered (kh, kw, cin) for a Conv2d."""
    if weight.ndim == 2:
        return weight
    if weight.ndim == 4:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return None


def _nm_bits(weight: Tensor, bits: int) -> int | None:
    """Cheapest N:M storage over ``NM_GROUP_SIZES``, or ``None`` when no N:M pattern fits."""
    matrix = _reduction_groups(weight)
    if matrix is None:
        return None
    best: int | None = None
    for m in NM_GROUP_SIZES:
        if weight.shape[1] % m:
            continue
        n = int((matrix != 0).reshape(matrix.shape[0], -1, m).sum(dim=2).max().item())
        if n >= m:
            continue
        slots = weight.numel() * max(n, 1) // m  # an all-zero weight still keeps one slot per group
        cost = slots * (bits + math.ceil(math.log2(m)))
        best = cost if best is None else min(best, cost)
    return best


def weight_storage_bits(weight: Tensor, bits: int = FLOAT_BITS) -> int:
    """Bits to store ``weight`` at ``bits`` per value: the cheapest of dense, bitmap-sparse and N:M.

    Example: a 4×4 Linear weight with 6 non-zeros at 32 bits: dense 512, bitmap 6·32 + 16 = 208.
    """
    if not isinstance(bits, int) or bits < 1:
        raise ValueError(f"bits={bits!r}: must be a positive integer")
    numel = weight.numel()
    dense = numel * bits
    nonzeros = int(torch.count_nonzero(weight.detach()).item())
    candidates = [dense, nonzeros * bits + numel]
    nm = _nm_bits(weight.detach(), bits)
    if nm is not None:
        candidates.append(nm)
    return min(candidates)


def _declared_weight_bits(module: nn.Module, weight: Tensor) -> int:
    bits = getattr(module, "weight_bits", None)
    return int(bits) if bits is not None else dtype_bits(weight.dtype)


def model_bits(model: nn.Module) -> int:
    """Bits needed to store ``model`` for inference (see the module docstring for what counts)."""
    total = 0
    for module in model.modules():
        tensors: list[tuple[str, Tensor]] = list(module.named_parameters(recurse=False))
        tensors += [
            (name, buf)
            for name, buf in module.named_buffers(recurse=False)
            if buf is not None and name not in _SKIPPED_BUFFERS and name not in module._non_persistent_buffers_set
        ]
        for name, tensor in tensors:
            if name == "weight" and tensor.ndim >= 2:
                bits = _declared_weight_bits(module, tensor)
                total += weight_storage_bits(tensor, bits)
                if tensor.is_floating_point() and bits < dtype_bits(tensor.dtype):
                    total += tensor.shape[0] * FLOAT_BITS  # per-output-channel scales of a fake-quant layer
            else:
                total += tensor.numel() * dtype_bits(tensor.dtype)
    return total


def _counted_layer(module: nn.Module) -> bool:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return True
    weight = getattr(module, "weight", None)
    return hasattr(module, "weight_bits") and isinstance(weight, Tensor) and weight.ndim in (2, 4)


@torch.no_grad()
def bit_operations(model: nn.Module, inputs: Tensor) -> float:
    """Average bit-operations per sample of one eval-mode forward of ``model`` on ``inputs``.

    Counts the layers that actually run (see the module docstring); the model's train/eval mode is
    restored afterwards.
    """
    if not isinstance(inputs, Tensor) or inputs.ndim < 1 or inputs.shape[0] < 1:
        raise ValueError(f"inputs={type(inputs).__name__}: must be a batched Tensor with at least one sample")
    total = 0.0

    def count(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal total
        if not isinstance(output, Tensor) or output.numel() == 0:
            return
        weight = module.weight
        positions = output.numel() // weight.shape[0]
        macs = positions * int(torch.count_nonzero(weight).item())
        w_bits = _declared_weight_bits(module, weight)
        a_bits = int(getattr(module, "activation_bits", FLOAT_BITS))
        total += float(macs) * w_bits * a_bits

    handles = [m.register_forward_hook(count) for m in model.modules() if _counted_layer(m)]
    was_training = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total / inputs.shape[0]


@dataclass
class CompressionReport:
    """Size and cost of a compressed model next to its dense reference.

    ``compression_ratio = dense_bits / bits`` and ``bit_op_reduction = dense_bit_ops / bit_ops`` (both
    above 1 when the model got smaller / cheaper); ``bit_ops`` are per sample.
    """

    bits: int
    dense_bits: int
    compression_ratio: float
    bit_ops: float
    dense_bit_ops: float
    bit_op_reduction: float
    accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reference_numbers(reference: Any, inputs: Tensor) -> tuple[int, float]:
    if isinstance(reference, nn.Module):
        return model_bits(reference), bit_operations(reference, inputs)
    if isinstance(reference, CompressionReport):
        return reference.bits, reference.bit_ops
    if isinstance(reference, Mapping) and {"bits", "bit_ops"} <= set(reference):
        return int(reference["bits"]), float(reference["bit_ops"])
    if isinstance(reference, Sequence) and not isinstance(reference, str) and len(reference) == 2:
        return int(reference[0]), float(reference[1])
    raise TypeError(
        f"dense_model_or_reference_numbers={type(reference).__name__}: must be an nn.Module, a CompressionReport, "
        "a mapping with 'bits' and 'bit_ops', or a (bits, bit_ops) pair"
    )


def compression_report(
    model: nn.Module,
    dense_model_or_reference_numbers: nn.Module | CompressionReport | Mapping[str, float] | Sequence[float],
    inputs: Tensor,
    accuracy: float | None = None,
) -> CompressionReport:
    """Measure ``model`` on ``inputs`` and compare it with the dense model (or its known numbers).

    The reference is a dense ``nn.Module`` (measured on the same ``inputs``), a :class:`CompressionReport`
    of it (its ``bits``/``bit_ops``), a mapping with ``bits`` and ``bit_ops``, or a ``(bits, bit_ops)``
    pair.
    """
    if accuracy is not None and not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy={accuracy!r}: must be a fraction in [0, 1] or None")
    dense_bits, dense_bit_ops = _reference_numbers(dense_model_or_reference_numbers, inputs)
    bits = model_bits(model)
    bit_ops = bit_operations(model, inputs)
    return CompressionReport(
        bits=bits,
        dense_bits=dense_bits,
        compression_ratio=dense_bits / bits if bits else math.inf,
        bit_ops=bit_ops,
        dense_bit_ops=dense_bit_ops,
        bit_op_reduction=dense_bit_ops / bit_ops if bit_ops else math.inf,
        accuracy=None if accuracy is None else float(accuracy),
    )
