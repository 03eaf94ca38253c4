"""``nm_linear_grad_input``: dX = dY·W, the input gradient of Y = X·Wᵀ, with W N:M compressed.

dY is ``(B, R)``; W is ``(R, K)`` in the compressed format; dX is ``(B, K)`` in dY's dtype. Each
program computes a ``BLOCK_B × BLOCK_K`` tile of dX and walks R (the reduction here) in ``BLOCK_R``
steps: a dY tile times the W tile rebuilt in registers (``_nm_tile``, rows = the R step, columns = this
program's K block), accumulated in fp32 by ``tl.dot``.
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

__all__ = ["nm_linear_grad_input", "nm_linear_grad_input_reference"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    from lightning_fisher.sparse.kernels._decompress import _nm_tile


def _configs() -> list:
    """Autotuning candidates (GPU only)."""
    shapes = [  # BLOCK_B, BLOCK_K, BLOCK_R, num_warps, num_stages
        (16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 4),
        (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_B": b, "BLOCK_K": k, "BLOCK_R": r, "GROUP_B": 8}, num_warps=w, num_stages=s)
        for b, k, r, w, s in shapes
    ]


def _pick_config(batch: int, rows: int, k: int, m: int) -> dict:
    """One config chosen by shape: used when not autotuning."""
    block_b = 16 if batch <= 16 else 32 if batch <= 32 else 64 if batch <= 64 else 128
    block_k = max(16, min(64, _triton.next_power_of_2(k)), _triton.next_power_of_2(m))
    block_r = max(16, min(64, _triton.next_power_of_2(rows)))
    return {"BLOCK_B": block_b, "BLOCK_K": block_k, "BLOCK_R": block_r, "GROUP_B": 8, "num_warps": 4,
            "num_stages": 3}


if HAS_TRITON:

    @triton.jit
    def _nm_linear_grad_input_kernel(
        # pointers
        dy_ptr, values_ptr, codes_ptr, dx_ptr,
        # sizes
        B, R, K,
        # strides
        stride_dyb, stride_dyr,
        stride_vr, stride_cr,
        stride_dxb, stride_dxk,
        # meta-parameters
        SPARSE_N: tl.constexpr, SPARSE_M: tl.constexpr, BITS: tl.constexpr, GATHER: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_B: tl.constexpr,
    ):
        # program id -> output tile (grouped along B)
        pid = tl.program_id(0)
        num_pid_b = (B + BLOCK_B - 1) // BLOCK_B
        num_pid_k = (K + BLOCK_K - 1) // BLOCK_K
        num_pid_in_group = GROUP_B * num_pid_k
        group_id = pid // num_pid_in_group
        first_pid_b = group_id * GROUP_B
        group_size_b = min(num_pid_b - first_pid_b, GROUP_B)
        pid_b = first_pid_b + ((pid % num_pid_in_group) % group_size_b)
        pid_k = (pid % num_pid_in_group) // group_size_b

        k0 = pid_k * BLOCK_K
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        mask_b = offs_b < B
        dy_ptrs = dy_ptr + offs_b[:, None].to(tl.int64) * stride_dyb + offs_r[None, :] * stride_dyr

        # R loop: dY tile · W tile (rows r, columns of this K block)
        accumulator = tl.full((BLOCK_B, BLOCK_K), 0, dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            mask_r = offs_r < R - r0
            dy = tl.load(dy_ptrs, mask=mask_b[:, None] & mask_r[None, :], other=0.0)
            w = _nm_tile(values_ptr, codes_ptr, r0 + offs_r, mask_r, k0, K, stride_vr, stride_cr,
                         BLOCK_R, BLOCK_K, SPARSE_N, SPARSE_M, BITS, GATHER)
            accumulator = tl.dot(dy, w, accumulator, input_precision=INPUT_PRECISION)
            dy_ptrs += BLOCK_R * stride_dyr

        # epilogue: cast, masked store
        dx_ptrs = dx_ptr + offs_b[:, None].to(tl.int64) * stride_dxb + offs_k[None, :] * stride_dxk
        tl.store(dx_ptrs, accumulator.to(dx_ptr.dtype.element_ty), mask=mask_b[:, None] & (offs_k < K)[None, :])


@functools.cache
def _autotuned():
    key = ["B", "R", "K", "SPARSE_N", "SPARSE_M"]
    return triton.autotune(configs=_configs(), key=key)(_nm_linear_grad_input_kernel)


def nm_linear_grad_input(
    grad_output: Tensor, values: Tensor, codes: Tensor, n: int, m: int, autotune: bool | None = None
) -> Tensor:
    """``grad_output @ W`` with ``W`` ``(R, K)`` given compressed: the input gradient of a sparse Linear.

    Args:
        grad_output: ``(B, R)``, fp16/bf16/fp32, any strides; CUDA, or CPU under ``TRITON_INTERPRET=1``.
        values, codes: the compressed weight, ``values`` in ``grad_output``'s dtype.
        autotune: as in :func:`~lightning_fisher.sparse.kernels.nm_linear`.

    Returns:
        ``(B, K)`` in ``grad_output``'s dtype.
    """
    k = check_compressed(values, codes, n, m)
    rows = values.shape[0]
    if grad_output.ndim != 2 or grad_output.shape[1] != rows:
        raise ValueError(f"grad_output.shape={tuple(grad_output.shape)}: must be (B, {rows})")
    check_input("grad_output", grad_output, values, None, rows)
    batch = grad_output.shape[0]
    dx = torch.empty((batch, k), device=grad_output.device, dtype=grad_output.dtype)
    if batch == 0 or k == 0:
        return dx
    if rows == 0:
        return dx.zero_()
    values, codes = values.contiguous(), codes.contiguous()
    args = (grad_output, values, codes, dx, batch, rows, k, grad_output.stride(0), grad_output.stride(1),
            values.stride(0), codes.stride(0), dx.stride(0), dx.stride(1))
    meta = {"SPARSE_N": n, "SPARSE_M": m, "BITS": code_bits(m), "GATHER": use_gather(n, m),
            "INPUT_PRECISION": input_precision(grad_output.dtype)}
    if autotune is None:
        autotune = not _triton.INTERPRET
    if autotune and not _triton.INTERPRET:

        def grid(meta_: dict) -> tuple[int]:
            return (triton.cdiv(batch, meta_["BLOCK_B"]) * triton.cdiv(k, meta_["BLOCK_K"]),)

        _autotuned()[grid](*args, **meta)
    else:
        config = _pick_config(batch, rows, k, m)
        grid = (triton.cdiv(batch, config["BLOCK_B"]) * triton.cdiv(k, config["BLOCK_K"]),)
        _nm_linear_grad_input_kernel[grid](*args, **meta, **config)
    return dx


def nm_linear_grad_input_reference(grad_output: Tensor, values: Tensor, codes: Tensor, n: int, m: int) -> Tensor:
    """The torch reference: ``grad_output @ decompress(W)``."""
    k = check_compressed(values, codes, n, m)
    return grad_output @ decompress(values, codes, n, m, (values.shape[0], k))
