"""The Triton kernels against the dense masked product (CPU: Triton's interpreter; GPU: compiled).

Tolerances per dtype: fp32 against an fp64 reference; fp16 against the fp64 reference rounded to fp16.
Largest errors measured under the interpreter over these shapes and seeds: fp32 6.7e-6 (allowed
1e-4 + 1e-4·|ref|); fp16 0.031, one fp16 ulp at outputs of 32–64 (allowed 0.02 + 0.01·|ref|, i.e. 0.34 or
more there; outputs reach 46).
"""

import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lightning_fisher.sparse.format import compress
from lightning_fisher.sparse.kernels import (
    nm_conv2d,
    nm_conv2d_grad_input,
    nm_conv2d_grad_input_reference,
    nm_conv2d_reference,
    nm_linear,
    nm_linear_grad_input,
    nm_linear_grad_input_reference,
    nm_linear_reference,
)
from lightning_fisher.sparse.kernels.nm_linear_gemv import nm_linear_gemv

TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 2e-2, "rtol": 1e-2},
       torch.bfloat16: {"atol": 1e-1, "rtol": 2e-2}}
DTYPES = [torch.float32, torch.float16]
PATTERNS = [(2, 4), (1, 2), (4, 8), (1, 3), (3, 8)]  # split path (N = 1, 2, 4) and gather path (1:3, 3:8)


def _expect(result: torch.Tensor, reference64: torch.Tensor) -> None:
    torch.testing.assert_close(result.cpu(), reference64.to(result.dtype).cpu(), **TOL[result.dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("batch,rows,k", [(7, 13, 24), (33, 70, 144)])
def test_linear_equals_dense_masked_product(make_nm, device, dtype, n, m, batch, rows, k):
    weight = make_nm((rows, k), n, m, seed=1)
    packed = compress(weight, n, m)
    x = torch.randn(batch, k, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(3))
    reference = x.double() @ weight.double().T + bias.double()
    y = nm_linear(x.to(device, dtype), packed.values.to(device, dtype), packed.codes.to(device), n, m,
                  bias.to(device, dtype))
    assert y.dtype == dtype and y.shape == (batch, rows)
    _expect(y, reference)
    no_bias = nm_linear(x.to(device, dtype), packed.values.to(device, dtype), packed.codes.to(device), n, m)
    _expect(no_bias, x.double() @ weight.double().T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3)])
@pytest.mark.parametrize("batch,rows,k", [(1, 13, 24), (16, 33, 48)])
@pytest.mark.parametrize("kernel", ["dot", "gemv"])  # "auto" (gemv here) runs in the test above, at batch 7
def test_linear_kernels_for_a_few_rows_equal_the_dense_masked_product(make_nm, device, dtype, n, m, batch, rows, k,
                                                                       kernel):
    k -= k % m
    weight = make_nm((rows, k), n, m, seed=4)
    packed = compress(weight, n, m)
    x = torch.randn(batch, k, generator=torch.Generator().manual_seed(5))
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(6))
    y = nm_linear(x.to(device, dtype), packed.values.to(device, dtype), packed.codes.to(device), n, m,
                  bias.to(device, dtype), kernel=kernel)
    assert y.dtype == dtype and y.shape == (batch, rows)
    _expect(y, x.double() @ weight.double().T + bias.double())


def test_gemv_takes_strided_input_and_at_most_16_rows(make_nm, device):
    weight = make_nm((24, 32), 2, 4)
    packed = compress(weight, 2, 4)
    x = torch.randn(32, 9).T  # (9, 32), column-major
    _expect(nm_linear_gemv(x.to(device), packed.values.to(device), packed.codes.to(device), 2, 4),
            x.double() @ weight.double().T)
    with pytest.raises(ValueError, match=r"x.shape\[0\]=17: nm_linear_gemv takes at most 16 rows"):
        nm_linear_gemv(torch.randn(17, 32, device=device), packed.values.to(device), packed.codes.to(device), 2, 4)
    with pytest.raises(ValueError, match="kernel='gemm': must be one of"):
        nm_linear(x.to(device), packed.values.to(device), packed.codes.to(device), 2, 4, kernel="gemm")


@pytest.mark.parametrize("block_b", [1, 2, 4, 8, 16])
def test_gemv_autotuning_keeps_tiles_that_fit_each_batch(block_b):
    gemv = importlib.import_module("lightning_fisher.sparse.kernels.nm_linear_gemv")
    kept = gemv._fits_registers(gemv._configs(), {}, BLOCK_B=block_b)
    assert len(kept) >= 3 and all(block_b * c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_C"] <= 8192 for c in kept)


def test_linear_takes_strided_input(make_nm, device):
    weight = make_nm((16, 32), 2, 4)
    packed = compress(weight, 2, 4)
    x = torch.randn(32, 9).T  # (9, 32), column-major
    y = nm_linear(x.to(device), packed.values.to(device), packed.codes.to(device), 2, 4)
    _expect(y, x.double() @ weight.double().T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 3)])
def test_linear_grad_input_equals_dense_product(make_nm, device, dtype, n, m):
    weight = make_nm((13, 24), n, m, seed=4)
    packed = compress(weight, n, m)
    grad_output = torch.randn(7, 13, generator=torch.Generator().manual_seed(5))
    grad_x = nm_linear_grad_input(grad_output.to(device, dtype), packed.values.to(device, dtype),
                                  packed.codes.to(device), n, m)
    assert grad_x.dtype == dtype and grad_x.shape == (7, 24)
    _expect(grad_x, grad_output.double() @ weight.double())


# ResNet18's convolutions, channels scaled down: 3×3 s1 p1, 3×3 s2 p1, 1×1 s2 p0 (plus odd sizes)
CONVS = [
    pytest.param(8, 8, 3, 1, 1, 1, 8, id="3x3s1p1"),
    pytest.param(8, 16, 3, 2, 1, 1, 8, id="3x3s2p1"),
    pytest.param(8, 16, 1, 2, 0, 1, 8, id="1x1s2p0"),
    pytest.param(12, 5, 3, 1, 1, 2, 7, id="odd-dilated"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cin,cout,kernel,stride,padding,dilation,size", CONVS)
def test_conv2d_equals_f_conv2d(make_nm, device, dtype, cin, cout, kernel, stride, padding, dilation, size):
    weight = make_nm((cout, cin, kernel, kernel), 2, 4, seed=6)
    packed = compress(weight, 2, 4)
    x = torch.randn(2, cin, size, size, generator=torch.Generator().manual_seed(7))
    bias = torch.randn(cout, generator=torch.Generator().manual_seed(8))
    reference = F.conv2d(x.double(), weight.double(), bias.double(), stride, padding, dilation)
    y = nm_conv2d(x.to(device, dtype), packed.values.to(device, dtype), packed.codes.to(device), 2, 4, kernel,
                  stride, padding, dilation, bias.to(device, dtype))
    assert y.shape == reference.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    _expect(y, reference)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cin,cout,kernel,stride,padding,dilation,size", CONVS)
def test_conv2d_grad_input_equals_torch(make_nm, device, dtype, cin, cout, kernel, stride, padding, dilation, size):
    weight = make_nm((cout, cin, kernel, kernel), 2, 4, seed=9)
    packed = compress(weight, 2, 4)
    x_shape = (2, cin, size, size)
    out = F.conv2d(torch.zeros(x_shape, dtype=torch.float64), weight.double(), None, stride, padding, dilation)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(10))
    reference = torch.nn.grad.conv2d_input(x_shape, weight.double(), grad_output.double(), stride, padding, dilation)
    grad_x = nm_conv2d_grad_input(grad_output.to(device, dtype), packed.values.to(device, dtype),
                                  packed.codes.to(device), 2, 4, x_shape, kernel, stride, padding, dilation)
    assert grad_x.shape == x_shape and grad_x.dtype == dtype
    _expect(grad_x, reference)


def test_conv2d_gather_path(make_nm, device):
    weight = make_nm((5, 6, 3, 3), 1, 3, seed=11)
    packed = compress(weight, 1, 3)
    x = torch.randn(1, 6, 5, 5)
    y = nm_conv2d(x.to(device), packed.values.to(device), packed.codes.to(device), 1, 3, 3, 1, 1)
    _expect(y, F.conv2d(x.double(), weight.double(), None, 1, 1))


def test_references_equal_dense_torch(make_nm):
    weight = make_nm((6, 8, 3, 3), 2, 4)
    packed = compress(weight, 2, 4)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(nm_conv2d_reference(x, packed.values, packed.codes, 2, 4, 3, 2, 1),
                       F.conv2d(x, weight, None, 2, 1))
    grad = torch.randn(2, 6, 3, 3)
    assert torch.equal(nm_conv2d_grad_input_reference(grad, packed.values, packed.codes, 2, 4, x.shape, 3, 2, 1),
                       torch.nn.grad.conv2d_input(x.shape, weight, grad, 2, 1))
    linear = make_nm((5, 8), 2, 4)
    lp = compress(linear, 2, 4)
    xs = torch.randn(3, 8)
    assert torch.equal(nm_linear_reference(xs, lp.values, lp.codes, 2, 4), F.linear(xs, linear))
    assert torch.equal(nm_linear_grad_input_reference(torch.ones(3, 5), lp.values, lp.codes, 2, 4),
                       torch.ones(3, 5) @ linear)


def test_launcher_errors(make_nm, device):
    packed = compress(make_nm((8, 16), 2, 4), 2, 4)
    values, codes = packed.values.to(device), packed.codes.to(device)
    with pytest.raises(ValueError, match=r"x.shape=\(3, 12\): must be \(B, 16\)"):
        nm_linear(torch.randn(3, 12, device=device), values, codes, 2, 4)
    with pytest.raises(ValueError, match="x.dtype=torch.float16, values.dtype=torch.float32: must match"):
        nm_linear(torch.randn(3, 16, device=device, dtype=torch.float16), values, codes, 2, 4)
    with pytest.raises(ValueError, match="x.dtype=torch.float64"):
        nm_linear(torch.randn(3, 16, device=device, dtype=torch.float64), values.double(), codes, 2, 4)
    with pytest.raises(ValueError, match="codes: dtype torch.int64"):
        nm_linear(torch.randn(3, 16, device=device), values, codes.long(), 2, 4)
    with pytest.raises(ValueError, match=r"bias: shape \(7,\)"):
        nm_linear(torch.randn(3, 16, device=device), values, codes, 2, 4, torch.zeros(7, device=device))
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_linear(torch.randn(3, 16, device=device), values, codes, 4, 4)
    conv = compress(make_nm((8, 8, 3, 3), 2, 4), 2, 4)
    with pytest.raises(ValueError, match="needs C % m == 0"):
        nm_conv2d(torch.randn(1, 4, 5, 5, device=device), conv.values.to(device), conv.codes.to(device), 2, 4, 3)
    with pytest.raises(ValueError, match="stride"):
        nm_conv2d(torch.randn(1, 8, 5, 5, device=device), conv.values.to(device), conv.codes.to(device), 2, 4, 3,
                  stride=0)
    with pytest.raises(ValueError, match=r"grad_output.shape=\(1, 8, 5, 5\): must be \(1, 8, 3, 3\)"):
        nm_conv2d_grad_input(torch.randn(1, 8, 5, 5, device=device), conv.values.to(device), conv.codes.to(device),
                             2, 4, (1, 8, 5, 5), 3)


def test_interpreter_refuses_bfloat16(make_nm):
    from lightning_fisher.sparse.kernels import _triton

    if not _triton.INTERPRET:
        pytest.skip("only under the interpreter")
    packed = compress(make_nm((8, 16), 2, 4), 2, 4)
    with pytest.raises(ValueError, match="bfloat16: tl.dot is wrong in the Triton interpreter"):
        nm_linear(torch.randn(3, 16, dtype=torch.bfloat16), packed.values.bfloat16(), packed.codes, 2, 4)


def test_compiled_kernels_refuse_cpu_tensors_without_touching_a_driver():
    # A fresh interpreter without TRITON_INTERPRET: importing the kernels must not query a driver (there is
    # none on a CPU machine), and a launch on CPU tensors is a ValueError that says what to do.
    code = (
        "import os, torch\n"
        "os.environ.pop('TRITON_INTERPRET', None)\n"
        "from lightning_fisher.sparse import kernels\n"
        "from lightning_fisher.sparse.format import compress\n"
        "p = compress(torch.tensor([[1.0, 0, 2, 0]] * 16), 2, 4)\n"
        "try:\n"
        "    kernels.nm_linear(torch.ones(16, 4), p.values, p.codes, 2, 4)\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert "set TRITON_INTERPRET=1" in result.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("n,m", [(2, 4), (1, 3)])
def test_bfloat16_on_gpu(make_nm, n, m):
    weight = make_nm((96, 256 if 256 % m == 0 else 255), n, m, seed=12)
    packed = compress(weight, n, m)
    x = torch.randn(19, weight.shape[1])
    y = nm_linear(x.cuda().bfloat16(), packed.values.cuda().bfloat16(), packed.codes.cuda(), n, m)
    _expect(y, x.double() @ weight.double().T)
    conv = make_nm((32, 16, 3, 3), 2, 4, seed=13)
    cp = compress(conv, 2, 4)
    xc = torch.randn(4, 16, 9, 9)
    yc = nm_conv2d(xc.cuda().bfloat16(), cp.values.cuda().bfloat16(), cp.codes.cuda(), 2, 4, 3, 2, 1)
    _expect(yc, F.conv2d(xc.double(), conv.double(), None, 2, 1))


@pytest.mark.gpu
def test_auto_kernel_times_both_once_per_shape_on_gpu(make_nm):
    weight = make_nm((512, 1024), 2, 4, seed=15)
    packed = compress(weight, 2, 4)
    x = torch.randn(4, 1024)
    values, codes = packed.values.cuda().bfloat16(), packed.codes.cuda()
    y = nm_linear(x.cuda().bfloat16(), values, codes, 2, 4)
    _expect(y, x.double() @ weight.double().T)
    measured = importlib.import_module("lightning_fisher.sparse.kernels.nm_linear")._CHOSEN
    chosen = [v for key, v in measured.items() if key[:2] == (4, tuple(values.shape))]
    assert len(chosen) == 1 and chosen[0] in ("dot", "gemv")
    _expect(nm_linear_gemv(x.cuda().bfloat16(), values, codes, 2, 4), x.double() @ weight.double().T)


@pytest.mark.gpu
def test_autotuned_launch_on_gpu(make_nm):
    weight = make_nm((256, 512), 2, 4, seed=14)
    packed = compress(weight, 2, 4)
    x = torch.randn(64, 512)
    y = nm_linear(x.cuda().half(), packed.values.cuda().half(), packed.codes.cuda(), 2, 4, autotune=True)
    _expect(y, x.double() @ weight.double().T)
