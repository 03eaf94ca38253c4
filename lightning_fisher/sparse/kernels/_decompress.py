"""``_nm_tile``: a dense tile of an N:M weight rebuilt in registers, shared by every kernel.

The tile covers rows ``offs_r`` and the ``BLOCK_K`` reduction columns from ``k0`` (a multiple of M) of
the reduction matrix (see :mod:`lightning_fisher.sparse.format`); columns at or past ``k_limit`` and
masked rows read as zero. Two ways to rebuild it, chosen by the constexpr ``GATHER``:

- gather (any N:M): for each of the N slots of a group, load the slot's value and code once per dense
  column (``BLOCK_K / M`` distinct addresses, each read M times, served by L1) and keep it where the code
  equals the column's position in its group;
- reshape (N in 1, 2, 4; M a power of two up to 16): load the ``BLOCK_K·N/M`` values and codes
  once, contiguously, view them as ``[rows, groups, N]``, split off each of the N slots (``tl.split``)
  and place it where its code equals the position (``tl.where`` against ``arange(M)``).

The kernels use only Triton builtins (no ``tl.cdiv``, ``tl.zeros``, ``tl.sum``: those are ``@jit``
functions of ``triton.language``, which the interpreter cannot call when ``triton.language`` was imported
before ``TRITON_INTERPRET=1`` was set, as ``import lightning`` does). Then interpreting only needs this
package's own modules to be imported (or reloaded) with the variable set.
"""

from __future__ import annotations

from lightning_fisher.sparse.kernels._triton import HAS_TRITON

__all__: list[str] = []

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _nm_tile(
        # pointers
        values_ptr, codes_ptr,
        # rows of the tile and where the reduction columns start and stop
        offs_r, mask_r, k0, k_limit,
        # strides (the column stride of values and codes is 1)
        stride_vr, stride_cr,
        # meta-parameters
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        SPARSE_N: tl.constexpr, SPARSE_M: tl.constexpr, BITS: tl.constexpr, GATHER: tl.constexpr,
    ):
        CODES_PER_BYTE: tl.constexpr = 8 // BITS
        CODE_MASK: tl.constexpr = (1 << BITS) - 1
        if GATHER:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            group = offs_k // SPARSE_M
            position = offs_k % SPARSE_M
            mask = mask_r[:, None] & (offs_k < k_limit)[None, :]
            tile = tl.full((BLOCK_R, BLOCK_K), 0, dtype=values_ptr.dtype.element_ty)
            for j in tl.static_range(SPARSE_N):
                col = group * SPARSE_N + j
                value = tl.load(values_ptr + offs_r[:, None] * stride_vr + col[None, :], mask=mask, other=0.0)
                byte = tl.load(codes_ptr + offs_r[:, None] * stride_cr + (col // CODES_PER_BYTE)[None, :],
                               mask=mask, other=0)
                code = (byte.to(tl.int32) >> ((col % CODES_PER_BYTE) * BITS)[None, :]) & CODE_MASK
                tile = tl.where(code == position[None, :], value, tile)
        else:
            BLOCK_C: tl.constexpr = BLOCK_K * SPARSE_N // SPARSE_M
            GROUPS: tl.constexpr = BLOCK_K // SPARSE_M
            col = (k0 // SPARSE_M) * SPARSE_N + tl.arange(0, BLOCK_C)
            mask = mask_r[:, None] & (((col // SPARSE_N) * SPARSE_M) < k_limit)[None, :]
            value = tl.load(values_ptr + offs_r[:, None] * stride_vr + col[None, :], mask=mask, other=0.0)
            byte = tl.load(codes_ptr + offs_r[:, None] * stride_cr + (col // CODES_PER_BYTE)[None, :],
                           mask=mask, other=0)
            code = (byte.to(tl.int32) >> ((col % CODES_PER_BYTE) * BITS)[None, :]) & CODE_MASK
            value3 = tl.reshape(value, (BLOCK_R, GROUPS, SPARSE_N))
            code3 = tl.reshape(code, (BLOCK_R, GROUPS, SPARSE_N))
            slot = tl.arange(0, SPARSE_M)[None, None, :]
            dense = tl.full((BLOCK_R, GROUPS, SPARSE_M), 0, dtype=values_ptr.dtype.element_ty)
            # tl.split peels the N slots apart (a reduction over them would need tl.sum, see the module doc)
            if SPARSE_N == 1:
                dense = tl.where(code3 == slot, value3, dense)
            elif SPARSE_N == 2:
                v0, v1 = tl.split(value3)
                c0, c1 = tl.split(code3)
                dense = tl.where(c0[:, :, None] == slot, v0[:, :, None], dense)
                dense = tl.where(c1[:, :, None] == slot, v1[:, :, None], dense)
            else:  # SPARSE_N == 4: slot j = 2·i + h of the [.., 2, 2] view
                v_h0, v_h1 = tl.split(tl.reshape(value3, (BLOCK_R, GROUPS, 2, 2)))
                c_h0, c_h1 = tl.split(tl.reshape(code3, (BLOCK_R, GROUPS, 2, 2)))
                v0, v2 = tl.split(v_h0)
                v1, v3 = tl.split(v_h1)
                c0, c2 = tl.split(c_h0)
                c1, c3 = tl.split(c_h1)
                dense = tl.where(c0[:, :, None] == slot, v0[:, :, None], dense)
                dense = tl.where(c1[:, :, None] == slot, v1[:, :, None], dense)
                dense = tl.where(c2[:, :, None] == slot, v2[:, :, None], dense)
                dense = tl.where(c3[:, :, None] == slot, v3[:, :, None], dense)
            tile = tl.reshape(dense, (BLOCK_R, BLOCK_K))
        return tile
