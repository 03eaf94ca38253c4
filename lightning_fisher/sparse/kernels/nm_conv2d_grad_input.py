"""``nm_conv2d_grad_input``: dX of a 2-D convolution with an N:M weight (transposed implicit GEMM).

dY is ``(B, CO, HO, WO)`` (read as NHWC); W is ``(CO, C, KH, KW)`` compressed with reduction order
(kh, kw, cin); dX is ``(B, C, H, W)`` in dY's dtype, ``channels_last`` memory format. Input pixel
``(h, w)`` receives ``dY[ho, wo] · W[:, kh, kw, :]`` from every kernel position with
``h = ho·stride − padding + kh·dilation`` (same for w). Each program computes a ``BLOCK_P × BLOCK_C`` tile
of dX (input pixels × input channels): for each kernel position it finds the output pixel that read
this input pixel (none when the offset is negative, not a multiple of the stride, or past the output:
masked) and accumulates ``dY`` tiles times W tiles rebuilt in registers (rows = output channels).
With stride 2, 3 of 4 kernel positions are masked for a given pixel: the kernel does that work anyway.
"""

from __future__ import annotations

import functools

import torch
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
from lightning_fisher.sparse.kernels.nm_conv2d import conv_output_size, pair

__all__ = ["nm_conv2d_grad_input", "nm_conv2d_grad_input_reference"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    from lightning_fisher.sparse.kernels._decompress import _nm_tile


def _configs() -> list:
    """Autotuning candidates (GPU only)."""
    shapes = [  # BLOCK_P, BLOCK_C, BLOCK_CO, num_warps, num_stages
        (32, 64, 64, 4, 4), (64, 64, 32, 4, 4), (64, 64, 64, 4, 4), (128, 64, 32, 4, 4), (128, 128, 32, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_P": p, "BLOCK_C": c, "BLOCK_CO": co, "GROUP_P": 8}, num_warps=w, num_stages=s)
        for p, c, co, w, s in shapes
    ]


def _pick_config(pixels: int, in_channels: int, out_channels: int, m: int) -> dict:
    """One config chosen by shape: used when not autotuning."""
    block_p = 32 if pixels <= 32 else 64 if pixels <= 4096 else 128
    block_c = max(16, min(64, _triton.next_power_of_2(in_channels)), _triton.next_power_of_2(m))
    block_co = max(16, min(64, _triton.next_power_of_2(out_channels)))
    return {"BLOCK_P": block_p, "BLOCK_C": block_c, "BLOCK_CO": block_co, "GROUP_P": 8, "num_warps": 4,
            "num_stages": 3}


if HAS_TRITON:

    @triton.jit
    def _nm_conv2d_grad_input_kernel(
        # pointers
        dy_ptr, values_ptr, codes_ptr, dx_ptr,
        # sizes
        B, H, W, C, HO, WO, CO,
        # strides
        stride_dyb, stride_dyh, stride_dyw, stride_dyc,
        stride_vr, stride_cr,
        stride_dxb, stride_dxh, stride_dxw, stride_dxc,
        # meta-parameters: geometry
        KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
        PAD_H: tl.constexpr, PAD_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
        # meta-parameters: format, tiles
        SPARSE_N: tl.constexpr, SPARSE_M: tl.constexpr, BITS: tl.constexpr, GATHER: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, GROUP_P: tl.constexpr,
    ):
        # program id -> dX tile (grouped along pixels)
        P = B * H * W
        pid = tl.program_id(0)
        num_pid_p = (P + BLOCK_P - 1) // BLOCK_P
        num_pid_c = (C + BLOCK_C - 1) // BLOCK_C
        num_pid_in_group = GROUP_P * num_pid_c
        group_id = pid // num_pid_in_group
        first_pid_p = group_id * GROUP_P
        group_size_p = min(num_pid_p - first_pid_p, GROUP_P)
        pid_p = first_pid_p + ((pid % num_pid_in_group) % group_size_p)
        pid_c = (pid % num_pid_in_group) // group_size_p

        # input pixel -> (batch, row, column)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        c0 = pid_c * BLOCK_C
        offs_c = c0 + tl.arange(0, BLOCK_C)
        offs_co = tl.arange(0, BLOCK_CO)
        mask_p = offs_p < P
        b = offs_p // (H * W)
        h = (offs_p // W) % H
        w = offs_p % W
        dy_base = dy_ptr + b.to(tl.int64) * stride_dyb

        # reduction: kernel positions, then output-channel blocks
        accumulator = tl.full((BLOCK_P, BLOCK_C), 0, dtype=tl.float32)
        for tap in range(0, KH * KW):
            th = h + PAD_H - (tap // KW) * DIL_H
            tw = w + PAD_W - (tap % KW) * DIL_W
            # th, tw >= 0 is tested first: // and % then agree between C and Python semantics
            ho = th // STRIDE_H
            wo = tw // STRIDE_W
            hit = (mask_p & (th >= 0) & (tw >= 0) & (th % STRIDE_H == 0) & (tw % STRIDE_W == 0)
                   & (ho < HO) & (wo < WO))
            pixel_ptrs = dy_base + ho * stride_dyh + wo * stride_dyw
            for r0 in range(0, CO, BLOCK_CO):
                mask_co = offs_co < CO - r0
                dy = tl.load(pixel_ptrs[:, None] + (r0 + offs_co)[None, :] * stride_dyc,
                             mask=hit[:, None] & mask_co[None, :], other=0.0)
                wt = _nm_tile(values_ptr, codes_ptr, r0 + offs_co, mask_co, tap * C + c0, tap * C + C,
                              stride_vr, stride_cr, BLOCK_CO, BLOCK_C, SPARSE_N, SPARSE_M, BITS, GATHER)
                accumulator = tl.dot(dy, wt, accumulator, input_precision=INPUT_PRECISION)

        # epilogue: cast, masked NHWC store
        dx_ptrs = (dx_ptr + b.to(tl.int64)[:, None] * stride_dxb + h[:, None] * stride_dxh + w[:, None] * stride_dxw
                   + offs_c[None, :] * stride_dxc)
        tl.store(dx_ptrs, accumulator.to(dx_ptr.dtype.element_ty), mask=mask_p[:, None] & (offs_c < C)[None, :])


@functools.cache
def _autotuned():
    key = ["B", "H", "W", "C", "CO", "KH", "KW", "STRIDE_H", "STRIDE_W", "SPARSE_N", "SPARSE_M"]
    return triton.autotune(configs=_configs(), key=key)(_nm_conv2d_grad_input_kernel)


def _geometry(kernel_size, stride, padding, dilation) -> tuple[int, ...]:
    geometry = (*pair(kernel_size, "kernel_size"), *pair(stride, "stride"), *pair(padding, "padding"),
                *pair(dilation, "dilation"))
    if min(geometry[:4]) < 1 or min(geometry[4:6]) < 0 or min(geometry[6:]) < 1:
        raise ValueError(f"kernel_size, stride, dilation must be >= 1 and padding >= 0, got {geometry}")
    return geometry


def _check(grad_output: Tensor, values: Tensor, codes: Tensor, n: int, m: int, input_shape, geometry) -> None:
    k = check_compressed(values, codes, n, m)
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    if len(input_shape) != 4:
        raise ValueError(f"input_shape={tuple(input_shape)}: must be (B, C, H, W)")
    batch, channels, height, width = input_shape
    if channels % m or kh * kw * channels != k:
        raise ValueError(f"input_shape={tuple(input_shape)}: needs C % m == 0 and KH·KW·C = {k}")
    out_hw = (conv_output_size(height, kh, sh, ph, dh), conv_output_size(width, kw, sw, pw, dw))
    expected = (batch, values.shape[0], *out_hw)
    if tuple(grad_output.shape) != expected:
        raise ValueError(f"grad_output.shape={tuple(grad_output.shape)}: must be {expected}")


def nm_conv2d_grad_input(
    grad_output: Tensor,
    values: Tensor,
    codes: Tensor,
    n: int,
    m: int,
    input_shape: tuple[int, int, int, int] | torch.Size,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    autotune: bool | None = None,
) -> Tensor:
    """The gradient of ``F.conv2d(x, W, ...)`` with respect to ``x`` (of ``input_shape``), W compressed.

    Returns:
        ``(B, C, H, W)`` in ``grad_output``'s dtype, ``channels_last`` memory format.
    """
    geometry = _geometry(kernel_size, stride, padding, dilation)
    _check(grad_output, values, codes, n, m, input_shape, geometry)
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    out_channels = values.shape[0]
    check_input("grad_output", grad_output, values, None, out_channels)
    batch, channels, height, width = input_shape
    dx = torch.empty((batch, height, width, channels), device=grad_output.device, dtype=grad_output.dtype)
    if dx.numel() == 0:
        return dx.permute(0, 3, 1, 2)
    dy = grad_output.permute(0, 2, 3, 1).contiguous()
    values, codes = values.contiguous(), codes.contiguous()
    args = (dy, values, codes, dx, batch, height, width, channels, dy.shape[1], dy.shape[2], out_channels,
            *dy.stride(), values.stride(0), codes.stride(0), *dx.stride())
    meta = {"KH": kh, "KW": kw, "STRIDE_H": sh, "STRIDE_W": sw, "PAD_H": ph, "PAD_W": pw, "DIL_H": dh,
            "DIL_W": dw, "SPARSE_N": n, "SPARSE_M": m, "BITS": code_bits(m), "GATHER": use_gather(n, m),
            "INPUT_PRECISION": input_precision(grad_output.dtype)}
    pixels = batch * height * width
    if autotune is None:
        autotune = not _triton.INTERPRET
    if autotune and not _triton.INTERPRET:

        def grid(meta_: dict) -> tuple[int]:
            return (triton.cdiv(pixels, meta_["BLOCK_P"]) * triton.cdiv(channels, meta_["BLOCK_C"]),)

        _autotuned()[grid](*args, **meta)
    else:
        config = _pick_config(pixels, channels, out_channels, m)
        grid = (triton.cdiv(pixels, config["BLOCK_P"]) * triton.cdiv(channels, config["BLOCK_C"]),)
        _nm_conv2d_grad_input_kernel[grid](*args, **meta, **config)
    return dx.permute(0, 3, 1, 2)


def nm_conv2d_grad_input_reference(
    grad_output: Tensor,
    values: Tensor,
    codes: Tensor,
    n: int,
    m: int,
    input_shape: tuple[int, int, int, int] | torch.Size,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """The torch reference: ``torch.nn.grad.conv2d_input`` with the decompressed weight."""
    geometry = _geometry(kernel_size, stride, padding, dilation)
    _check(grad_output, values, codes, n, m, input_shape, geometry)
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    weight = decompress(values, codes, n, m, (values.shape[0], input_shape[1], kh, kw))
    return torch.nn.grad.conv2d_input(tuple(input_shape), weight, grad_output, (sh, sw), (ph, pw), (dh, dw))
