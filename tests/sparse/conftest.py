"""Run the Triton kernels on the CPU through Triton's interpreter, and skip GPU tests without CUDA.

``@triton.jit`` decides between compiling and interpreting when the kernel modules are imported, so
``TRITON_INTERPRET=1`` is set around that import, here, at collection time (re-importing the kernel
modules if some earlier test imported them compiled), then restored: the rest of the suite sees the
environment it had. Each test in this folder sets it again (an autouse fixture), which is what lets the
sparse modules pick the kernels on CPU tensors. On a machine with CUDA nothing is interpreted: the same
tests run the compiled kernels on the GPU (see the ``device`` fixture).

This works whatever was imported before (``import lightning`` imports ``triton.language`` compiled): the
kernels call only Triton builtins, none of ``triton.language``'s own ``@jit`` helpers (see
``lightning_fisher/sparse/kernels/_decompress.py``).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

KERNEL_MODULES = (  # dependency order
    "lightning_fisher.sparse.kernels._triton",
    "lightning_fisher.sparse.kernels._decompress",
    "lightning_fisher.sparse.kernels.nm_linear_gemv",
    "lightning_fisher.sparse.kernels.nm_linear",
    "lightning_fisher.sparse.kernels.nm_linear_grad_input",
    "lightning_fisher.sparse.kernels.nm_conv2d",
    "lightning_fisher.sparse.kernels.nm_conv2d_grad_input",
    "lightning_fisher.sparse.kernels",
)


def _import_kernels(interpret: bool) -> None:
    previous = os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        loaded = sys.modules.get(KERNEL_MODULES[0])
        stale = loaded is not None and loaded.INTERPRET != (interpret and loaded.HAS_TRITON)
        for name in KERNEL_MODULES:
            if stale and name in sys.modules:
                importlib.reload(sys.modules[name])
            else:
                importlib.import_module(name)
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


CUDA = torch.cuda.is_available()
_import_kernels(interpret=not CUDA)

from lightning_fisher.sparse.kernels import _triton  # noqa: E402

HAS_TRITON = _triton.HAS_TRITON
INTERPRETED = _triton.INTERPRET


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and not (CUDA and HAS_TRITON):
        pytest.skip("needs CUDA and Triton")


@pytest.fixture(autouse=True)
def _interpret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """Where the kernels run: the GPU when there is one, else the CPU through the interpreter."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return torch.device("cuda" if CUDA else "cpu")


def nm_masked(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``weight`` with all but the ``n`` largest magnitudes of every group of ``m`` (along dim 1, reduction
    order (kh, kw, cin) for a conv) set to +0.0."""
    from lightning_fisher.sparse.format import from_reduction_matrix, to_reduction_matrix

    matrix = to_reduction_matrix(weight)
    groups = matrix.reshape(matrix.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter(2, groups.abs().topk(n, dim=2).indices, True)
    return from_reduction_matrix(groups.masked_fill(~keep, 0.0).reshape(matrix.shape), weight.shape)


@pytest.fixture
def make_nm():
    """``make_nm(shape, n, m, seed=0, dtype=float32)`` → a random weight holding the N:M pattern."""

    def make(shape: tuple[int, ...], n: int, m: int, seed: int = 0, dtype: torch.dtype = torch.float32):
        generator = torch.Generator().manual_seed(seed)
        return nm_masked(torch.randn(shape, generator=generator), n, m).to(dtype)

    return make


@pytest.fixture
def resnet_2_4():
    """``ResNet18(width=8)`` with a 2:4 magnitude mask on every Conv2d/Linear whose input is a multiple
    of 4 (all but the 3-channel stem), non-trivial BatchNorm statistics, in eval mode."""
    from torch import nn

    from lightning_fisher.models import ResNet18

    torch.manual_seed(0)
    model = ResNet18(num_classes=10, width=8)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.shape[1] % 4 == 0:
                module.weight.copy_(nm_masked(module.weight, 2, 4))
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)  # the zero-initialised last BNs would hide the branches
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()
