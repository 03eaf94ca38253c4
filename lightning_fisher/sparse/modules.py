"""``NMSparseLinear`` and ``NMSparseConv2d``: layers that store an N:M weight compressed and run it sparse.

Parameters: ``values`` (the kept weights, ``[rows, K·N/M]``, an ``nn.Parameter``) and ``bias``; buffer:
``codes`` (packed kept positions, ``uint8``); see :mod:`lightning_fisher.sparse.format`. Training
updates ``values`` only, so the pattern never changes. Backends:

- ``"triton"``: the Triton kernels (:mod:`lightning_fisher.sparse.kernels`) where they can run (CUDA; CPU
  under ``TRITON_INTERPRET=1``), else the torch fallback: ``F.linear``/``F.conv2d`` on the decompressed
  weight, the same result as the masked dense layer.
- ``"cusparselt"``: PyTorch's ``to_sparse_semi_structured`` (cuSPARSELt, sparse tensor cores) for the
  forward; 2:4 only, CUDA only, fp16/bf16 inputs. Its compressed weight is built on first use and rebuilt
  after ``values`` change. The backward uses the Triton kernels (or torch).

The input's dtype decides the compute dtype: ``values`` and ``bias`` are cast to it (as autocast would).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_fisher.sparse.format import (
    check_nm,
    code_bits,
    compress,
    decompress,
    packed_columns,
    to_reduction_matrix,
    validate_nm,
)
from lightning_fisher.sparse.functional import kernels_available, nm_conv2d_forward, nm_linear_forward

__all__ = ["MODULE_BACKENDS", "ModuleBackend", "NMSparseConv2d", "NMSparseLinear"]

ModuleBackend = Literal["triton", "cusparselt"]
MODULE_BACKENDS: tuple[str, ...] = ("triton", "cusparselt")
_SEMI_DTYPES = (torch.float16, torch.bfloat16)


def _check_backend(backend: str, n: int, m: int) -> None:
    if backend not in MODULE_BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of {MODULE_BACKENDS}")
    if backend == "cusparselt" and (n, m) != (2, 4):
        raise ValueError(f"backend='cusparselt': supports 2:4 only, got {n}:{m}")


def semi_structured(matrix: Tensor) -> Tensor:
    """``torch.sparse.to_sparse_semi_structured`` of a 2:4 ``[rows, K]`` matrix, errors as ``ValueError``."""
    if not matrix.is_cuda:
        raise ValueError(f"backend='cusparselt': needs a CUDA weight, got one on {matrix.device}")
    if matrix.dtype not in _SEMI_DTYPES:
        raise ValueError(f"backend='cusparselt': needs fp16 or bf16, got {matrix.dtype}")
    try:
        return torch.sparse.to_sparse_semi_structured(matrix.contiguous())
    except RuntimeError as error:
        raise ValueError(f"backend='cusparselt': {error}") from error


class _NMSparseBase(nn.Module):
    """Storage, casting and the cuSPARSELt cache shared by the two layer types."""

    values: nn.Parameter
    codes: Tensor
    bias: nn.Parameter | None

    def _init_storage(self, rows: int, k: int, n: int, m: int, bias: bool, backend: str, device: Any,
                      dtype: Any) -> None:
        check_nm(n, m)
        _check_backend(backend, n, m)
        self.n, self.m, self.backend = n, m, backend
        count = k * n // m
        self.values = nn.Parameter(torch.zeros(rows, count, device=device, dtype=dtype))
        self.register_buffer("codes", torch.zeros(rows, packed_columns(count, code_bits(m)), device=device,
                                                  dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(rows, device=device, dtype=dtype)) if bias else None
        self._semi_cache: tuple[tuple, Tensor] | None = None

    def _load_compressed(self, weight: Tensor, bias: Tensor | None) -> None:
        compressed = compress(weight, self.n, self.m)
        with torch.no_grad():
            self.values.copy_(compressed.values)
            self.codes.copy_(compressed.codes)
            if bias is not None and self.bias is not None:
                self.bias.copy_(bias)

    def _adopt(self, module: nn.Linear | nn.Conv2d) -> None:
        """Take ``module``'s (N:M) weight, bias, trainability and mode."""
        self._load_compressed(module.weight.detach(), module.bias.detach() if module.bias is not None else None)
        self.values.requires_grad_(module.weight.requires_grad)
        self.train(module.training)

    def dense_weight(self) -> Tensor:
        raise NotImplementedError

    def _fill_dense(self, dense: nn.Linear | nn.Conv2d) -> nn.Linear | nn.Conv2d:
        """Give a (meta-device) dense layer this layer's weight with zeros in place, bias and mode."""
        dense.weight = nn.Parameter(self.dense_weight().detach().clone(), requires_grad=self.values.requires_grad)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        dense.train(self.training)
        return dense

    def _cast(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        values = self.values if self.values.dtype == x.dtype else self.values.to(x.dtype)
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return values, bias

    def _semi(self, x: Tensor, shape: tuple[int, ...]) -> Tensor | None:
        """The cuSPARSELt weight for ``x`` (``backend="cusparselt"``), cached until ``values`` change."""
        if self.backend != "cusparselt":
            return None
        if not x.is_cuda:
            raise ValueError(f"backend='cusparselt': runs on CUDA only, got input on {x.device}")
        if x.dtype not in _SEMI_DTYPES:
            raise ValueError(f"backend='cusparselt': needs fp16/bf16 input, got {x.dtype}")
        key = (self.values._version, self.values.data_ptr(), x.device, x.dtype)
        if self._semi_cache is None or self._semi_cache[0] != key:
            with torch.no_grad():
                dense = decompress(self.values.to(x.dtype), self.codes, self.n, self.m, shape)
            self._semi_cache = (key, semi_structured(to_reduction_matrix(dense)))
        return self._semi_cache[1]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_semi_cache"] = None  # a device-side object rebuilt on demand; never copied or pickled
        return state

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        self._semi_cache = None
        return super()._apply(fn, recurse)


class NMSparseLinear(_NMSparseBase):
    """A Linear layer whose weight is N:M sparse, stored compressed and run by sparse kernels.

    Implements N:M semi-structured sparsity (Mishra et al., "Accelerating Sparse Deep Neural Networks",
    2021; NVIDIA's 2:4): groups of ``m`` consecutive input features hold at most ``n`` non-zeros. Build
    it with :meth:`from_dense`; :meth:`to_dense` gives the ``nn.Linear`` back.

    Args:
        in_features, out_features: as ``nn.Linear``; ``in_features`` must be a multiple of ``m``.
        n, m: the pattern, ``0 < n < m``.
        bias: whether the layer has a bias.
        backend: ``"triton"`` or ``"cusparselt"`` (see the module docstring).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n: int = 2,
        m: int = 4,
        bias: bool = True,
        backend: ModuleBackend = "triton",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        check_nm(n, m)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features={in_features}, out_features={out_features}: must be positive")
        if in_features % m:
            raise ValueError(f"in_features={in_features}: must be a multiple of m={m}")
        self.in_features, self.out_features = in_features, out_features
        self._init_storage(out_features, in_features, n, m, bias, backend, device, dtype)

    @classmethod
    def from_dense(cls, module: nn.Linear, n: int = 2, m: int = 4, backend: ModuleBackend = "triton") -> NMSparseLinear:
        """Compress an ``nn.Linear`` whose weight is already N:M (zeros in place).

        Raises:
            ValueError: the weight is not N:M (the message names the first bad group), ``in_features``
                is not a multiple of ``m``, or the backend cannot take this layer.
        """
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module={type(module).__name__}: must be an nn.Linear")
        check_nm(n, m)
        _check_backend(backend, n, m)
        validate_nm(module.weight, n, m)
        weight = module.weight.detach()
        if backend == "cusparselt":
            semi_structured(weight.to(weight.dtype if weight.dtype in _SEMI_DTYPES else torch.float16))
        sparse = cls(module.in_features, module.out_features, n, m, module.bias is not None, backend,
                     device=weight.device, dtype=weight.dtype)
        sparse._adopt(module)
        return sparse

    def dense_weight(self) -> Tensor:
        """The ``[out, in]`` weight with zeros in place (differentiable in ``values``)."""
        return decompress(self.values, self.codes, self.n, self.m, (self.out_features, self.in_features))

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weight (zeros in place) and bias, same device and dtype."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                          dtype=self.values.dtype)
        return self._fill_dense(dense)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input.shape={tuple(x.shape)}: last dimension must be {self.in_features}")
        values, bias = self._cast(x)
        semi = self._semi(x, (self.out_features, self.in_features))
        return nm_linear_forward(x, values, self.codes, bias, self.n, self.m, kernels_available(x), semi)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.n}:{self.m}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")


def _pair(value: int | tuple[int, ...], name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name}={value!r}: must be an int or a pair of ints")


class NMSparseConv2d(_NMSparseBase):
    """A Conv2d layer whose weight is N:M sparse along input channels, run as a sparse implicit GEMM.

    Implements N:M semi-structured sparsity (Mishra et al., 2021) for convolutions: with the reduction
    ordered (kh, kw, cin), groups of ``m`` consecutive input channels at each kernel position hold at
    most ``n`` non-zeros. Build it with :meth:`from_dense`; :meth:`to_dense` gives the ``nn.Conv2d``
    back. Zero padding, ``groups=1`` only.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation: as ``nn.Conv2d`` (numeric
            padding); ``in_channels`` must be a multiple of ``m``.
        n, m: the pattern, ``0 < n < m``.
        bias: whether the layer has a bias.
        backend: ``"triton"`` or ``"cusparselt"`` (see the module docstring).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        n: int = 2,
        m: int = 4,
        bias: bool = True,
        backend: ModuleBackend = "triton",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        check_nm(n, m)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels={in_channels}, out_channels={out_channels}: must be positive")
        if in_channels % m:
            raise ValueError(f"in_channels={in_channels}: must be a multiple of m={m}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        if min(*self.kernel_size, *self.stride, *self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}, "
                             f"padding={self.padding}: must be >= 1 (padding >= 0)")
        k = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_storage(out_channels, k, n, m, bias, backend, device, dtype)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @classmethod
    def from_dense(cls, module: nn.Conv2d, n: int = 2, m: int = 4, backend: ModuleBackend = "triton") -> NMSparseConv2d:
        """Compress an ``nn.Conv2d`` whose weight is already N:M along input channels (zeros in place).

        Raises:
            ValueError: grouped, non-zero-padded or ``padding="same"`` convolutions, ``in_channels`` not a
                multiple of ``m``, a weight that is not N:M (naming the first bad group), or a backend that
                cannot take this layer.
        """
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"module={type(module).__name__}: must be an nn.Conv2d")
        check_nm(n, m)
        _check_backend(backend, n, m)
        if module.groups != 1:
            raise ValueError(f"groups={module.groups}: only groups=1 convolutions can be made N:M sparse")
        if module.padding_mode != "zeros":
            raise ValueError(f"padding_mode={module.padding_mode!r}: only 'zeros' is supported")
        if isinstance(module.padding, str):
            raise ValueError(f"padding={module.padding!r}: give the padding as numbers")
        validate_nm(module.weight, n, m)
        weight = module.weight.detach()
        if backend == "cusparselt":
            matrix = to_reduction_matrix(weight)
            semi_structured(matrix.to(matrix.dtype if matrix.dtype in _SEMI_DTYPES else torch.float16))
        sparse = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                     module.dilation, n, m, module.bias is not None, backend, device=weight.device, dtype=weight.dtype)
        sparse._adopt(module)
        return sparse

    def dense_weight(self) -> Tensor:
        """The ``[out, in, kh, kw]`` weight with zeros in place (differentiable in ``values``)."""
        return decompress(self.values, self.codes, self.n, self.m, self.weight_shape)

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the same weight (zeros in place) and bias, same device and dtype."""
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, bias=self.bias is not None, device="meta", dtype=self.values.dtype)
        return self._fill_dense(dense)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"input.shape={tuple(x.shape)}: must be (B, {self.in_channels}, H, W)")
        values, bias = self._cast(x)
        semi = self._semi(x, self.weight_shape)
        geometry = (self.kernel_size, self.stride, self.padding, self.dilation)
        return nm_conv2d_forward(x, values, self.codes, bias, self.n, self.m, geometry, kernels_available(x), semi)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, pattern={self.n}:{self.m}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")
