"""``nm_linear``: Y = X·Wᵀ (+ bias) with W an N:M weight in the compressed format.

X is ``(B, K)``; W is ``(R, K)``, stored as values ``(R, K·N/M)`` and codes (see
:mod:`lightning_fisher.sparse.format`); Y is ``(B, R)`` in X's dtype. Each program computes a
``BLOCK_B × BLOCK_R`` tile of Y: it walks K in ``BLOCK_K`` steps, loads an X tile (masked at the edges),
rebuilds the matching W tile in registers (``_nm_tile``) and accumulates ``tl.dot`` in fp32. fp16, bf16
and fp32 inputs (fp32 uses TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` is on).

For at most 16 rows of X, ``nm_linear`` can instead run :func:`~.nm_linear_gemv.nm_linear_gemv`, which
never forms W (``kernel="gemv"``); ``kernel="auto"`` times both once per shape on the GPU and keeps the
faster.
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
    input_precision,
    linear_output,
    use_gather,
)
from lightning_fisher.sparse.kernels.nm_linear_gemv import GEMV_MAX_BATCH, nm_linear_gemv

__all__ = ["LINEAR_KERNELS", "nm_linear", "nm_linear_reference"]

LINEAR_KERNELS = ("auto", "dot", "gemv")
_CHOSEN: dict[tuple, str] = {}  # kernel="auto" on a GPU: the faster kernel per shape, measured once

if HAS_TRITON:
    import triton
    import triton.language as tl

    from lightning_fisher.sparse.kernels._decompress import _nm_tile


def _configs() -> list:
    """Autotuning candidates (GPU only): small-batch tiles first, then compute-bound ones."""
    shapes = [  # BLOCK_B, BLOCK_R, BLOCK_K, num_warps, num_stages
        (16, 32, 256, 4, 3), (16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 64, 128, 4, 4),
        (64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_B": b, "BLOCK_R": r, "BLOCK_K": k, "GROUP_B": 8}, num_warps=w, num_stages=s)
        for b, r, k, w, s in shapes
    ]


def _pick_config(batch: int, rows: int, k: int, m: int) -> dict:
    """One config chosen by shape: used when not autotuning (the interpreter, or ``autotune=False``)."""
    block_b = 16 if batch <= 16 else 32 if batch <= 32 else 64 if batch <= 64 else 128
    block_r = 64 if batch <= 64 else 128
    block_k = max(16, min(128 if batch <= 16 else 64, _triton.next_power_of_2(k)), _triton.next_power_of_2(m))
    block_r = max(16, min(block_r, _triton.next_power_of_2(rows)))
    warps = 8 if block_b * block_r >= 128 * 128 else 4
    return {"BLOCK_B": block_b, "BLOCK_R": block_r, "BLOCK_K": block_k, "GROUP_B": 8, "num_warps": warps,
            "num_stages": 3}


if HAS_TRITON:

    @triton.jit
    def _nm_linear_kernel(
        # pointers
        x_ptr, values_ptr, codes_ptr, bias_ptr, y_ptr,
        # sizes
        B, R, K,
        # strides
        stride_xb, stride_xk,
        stride_vr, stride_cr,
        stride_yb, stride_yr,
        # meta-parameters
        SPARSE_N: tl.constexpr, SPARSE_M: tl.constexpr, BITS: tl.constexpr, GATHER: tl.constexpr,
        HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_B: tl.constexpr,
    ):
        # program id -> output tile, grouped along B so neighbouring programs share W tiles in L2
        pid = tl.program_id(0)
        num_pid_b = (B + BLOCK_B - 1) // BLOCK_B
        num_pid_r = (R + BLOCK_R - 1) // BLOCK_R
        num_pid_in_group = GROUP_B * num_pid_r
        group_id = pid // num_pid_in_group
        first_pid_b = group_id * GROUP_B
        group_size_b = min(num_pid_b - first_pid_b, GROUP_B)
        pid_b = first_pid_b + ((pid % num_pid_in_group) % group_size_b)
        pid_r = (pid % num_pid_in_group) // group_size_b

        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        mask_b = offs_b < B
        mask_r = offs_r < R
        x_ptrs = x_ptr + offs_b[:, None].to(tl.int64) * stride_xb + offs_k[None, :] * stride_xk

        # K loop: masked X loads, W rebuilt in registers, fp32 accumulation
        accumulator = tl.full((BLOCK_B, BLOCK_R), 0, dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptrs, mask=mask_b[:, None] & (offs_k[None, :] < K - k0), other=0.0)
            w = _nm_tile(values_ptr, codes_ptr, offs_r, mask_r, k0, K, stride_vr, stride_cr,
                         BLOCK_R, BLOCK_K, SPARSE_N, SPARSE_M, BITS, GATHER)
            accumulator = tl.dot(x, tl.trans(w), accumulator, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk

        # epilogue: bias, cast to the output dtype, masked store
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_r, mask=mask_r, other=0.0)
            accumulator += bias.to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_b[:, None].to(tl.int64) * stride_yb + offs_r[None, :] * stride_yr
        tl.store(y_ptrs, accumulator.to(y_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_r[None, :])


@functools.cache
def _autotuned():
    return triton.autotune(configs=_configs(), key=["B", "R", "K", "SPARSE_N", "SPARSE_M"])(_nm_linear_kernel)


def nm_linear(
    x: Tensor,
    values: Tensor,
    codes: Tensor,
    n: int,
    m: int,
    bias: Tensor | None = None,
    autotune: bool | None = None,
    kernel: str = "auto",
) -> Tensor:
    """``x @ Wᵀ + bias`` with ``W`` given compressed (``values``, ``codes``, ``n``:``m``).

    Args:
        x: ``(B, K)``, fp16/bf16/fp32, any strides; CUDA, or CPU under ``TRITON_INTERPRET=1``.
        values, codes: the compressed ``(R, K)`` weight, same device, ``values`` in ``x``'s dtype.
        bias: ``(R,)`` or ``None``.
        autotune: pick the tile with ``triton.autotune`` (default: on a GPU; never when interpreting).
        kernel: ``"dot"`` (tensor cores on rebuilt W tiles, any B), ``"gemv"`` (kept values only, B ≤ 16) or
            ``"auto"``: ``"dot"`` above 16 rows; up to 16, on a GPU the faster of the two, timed at the
            first call for each shape and dtype (by rule, ``"gemv"``, while a CUDA graph is being captured
            or when interpreting).

    Returns:
        ``(B, R)`` in ``x``'s dtype.
    """
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"kernel={kernel!r}: must be one of {LINEAR_KERNELS}")
    if kernel == "auto" and x.ndim == 2 and 0 < x.shape[0] <= GEMV_MAX_BATCH:
        kernel = _choose(x, values, codes, n, m, bias, autotune)
    if kernel == "gemv":
        return nm_linear_gemv(x, values, codes, n, m, bias, autotune)
    y, k = linear_output(x, values, codes, n, m, bias)
    if y.numel() == 0 or k == 0:
        return y
    batch, rows = y.shape
    values, codes = values.contiguous(), codes.contiguous()
    args = (x, values, codes, bias if bias is not None else values, y, batch, rows, k,
            x.stride(0), x.stride(1), values.stride(0), codes.stride(0), y.stride(0), y.stride(1))
    meta = {"SPARSE_N": n, "SPARSE_M": m, "BITS": code_bits(m), "GATHER": use_gather(n, m),
            "HAS_BIAS": bias is not None, "INPUT_PRECISION": input_precision(x.dtype)}
    if autotune is None:
        autotune = not _triton.INTERPRET
    if autotune and not _triton.INTERPRET:

        def grid(meta_: dict) -> tuple[int]:
            return (triton.cdiv(batch, meta_["BLOCK_B"]) * triton.cdiv(rows, meta_["BLOCK_R"]),)

        _autotuned()[grid](*args, **meta)
    else:
        config = _pick_config(batch, rows, k, m)
        grid = (triton.cdiv(batch, config["BLOCK_B"]) * triton.cdiv(rows, config["BLOCK_R"]),)
        _nm_linear_kernel[grid](*args, **meta, **config)
    return y


def _choose(x: Tensor, values: Tensor, codes: Tensor, n: int, m: int, bias: Tensor | None,
            autotune: bool | None) -> str:
    if _triton.INTERPRET or not x.is_cuda or torch.cuda.is_current_stream_capturing():
        return "gemv"
    key = (x.shape[0], tuple(values.shape), n, m, x.dtype, bias is not None, torch.cuda.get_device_name(x.device))
    if key not in _CHOSEN:
        from triton.testing import do_bench

        seconds = {name: do_bench(lambda name=name: nm_linear(x, values, codes, n, m, bias, autotune, name),
                                  warmup=10, rep=30)
                   for name in ("dot", "gemv")}
        _CHOSEN[key] = min(seconds, key=seconds.__getitem__)
    return _CHOSEN[key]


def nm_linear_reference(
    x: Tensor, values: Tensor, codes: Tensor, n: int, m: int, bias: Tensor | None = None
) -> Tensor:
    """The torch reference: ``F.linear`` with the decompressed weight."""
    k = check_compressed(values, codes, n, m)
    weight = decompress(values, codes, n, m, (values.shape[0], k))
    return F.linear(x, weight, bias)
