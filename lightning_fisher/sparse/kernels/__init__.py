"""Triton kernels for N:M weights: one operation per file (``_<op>_kernel``, ``<op>``, ``<op>_reference``).

Importing this package imports ``triton`` (when installed) and defines the ``@triton.jit`` kernels;
nothing is compiled and no driver is queried until a launcher runs. Set ``TRITON_INTERPRET=1`` before
the first import to run the kernels on CPU tensors through Triton's interpreter (fp32/fp16 only).
"""

from __future__ import annotations

from lightning_fisher.sparse.kernels._triton import HAS_TRITON, INTERPRET, KERNEL_DTYPES
from lightning_fisher.sparse.kernels.nm_conv2d import nm_conv2d, nm_conv2d_reference
from lightning_fisher.sparse.kernels.nm_conv2d_grad_input import nm_conv2d_grad_input, nm_conv2d_grad_input_reference
from lightning_fisher.sparse.kernels.nm_linear import nm_linear, nm_linear_reference
from lightning_fisher.sparse.kernels.nm_linear_gemv import nm_linear_gemv
from lightning_fisher.sparse.kernels.nm_linear_grad_input import nm_linear_grad_input, nm_linear_grad_input_reference

__all__ = [
    "HAS_TRITON",
    "INTERPRET",
    "KERNEL_DTYPES",
    "nm_conv2d",
    "nm_conv2d_grad_input",
    "nm_conv2d_grad_input_reference",
    "nm_conv2d_reference",
    "nm_linear",
    "nm_linear_gemv",
    "nm_linear_grad_input",
    "nm_linear_grad_input_reference",
    "nm_linear_reference",
]
