"""The N:M compressed weight format: kept values plus packed kept positions, in pure torch.

A weight is read as its *reduction matrix* ``[rows, K]``: a Linear weight ``[out, in]`` as it is, a Conv2d
weight ``[out, in, kh, kw]`` as ``weight.permute(0, 2, 3, 1).reshape(out, kh·kw·in)``, i.e. with the
reduction ordered (kh, kw, cin). Group ``g`` of a row is the M consecutive columns ``g·M … g·M + M − 1``;
for a convolution it runs along input channels at one kernel position (which needs ``in % M == 0``). A
weight is N:M when every group holds at most N non-zeros (NaN counts as non-zero).

**values** ``[rows, K·N/M]``, the weight's dtype: ``values[r, g·N + j] = W[r, g·M + p_j]``, where
``p_0 < p_1 < … < p_{N−1}`` are the kept positions of group ``g`` in row ``r``, ascending. A group with
fewer than N non-zeros keeps its non-zeros plus its lowest-indexed zeros, so every group stores exactly N
values (those slots hold 0 and may become non-zero when the values are fine-tuned; the pattern stays N:M).

**codes** ``[rows, ceil(K·N/M · BITS / 8)]``, ``uint8``: the positions ``p_j`` (``0 ≤ p_j < M``), BITS bits
each, where BITS is the smallest of 1, 2, 4, 8 with ``2**BITS ≥ M`` (2:4 → 2 bits; M = 5…16 → 4 bits;
M = 17…256 → 8 bits). Widths are powers of two so that no code straddles a byte. Code number
``c = g·N + j`` of row ``r`` lives in byte ``codes[r, c // (8 // BITS)]`` at bit offset
``(c % (8 // BITS))·BITS``, first code in the lowest bits; every row starts on a fresh byte and unused
high bits of its last byte are zero. For 2:4 one byte holds two groups:
``byte = p0 | p1 << 2 | p2 << 4 | p3 << 6`` with ``(p0, p1)`` the kept positions of group ``2t`` and
``(p2, p3)`` those of group ``2t + 1``. Storage for fp16 2:4 is 0.5 + 0.0625 = 0.5625 of dense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "NMWeight",
    "check_nm",
    "code_bits",
    "compress",
    "decompress",
    "from_reduction_matrix",
    "gather_kept",
    "kept_columns",
    "nm_violation",
    "pack_codes",
    "packed_columns",
    "parse_nm",
    "to_reduction_matrix",
    "unpack_codes",
    "validate_nm",
]

MAX_M = 256
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(pattern: str) -> tuple[int, int]:
    """``"N:M"`` → ``(N, M)`` with ``0 < N < M ≤ 256``."""
    match = _NM.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(f"pattern={pattern!r}: must be 'N:M' with integers 0 < N < M, e.g. '2:4'")
    n, m = int(match.group(1)), int(match.group(2))
    check_nm(n, m)
    return n, m


def check_nm(n: int, m: int) -> None:
    """Raise ``ValueError`` unless ``0 < n < m ≤ 256`` are integers."""
    if not isinstance(n, int) or not isinstance(m, int) or isinstance(n, bool) or isinstance(m, bool):
        raise ValueError(f"n={n!r}, m={m!r}: must be integers")
    if not 0 < n < m:
        raise ValueError(f"n={n}, m={m}: must satisfy 0 < n < m")
    if m > MAX_M:
        raise ValueError(f"m={m}: must be at most {MAX_M} (positions are stored in at most 8 bits)")


def code_bits(m: int) -> int:
    """Bits per stored position: the smallest of 1, 2, 4, 8 with ``2**bits ≥ m``."""
    for bits in (1, 2, 4, 8):
        if (1 << bits) >= m:
            return bits
    raise ValueError(f"m={m}: must be at most {MAX_M}")


def packed_columns(count: int, bits: int) -> int:
    """Bytes per row that hold ``count`` codes of ``bits`` bits."""
    return -(-count * bits // 8)


def to_reduction_matrix(weight: Tensor) -> Tensor:
    """``[out, in]`` as is; ``[out, in, kh, kw]`` → ``[out, kh·kw·in]`` (reduction order kh, kw, cin)."""
    if weight.ndim == 2:
        return weight
    if weight.ndim == 4:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    raise ValueError(f"weight shape {tuple(weight.shape)}: must be 2-D (Linear) or 4-D (Conv2d)")


def from_reduction_matrix(matrix: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Inverse of :func:`to_reduction_matrix` for a weight of ``shape`` (contiguous result)."""
    shape = tuple(shape)
    if len(shape) == 2:
        return matrix.reshape(shape).contiguous()
    out, cin, kh, kw = shape
    # clone, not contiguous(): with size-1 kernels the permuted view already counts as contiguous but keeps
    # channels-last strides, which send F.conv2d down another algorithm (different rounding)
    return matrix.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)


def _describe_group(shape: tuple[int, ...], group: int, m: int) -> str:
    start = group * m
    if len(shape) == 2:
        return f"reduction columns {start}..{start + m - 1}"
    cin, kw = shape[1], shape[3]
    tap, channel = divmod(start, cin)
    return f"kernel position ({tap // kw}, {tap % kw}), input channels {channel}..{channel + m - 1}"


def nm_violation(weight: Tensor, n: int, m: int) -> str | None:
    """Why ``weight`` cannot be stored as N:M (``None`` when it can); names the first bad group."""
    check_nm(n, m)
    shape = tuple(weight.shape)
    if weight.ndim not in (2, 4):
        return f"weight shape {shape}: must be 2-D (Linear) or 4-D (Conv2d)"
    if shape[1] % m:
        return f"weight shape {shape}: input dimension (dim 1) of size {shape[1]} is not a multiple of M={m}"
    matrix = to_reduction_matrix(weight.detach())
    counts = (matrix != 0).reshape(matrix.shape[0], -1, m).sum(dim=2)
    bad = (counts > n).nonzero()
    if bad.numel() == 0:
        return None
    row, group = (int(v) for v in bad[0])
    return (
        f"weight of shape {shape} is not {n}:{m}: row {row}, group {group} "
        f"({_describe_group(shape, group, m)}) holds {int(counts[row, group])} non-zeros (at most {n})"
    )


def validate_nm(weight: Tensor, n: int, m: int) -> None:
    """Raise ``ValueError`` naming the first group of ``weight`` with more than ``n`` of ``m`` non-zeros."""
    problem = nm_violation(weight, n, m)
    if problem is not None:
        raise ValueError(problem)


def pack_codes(positions: Tensor, bits: int) -> Tensor:
    """``[rows, count]`` integer positions → ``[rows, packed_columns(count, bits)]`` uint8 (layout above)."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits={bits}: must be 1, 2, 4 or 8")
    rows, count = positions.shape
    per_byte = 8 // bits
    padded = torch.zeros(rows, packed_columns(count, bits) * per_byte, dtype=torch.int32, device=positions.device)
    padded[:, :count] = positions.to(torch.int32)
    shifts = torch.arange(per_byte, device=positions.device, dtype=torch.int32) * bits
    return (padded.reshape(rows, -1, per_byte) << shifts).sum(dim=2).to(torch.uint8)


def unpack_codes(codes: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_codes`: the first ``count`` positions of every row, as int64."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits={bits}: must be 1, 2, 4 or 8")
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    fields = (codes.to(torch.int32).unsqueeze(2) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(codes.shape[0], -1)[:, :count].to(torch.int64)


def kept_columns(codes: Tensor, n: int, m: int, count: int) -> Tensor:
    """Reduction-matrix column of every stored value: ``(c // n)·m + p_c``, ``[rows, count]`` int64."""
    positions = unpack_codes(codes, code_bits(m), count)
    groups = torch.arange(count, device=codes.device) // n
    return groups * m + positions


@dataclass(frozen=True)
class NMWeight:
    """An N:M weight in the compressed format of this module (see the module docstring)."""

    values: Tensor
    codes: Tensor
    n: int
    m: int
    shape: tuple[int, ...]

    @property
    def bits(self) -> int:
        return code_bits(self.m)

    def to_dense(self) -> Tensor:
        return decompress(self.values, self.codes, self.n, self.m, self.shape)


def compress(weight: Tensor, n: int, m: int) -> NMWeight:
    """Compress an N:M ``weight`` (Linear ``[out, in]`` or Conv2d ``[out, in, kh, kw]``).

    Raises:
        ValueError: the weight is not N:M (the message names the first bad group) or dim 1 is not a
            multiple of ``m``.
    """
    validate_nm(weight, n, m)
    matrix = to_reduction_matrix(weight.detach())
    rows = matrix.shape[0]
    groups = matrix.reshape(rows, -1, m)
    # Non-zeros first, then the lowest-indexed zeros; stable, so equal keys keep index order.
    order = torch.sort((groups != 0).to(torch.int8), dim=2, descending=True, stable=True).indices
    positions = order[:, :, :n].sort(dim=2).values
    values = groups.gather(2, positions).reshape(rows, -1).contiguous()
    codes = pack_codes(positions.reshape(rows, -1), code_bits(m))
    return NMWeight(values=values, codes=codes, n=n, m=m, shape=tuple(weight.shape))


def decompress(values: Tensor, codes: Tensor, n: int, m: int, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """The dense weight of ``shape`` (differentiable in ``values``: the gradient reaches kept values only)."""
    check_nm(n, m)
    rows, count = values.shape
    k = count * m // n
    columns = kept_columns(codes, n, m, count)
    matrix = values.new_zeros(rows, k).scatter(1, columns, values)
    return from_reduction_matrix(matrix, shape)


def gather_kept(dense_matrix: Tensor, codes: Tensor, n: int, m: int) -> Tensor:
    """Entries of a reduction-layout ``[rows, K]`` tensor at the kept positions: ``[rows, K·N/M]``.

    Turns a dense weight gradient into the gradient of the stored values.
    """
    count = dense_matrix.shape[1] * n // m
    return dense_matrix.gather(1, kept_columns(codes, n, m, count))
