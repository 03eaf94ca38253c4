"""Forward and backward of the N:M sparse layers: Triton kernels where they run, torch otherwise.

The kernel path is a custom ``autograd.Function``: the forward is the Triton kernel (or cuSPARSELt for
the ``"cusparselt"`` backend), the backward gives dX through the transposed Triton kernel and the
gradient of the *stored values* only: the dense weight gradient (``dYᵀX`` for a Linear, cuDNN's weight
gradient for a Conv2d) gathered at the kept positions, so an optimizer step keeps the N:M pattern. The
torch fallback runs ``F.linear``/``F.conv2d`` on the decompressed weight with ordinary autograd, whose
gradient through the decompression is the same gather.

Where the kernels run (:func:`kernels_available`): CUDA tensors when Triton is installed; CPU tensors
when the kernels were imported under ``TRITON_INTERPRET=1`` and it is still set; never for float64,
nor bfloat16 under the interpreter (its ``tl.dot`` is wrong for bf16).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_fisher.sparse.format import decompress, gather_kept, to_reduction_matrix

__all__ = ["im2col_nhwc", "kernels_available", "nm_conv2d_forward", "nm_linear_forward"]

log = logging.getLogger(__name__)

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned_late_interpret = False


def kernels_available(x: Tensor) -> bool:
    """Whether the Triton kernels can run on ``x`` (see the module docstring)."""
    global _warned_late_interpret
    if x.dtype not in _KERNEL_DTYPES:
        return False
    interpret_now = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not x.is_cuda and not interpret_now:
        return False  # decided without importing triton
    from lightning_fisher.sparse.kernels import _triton

    if not _triton.HAS_TRITON:
        return False
    if _triton.INTERPRET:
        return interpret_now and x.dtype != torch.bfloat16
    if not x.is_cuda and not _warned_late_interpret:
        _warned_late_interpret = True
        log.warning("TRITON_INTERPRET=1 was set after lightning_fisher.sparse.kernels was imported: "
                    "CPU tensors use the torch fallback")
    return x.is_cuda


class _NMLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, codes, bias, n, m, use_kernels, semi):  # type: ignore[override]
        from lightning_fisher.sparse import kernels

        if semi is not None:
            y = F.linear(x, semi[0], bias)
        else:
            y = kernels.nm_linear(x, values, codes, n, m, bias)
        ctx.save_for_backward(x, values, codes)
        ctx.n, ctx.m, ctx.use_kernels, ctx.has_bias = n, m, use_kernels, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        from lightning_fisher.sparse import kernels

        x, values, codes = ctx.saved_tensors
        n, m = ctx.n, ctx.m
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            if ctx.use_kernels:
                grad_x = kernels.nm_linear_grad_input(grad_output, values, codes, n, m)
            else:
                grad_x = grad_output @ decompress(values, codes, n, m, (values.shape[0], x.shape[1]))
        if ctx.needs_input_grad[1]:
            grad_values = gather_kept(grad_output.t() @ x, codes, n, m)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_output.sum(0)
        return grad_x, grad_values, None, grad_bias, None, None, None, None


def nm_linear_forward(
    x: Tensor,
    values: Tensor,
    codes: Tensor,
    bias: Tensor | None,
    n: int,
    m: int,
    use_kernels: bool,
    semi: Tensor | None = None,
) -> Tensor:
    """``x @ Wᵀ + bias`` over the last dimension of ``x`` (any leading dimensions).

    ``use_kernels`` picks the Triton path (forward and backward); ``semi`` (a cuSPARSELt weight from
    ``to_sparse_semi_structured``) replaces the forward. Without either, the torch fallback.
    """
    if not use_kernels and semi is None:
        weight = decompress(values, codes, n, m, (values.shape[0], values.shape[1] * m // n))
        return F.linear(x, weight, bias)
    leading = x.shape[:-1]
    # semi travels in a tuple: autograd then treats it as a constant, not as an input tensor
    held = (semi,) if semi is not None else None
    y = _NMLinearFunction.apply(x.reshape(-1, x.shape[-1]), values, codes, bias, n, m, use_kernels, held)
    return y.reshape(*leading, values.shape[0])


def im2col_nhwc(x: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int]) -> Tensor:
    """``(B, C, H, W)`` → patches ``(B·HO·WO, KH·KW·C)`` in reduction order (kh, kw, cin)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    batch, channels, height, width = x.shape
    ho = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))
    taps = [
        padded[:, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return torch.stack(taps, dim=3).reshape(batch * ho * wo, kh * kw * channels)


class _NMConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, codes, bias, n, m, geometry, use_kernels, semi):  # type: ignore[override]
        from lightning_fisher.sparse import kernels

        kernel_size, stride, padding, dilation = geometry
        if semi is not None:
            patches = im2col_nhwc(x, kernel_size, stride, padding, dilation)
            batch = x.shape[0]
            ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
            wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
            y = F.linear(patches, semi[0], bias).reshape(batch, ho, wo, -1).permute(0, 3, 1, 2)
        else:
            y = kernels.nm_conv2d(x, values, codes, n, m, kernel_size, stride, padding, dilation, bias)
        ctx.save_for_backward(x, values, codes)
        ctx.n, ctx.m, ctx.geometry, ctx.use_kernels = n, m, geometry, use_kernels
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        from lightning_fisher.sparse import kernels

        x, values, codes = ctx.saved_tensors
        n, m = ctx.n, ctx.m
        kernel_size, stride, padding, dilation = ctx.geometry
        weight_shape = (values.shape[0], x.shape[1], *kernel_size)
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            if ctx.use_kernels:
                grad_x = kernels.nm_conv2d_grad_input(grad_output, values, codes, n, m, x.shape, kernel_size,
                                                      stride, padding, dilation)
            else:
                weight = decompress(values, codes, n, m, weight_shape)
                grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_output, stride, padding, dilation)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.nn.grad.conv2d_weight(x, weight_shape, grad_output, stride, padding, dilation)
            grad_values = gather_kept(to_reduction_matrix(grad_weight), codes, n, m)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_output.sum((0, 2, 3))
        return grad_x, grad_values, None, grad_bias, None, None, None, None, None


def nm_conv2d_forward(
    x: Tensor,
    values: Tensor,
    codes: Tensor,
    bias: Tensor | None,
    n: int,
    m: int,
    geometry: tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]],
    use_kernels: bool,
    semi: Tensor | None = None,
) -> Tensor:
    """``F.conv2d`` with an N:M weight; ``geometry`` is (kernel_size, stride, padding, dilation) pairs."""
    kernel_size, stride, padding, dilation = geometry
    if not use_kernels and semi is None:
        weight = decompress(values, codes, n, m, (values.shape[0], x.shape[1], *kernel_size))
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    held = (semi,) if semi is not None else None
    return _NMConv2dFunction.apply(x, values, codes, bias, n, m, geometry, use_kernels, held)
