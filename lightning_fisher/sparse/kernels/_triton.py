"""What every kernel file shares: the guarded ``triton`` import, the interpreter flag, and input checks.

``INTERPRET`` records whether ``TRITON_INTERPRET=1`` was set when this package was imported: that is
when ``@triton.jit`` decides between compiling for the GPU and interpreting on the CPU, so it must be
set before ``lightning_fisher.sparse.kernels`` is first imported. Nothing here queries a driver.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from lightning_fisher.sparse.format import check_nm, code_bits, packed_columns

__all__ = [
    "HAS_TRITON",
    "INTERPRET",
    "KERNEL_DTYPES",
    "check_compressed",
    "check_input",
    "input_precision",
    "interpret_requested",
    "linear_output",
    "next_power_of_2",
    "use_gather",
]

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    HAS_TRITON = False


def interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set now."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRET: bool = HAS_TRITON and interpret_requested()
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


def next_power_of_2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def use_gather(n: int, m: int) -> bool:
    """Decompress by per-slot gathers (any N:M) or by splitting contiguous loads (N in 1, 2, 4 and M a
    power of two up to 16; see ``_decompress``)."""
    return not (n in (1, 2, 4) and m & (m - 1) == 0 and m <= 16)


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 inputs follows torch's TF32 switch; 16-bit inputs ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def check_compressed(values: Tensor, codes: Tensor, n: int, m: int) -> int:
    """Validate a compressed weight; return its dense reduction size K."""
    check_nm(n, m)
    if values.ndim != 2:
        raise ValueError(f"values.shape={tuple(values.shape)}: must be 2-D [rows, K·N/M]")
    if values.shape[1] % n:
        raise ValueError(f"values.shape={tuple(values.shape)}: columns must be a multiple of n={n}")
    expected = (values.shape[0], packed_columns(values.shape[1], code_bits(m)))
    if codes.dtype != torch.uint8 or tuple(codes.shape) != expected:
        raise ValueError(
            f"codes: dtype {codes.dtype}, shape {tuple(codes.shape)}: must be uint8 of shape {expected} "
            f"for values of shape {tuple(values.shape)} and m={m}"
        )
    if codes.device != values.device:
        raise ValueError(f"codes.device={codes.device}, values.device={values.device}: must match")
    return values.shape[1] * m // n


def check_input(name: str, x: Tensor, values: Tensor, bias: Tensor | None, rows: int) -> None:
    """Device, dtype and bias checks shared by the launchers."""
    if x.device != values.device:
        raise ValueError(f"{name}.device={x.device}, values.device={values.device}: must match")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name}.dtype={x.dtype}: must be one of {KERNEL_DTYPES}")
    if x.dtype != values.dtype:
        raise ValueError(f"{name}.dtype={x.dtype}, values.dtype={values.dtype}: must match")
    if not HAS_TRITON:
        raise ValueError("triton is not installed: use the *_reference functions")
    if INTERPRET:
        if x.dtype == torch.bfloat16:
            raise ValueError(f"{name}.dtype=torch.bfloat16: tl.dot is wrong in the Triton interpreter; use fp16/fp32")
    elif not x.is_cuda:
        raise ValueError(
            f"{name}.device={x.device}: the compiled kernels need CUDA tensors; set TRITON_INTERPRET=1 before "
            "importing lightning_fisher.sparse.kernels to run them on the CPU"
        )
    if bias is not None and (tuple(bias.shape) != (rows,) or bias.device != x.device):
        raise ValueError(f"bias: shape {tuple(bias.shape)} on {bias.device}: must be ({rows},) on {x.device}")


def linear_output(
    x: Tensor, values: Tensor, codes: Tensor, n: int, m: int, bias: Tensor | None, max_batch: int | None = None
) -> tuple[Tensor, int]:
    """The checks of a forward ``x @ Wᵀ + bias`` launcher, and its output ``(y, K)``: ``y`` is already the
    result (empty, or the bias alone when ``K == 0``) when ``y.numel() == 0 or K == 0``."""
    k = check_compressed(values, codes, n, m)
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x.shape={tuple(x.shape)}: must be (B, {k}) for values of shape {tuple(values.shape)}")
    batch, rows = x.shape[0], values.shape[0]
    if max_batch is not None and batch > max_batch:
        raise ValueError(f"x.shape[0]={batch}: nm_linear_gemv takes at most {max_batch} rows; use nm_linear")
    check_input("x", x, values, bias, rows)
    y = torch.empty((batch, rows), device=x.device, dtype=x.dtype)
    if k == 0 and bias is not None:
        y.copy_(bias.expand_as(y))
    elif k == 0:
        y.zero_()
    return y, k
