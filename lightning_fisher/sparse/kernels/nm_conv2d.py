"""``nm_conv2d``: a 2-D convolution with an N:M weight, as an implicit GEMM over NHWC.

X is ``(B, C, H, W)`` (read as NHWC: pass ``channels_last`` input to avoid a copy); W is
``(CO, C, KH, KW)`` stored compressed with reduction order (kh, kw, cin) (see
:mod:`lightning_fisher.sparse.format`; needs ``C % M == 0`` so no group spans two kernel positions);
Y is ``(B, CO, HO, WO)`` in X's dtype, returned in ``channels_last`` memory format. The GEMM has
``P = B·HO·WO`` rows (output pixels), CO columns and reduction ``KH·KW·C``. Each program computes a
``BLOCK_P × BLOCK_CO`` tile: for each kernel position it loads the shifted input pixels (zero outside the
image: padding), ``BLOCK_C`` channels at a time, against the W tile rebuilt in registers, accumulating
``tl.dot`` in fp32. Any stride, padding and dilation (ResNet18 uses 3×3 s1 p1, 3×3 s2 p1, 1×1 s2 p0).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_fisher.sparse.format import code_bits, decompress
from lightning_fisher.sparse.kernels import _triton
from lightning_fisher.sparse.kernels._triton import (
    HAS_TRITON,
    check_compressed,
    check_input,
    input_precision,
    use_gather,
)

__all__ = ["conv_output_size", "nm_conv2d", "nm_conv2d_reference", "pair"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    from lightning_fisher.sparse.kernels._decompress import _nm_tile


def pair(value: int | tuple[int, ...], name: str) -> tuple[int, int]:
    """``3`` → ``(3, 3)``; ``(3, 1)`` stays; anything else is a ``ValueError``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name}={value!r}: must be an int or a pair of ints")


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _configs() -> list:
    """Autotuning candidates (GPU only)."""
    shapes = [  # BLOCK_P, BLOCK_CO, BLOCK_C, num_warps, num_stages
        (32, 64, 64, 4, 4), (64, 64, 32, 4, 4), (64, 64, 64, 4, 4), (64, 128, 32, 4, 4),
        (128, 64, 32, 4, 4), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_P": p, "BLOCK_CO": co, "BLOCK_C": c, "GROUP_P": 8}, num_warps=w, num_stages=s)
        for p, co, c, w, s in shapes
    ]


def _pick_config(pixels: int, out_channels: int, in_channels: int, m: int) -> dict:
    """One config chosen by shape: used when not autotuning."""
    block_p = 32 if pixels <= 32 else 64 if pixels <= 4096 else 128
    block_co = max(16, min(64 if pixels <= 4096 else 128, _triton.next_power_of_2(out_channels)))
    block_c = max(16, min(64, _triton.next_power_of_2(in_channels)), _triton.next_power_of_2(m))
    warps = 8 if block_p * block_co >= 128 * 128 else 4
    return {"BLOCK_P": block_p, "BLOCK_CO": block_co, "BLOCK_C": block_c, "GROUP_P": 8, "num_warps": warps,
            "num_stages": 3}


if HAS_TRITON:

    @triton.jit
    def _nm_conv2d_kernel(
        # pointers
        x_ptr, values_ptr, codes_ptr, bias_ptr, y_ptr,
        # sizes
        B, H, W, C, HO, WO, CO,
        # strides
        stride_xb, stride_xh, stride_xw, stride_xc,
        stride_vr, stride_cr,
        stride_yb, stride_yh, stride_yw, stride_yc,
        # meta-parameters: geometry
        KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
        PAD_H: tl.constexpr, PAD_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
        # meta-parameters: format, epilogue, tiles
        SPARSE_N: tl.constexpr, SPARSE_M: tl.constexpr, BITS: tl.constexpr, GATHER: tl.constexpr,
        HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_P: tl.constexpr,
    ):
        # program id -> output tile (grouped along pixels)
        P = B * HO * WO
        pid = tl.program_id(0)
        num_pid_p = (P + BLOCK_P - 1) // BLOCK_P
        num_pid_co = (CO + BLOCK_CO - 1) // BLOCK_CO
        num_pid_in_group = GROUP_P * num_pid_co
        group_id = pid // num_pid_in_group
        first_pid_p = group_id * GROUP_P
        group_size_p = min(num_pid_p - first_pid_p, GROUP_P)
        pid_p = first_pid_p + ((pid % num_pid_in_group) % group_size_p)
        pid_co = (pid % num_pid_in_group) // group_size_p

        # output pixel -> (batch, row, column)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
        offs_c = tl.arange(0, BLOCK_C)
        mask_p = offs_p < P
        mask_co = offs_co < CO
        b = offs_p // (HO * WO)
        ho = (offs_p // WO) % HO
        wo = offs_p % WO
        x_base = x_ptr + b.to(tl.int64) * stride_xb

        # reduction: kernel positions, then channel blocks within a position
        accumulator = tl.full((BLOCK_P, BLOCK_CO), 0, dtype=tl.float32)
        for tap in range(0, KH * KW):
            hi = ho * STRIDE_H - PAD_H + (tap // KW) * DIL_H
            wi = wo * STRIDE_W - PAD_W + (tap % KW) * DIL_W
            # out-of-image pixels (the padding) are masked, never dereferenced
            inside = mask_p & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            pixel_ptrs = x_base + hi * stride_xh + wi * stride_xw
            for c0 in range(0, C, BLOCK_C):
                x = tl.load(pixel_ptrs[:, None] + (c0 + offs_c)[None, :] * stride_xc,
                            mask=inside[:, None] & (offs_c < C - c0)[None, :], other=0.0)
                k0 = tap * C + c0
                w = _nm_tile(values_ptr, codes_ptr, offs_co, mask_co, k0, tap * C + C, stride_vr, stride_cr,
                             BLOCK_CO, BLOCK_C, SPARSE_N, SPARSE_M, BITS, GATHER)
                accumulator = tl.dot(x, tl.trans(w), accumulator, input_precision=INPUT_PRECISION)

        # epilogue: bias, cast, masked NHWC store
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_co, mask=mask_co, other=0.0)
            accumulator += bias.to(tl.float32)[None, :]
        y_ptrs = (y_ptr + b.to(tl.int64)[:, None] * stride_yb + ho[:, None] * stride_yh + wo[:, None] * stride_yw
                  + offs_co[None, :] * stride_yc)
        tl.store(y_ptrs, accumulator.to(y_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_co[None, :])


@functools.cache
def _autotuned():
    key = ["B", "H", "W", "C", "CO", "KH", "KW", "STRIDE_H", "STRIDE_W", "SPARSE_N", "SPARSE_M"]
    return triton.autotune(configs=_configs(), key=key)(_nm_conv2d_kernel)


def _check_conv(x: Tensor, values: Tensor, codes: Tensor, n: int, m: int, kernel_size, stride, padding, dilation):
    k = check_compressed(values, codes, n, m)
    kh, kw = pair(kernel_size, "kernel_size")
    geometry = (kh, kw, *pair(stride, "stride"), *pair(padding, "padding"), *pair(dilation, "dilation"))
    if min(geometry[:4]) < 1 or min(geometry[4:6]) < 0 or min(geometry[6:]) < 1:
        raise ValueError(f"kernel_size, stride, dilation must be >= 1 and padding >= 0, got {geometry}")
    if x.ndim != 4:
        raise ValueError(f"x.shape={tuple(x.shape)}: must be (B, C, H, W)")
    channels = x.shape[1]
    if channels % m or kh * kw * channels != k:
        raise ValueError(
            f"x.shape={tuple(x.shape)}, kernel_size={(kh, kw)}: needs C % m == 0 (m={m}) and KH·KW·C equal to "
            f"the weight's reduction size {k}"
        )
    return geometry


def nm_conv2d(
    x: Tensor,
    values: Tensor,
    codes: Tensor,
    n: int,
    m: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    bias: Tensor | None = None,
    autotune: bool | None = None,
) -> Tensor:
    """``F.conv2d(x, W, bias, stride, padding, dilation)`` with ``W`` given compressed.

    Args:
        x: ``(B, C, H, W)``, fp16/bf16/fp32; CUDA, or CPU under ``TRITON_INTERPRET=1``.
        values, codes: the compressed ``(CO, C, KH, KW)`` weight, reduction order (kh, kw, cin).
        kernel_size, stride, padding, dilation: as for ``nn.Conv2d`` (numbers, no ``"same"``).
        bias: ``(CO,)`` or ``None``.
        autotune: as in :func:`~lightning_fisher.sparse.kernels.nm_linear`.

    Returns:
        ``(B, CO, HO, WO)`` in ``x``'s dtype, ``channels_last`` memory format.
    """
    kh, kw, sh, sw, ph, pw, dh, dw = _check_conv(x, values, codes, n, m, kernel_size, stride, padding, dilation)
    out_channels = values.shape[0]
    check_input("x", x, values, bias, out_channels)
    batch, channels, height, width = x.shape
    ho, wo = conv_output_size(height, kh, sh, ph, dh), conv_output_size(width, kw, sw, pw, dw)
    if ho < 1 or wo < 1:
        raise ValueError(f"x.shape={tuple(x.shape)}: too small for kernel {(kh, kw)} with dilation {(dh, dw)}")
    y = torch.empty((batch, ho, wo, out_channels), device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y.permute(0, 3, 1, 2)
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    values, codes = values.contiguous(), codes.contiguous()
    args = (x_nhwc, values, codes, bias if bias is not None else values, y,
            batch, height, width, channels, ho, wo, out_channels,
            *x_nhwc.stride(), values.stride(0), codes.stride(0), *y.stride())
    meta = {"KH": kh, "KW": kw, "STRIDE_H": sh, "STRIDE_W": sw, "PAD_H": ph, "PAD_W": pw, "DIL_H": dh,
            "DIL_W": dw, "SPARSE_N": n, "SPARSE_M": m, "BITS": code_bits(m), "GATHER": use_gather(n, m),
            "HAS_BIAS": bias is not None, "INPUT_PRECISION": input_precision(x.dtype)}
    pixels = batch * ho * wo
    if autotune is None:
        autotune = not _triton.INTERPRET
    if autotune and not _triton.INTERPRET:

        def grid(meta_: dict) -> tuple[int]:
            return (triton.cdiv(pixels, meta_["BLOCK_P"]) * triton.cdiv(out_channels, meta_["BLOCK_CO"]),)

        _autotuned()[grid](*args, **meta)
    else:
        config = _pick_config(pixels, out_channels, channels, m)
        grid = (triton.cdiv(pixels, config["BLOCK_P"]) * triton.cdiv(out_channels, config["BLOCK_CO"]),)
        _nm_conv2d_kernel[grid](*args, **meta, **config)
    return y.permute(0, 3, 1, 2)


def nm_conv2d_reference(
    x: Tensor,
    values: Tensor,
    codes: Tensor,
    n: int,
    m: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    bias: Tensor | None = None,
) -> Tensor:
    """The torch reference: ``F.conv2d`` with the decompressed weight."""
    kh, kw, sh, sw, ph, pw, dh, dw = _check_conv(x, values, codes, n, m, kernel_size, stride, padding, dilation)
    weight = decompress(values, codes, n, m, (values.shape[0], x.shape[1], kh, kw))
    return F.conv2d(x, weight, bias, (sh, sw), (ph, pw), (dh, dw))
