"""``nm_linear_gemv``: Y = X·Wᵀ (+ bias) for a few rows of X, reading only W's kept values.

For batch sizes up to 16 a Linear layer is bound by reading its weight, so the N:M format's promise is
to read less: half the bytes for 2:4 in fp16, plus 1/16 for the codes (a ceiling of 1.78× over dense).
The ``tl.dot`` kernel (:mod:`.nm_linear`) rebuilds dense W tiles in registers for the tensor cores, work
that does not pay at these batch sizes. This one never forms W: each program takes ``BLOCK_R`` output
rows, walks the compressed columns in ``BLOCK_C`` steps, decodes each kept value's column
``k = (c // N)·M + code`` and multiplies it with ``X[:, k]``, gathered for every batch row at once (X is
small and stays in cache), reducing along the compressed columns in fp32. fp16, bf16 and fp32 inputs.
"""

from __future__ import annotations

import functools

from torch import Tensor

from lightning_fisher.sparse.format import code_bits
from lightning_fisher.sparse.kernels import _triton
from lightning_fisher.sparse.kernels._triton import HAS_TRITON, linear_output

__all__ = ["GEMV_MAX_BATCH", "nm_linear_gemv"]

GEMV_MAX_BATCH = 16  # every batch row is gathered in one [BLOCK_B, BLOCK_R, BLOCK_C] tile

if HAS_TRITON:
    import triton
    import triton.language as tl


def _configs() -> list:
    """Autotuning candidates (GPU only): many small row blocks, so that enough programs stream the weight;
    ``_fits_registers`` keeps those that suit the batch (at 16 rows, the first three)."""
    shapes = [  # BLOCK_R, BLOCK_C, num_warps
        (4, 64, 2), (4, 128, 2), (8, 64, 2),
        (4, 256, 2), (8, 128, 2), (8, 256, 4), (16, 64, 2), (16, 128, 4), (32, 64, 4), (32, 128, 4),
    ]
    return [triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w, num_stages=3) for r, c, w in shapes]


def _fits_registers(configs: list, named_args: dict, **kwargs: object) -> list:
    """Drop tiles whose gathered X block would spill: ``BLOCK_B·BLOCK_R·BLOCK_C`` of at most 8,192."""
    block_b = kwargs.get("BLOCK_B", named_args.get("BLOCK_B", GEMV_MAX_BATCH))
    kept = [c for c in configs if block_b * c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_C"] <= 8192]
    return kept or configs[:1]


def _pick_config(block_b: int, rows: int, columns: int) -> dict:
    """One config chosen by shape: used when not autotuning (the interpreter, or ``autotune=False``)."""
    block_r = max(1, min(16, _triton.next_power_of_2(rows)))
    block_c = max(16, min(8192 // (block_b * block_r), 128, _triton.next_power_of_2(columns)))
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": 4}


if HAS_TRITON:

    @triton.jit
    def _add(a, b):
        # tl.sum is a @jit helper of triton.language, which the interpreter cannot call when triton.language
        # was imported compiled (see _decompress); tl.reduce with this combiner is a builtin
        return a + b

    @triton.jit
    def _nm_linear_gemv_kernel(
        # pointers
        x_ptr, values_ptr, codes_ptr, bias_ptr, y_ptr,
        # sizes: batch, output rows, compressed columns (K·N/M)
        B, R, C,
        # strides (the column stride of values and codes is 1)
        stride_xb, stride_xk,
        stride_vr, stride_cr,
        stride_yb, stride_yr,
        # meta-parameters
        SPARSE_N: tl.constexpr, SPARSE_M: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        CODES_PER_BYTE: tl.constexpr = 8 // BITS
        CODE_MASK: tl.constexpr = (1 << BITS) - 1
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_b = tl.arange(0, BLOCK_B)
        mask_r = offs_r < R
        mask_b = offs_b < B
        accumulator = tl.full((BLOCK_B, BLOCK_R), 0, dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = mask_r[:, None] & (offs_c < C)[None, :]
            value = tl.load(values_ptr + offs_r[:, None] * stride_vr + offs_c[None, :], mask=mask, other=0.0)
            byte = tl.load(codes_ptr + offs_r[:, None] * stride_cr + (offs_c // CODES_PER_BYTE)[None, :],
                           mask=mask, other=0)
            code = (byte.to(tl.int32) >> ((offs_c % CODES_PER_BYTE) * BITS)[None, :]) & CODE_MASK
            column = (offs_c // SPARSE_N)[None, :] * SPARSE_M + code  # the dense column of each kept value
            x = tl.load(x_ptr + offs_b[:, None, None].to(tl.int64) * stride_xb + column[None, :, :] * stride_xk,
                        mask=mask_b[:, None, None] & mask[None, :, :], other=0.0)
            product = x.to(tl.float32) * value.to(tl.float32)[None, :, :]
            accumulator += tl.reduce(product, 2, _add)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_r, mask=mask_r, other=0.0)
            accumulator += bias.to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_b[:, None].to(tl.int64) * stride_yb + offs_r[None, :] * stride_yr
        tl.store(y_ptrs, accumulator.to(y_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_r[None, :])


@functools.cache
def _autotuned():
    return triton.autotune(configs=_configs(), key=["B", "R", "C", "SPARSE_N", "SPARSE_M"],
                           prune_configs_by={"early_config_prune": _fits_registers})(_nm_linear_gemv_kernel)


def nm_linear_gemv(
    x: Tensor,
    values: Tensor,
    codes: Tensor,
    n: int,
    m: int,
    bias: Tensor | None = None,
    autotune: bool | None = None,
) -> Tensor:
    """``x @ Wᵀ + bias`` for at most :data:`GEMV_MAX_BATCH` rows of ``x``, ``W`` given compressed.

    Args:
        x: ``(B, K)`` with ``B ≤ 16``, fp16/bf16/fp32, any strides; CUDA, or CPU under ``TRITON_INTERPRET=1``.
        values, codes: the compressed ``(R, K)`` weight, same device, ``values`` in ``x``'s dtype.
        bias: ``(R,)`` or ``None``.
        autotune: pick the tile with ``triton.autotune`` (default: on a GPU; never when interpreting).

    Returns:
        ``(B, R)`` in ``x``'s dtype.

    Raises:
        ValueError: ``B`` over 16 (use :func:`~.nm_linear.nm_linear`), or the checks of ``nm_linear``.
    """
    y, k = linear_output(x, values, codes, n, m, bias, max_batch=GEMV_MAX_BATCH)
    if y.numel() == 0 or k == 0:
        return y
    batch, rows = y.shape
    values, codes = values.contiguous(), codes.contiguous()
    columns = values.shape[1]
    block_b = _triton.next_power_of_2(batch)
    args = (x, values, codes, bias if bias is not None else values, y, batch, rows, columns,
            x.stride(0), x.stride(1), values.stride(0), codes.stride(0), y.stride(0), y.stride(1))
    meta = {"SPARSE_N": n, "SPARSE_M": m, "BITS": code_bits(m), "HAS_BIAS": bias is not None, "BLOCK_B": block_b}
    if autotune is None:
        autotune = not _triton.INTERPRET
    if autotune and not _triton.INTERPRET:
        _autotuned()[lambda meta_: (triton.cdiv(rows, meta_["BLOCK_R"]),)](*args, **meta)
    else:
        config = _pick_config(block_b, rows, columns)
        _nm_linear_gemv_kernel[(triton.cdiv(rows, config["BLOCK_R"]),)](*args, **meta, **config)
    return y
