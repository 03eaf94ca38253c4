"""NMSparseLinear / NMSparseConv2d: conversion, forward and backward on both paths.

The kernel path runs the Triton kernels (interpreter on CPU); the fallback path (``TRITON_INTERPRET``
unset on a CPU tensor) is plain torch on the decompressed weight and must equal the dense layer
bit for bit. fp32 tolerance for the kernel path: 1e-4 (largest error measured on these layers: 9e-6, dX).
"""

import copy
import pickle

import pytest
import torch
from torch import nn

from lightning_fisher.sparse import NMSparseConv2d, NMSparseLinear, gather_kept, kernels_available
from lightning_fisher.sparse.format import nm_violation, to_reduction_matrix

TOL = {"atol": 1e-4, "rtol": 1e-4}


def _linear(make_nm, n=2, m=4, bias=True, shape=(13, 24)) -> nn.Linear:
    layer = nn.Linear(shape[1], shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(make_nm(shape, n, m, seed=21))
    return layer


def _conv(make_nm, cin=8, cout=16, kernel=3, stride=2, padding=1, bias=False) -> nn.Conv2d:
    layer = nn.Conv2d(cin, cout, kernel, stride, padding, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(make_nm((cout, cin, kernel, kernel), 2, 4, seed=22))
    return layer


@pytest.fixture(params=["kernels", "fallback"])
def path(request, monkeypatch, device):
    """Run a test on the kernel path and on the torch fallback."""
    if request.param == "fallback":
        if device.type == "cuda":
            pytest.skip("the fallback is the CPU path")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param


def test_linear_round_trip_is_exact(make_nm):
    dense = _linear(make_nm)
    sparse = NMSparseLinear.from_dense(dense, 2, 4)
    assert sparse.values.shape == (13, 12) and sparse.codes.dtype == torch.uint8
    back = sparse.to_dense()
    assert type(back) is nn.Linear
    assert torch.equal(back.weight.view(torch.int32), dense.weight.view(torch.int32))
    assert torch.equal(back.bias, dense.bias)


def test_conv_round_trip_is_exact(make_nm):
    dense = _conv(make_nm, bias=True)
    sparse = NMSparseConv2d.from_dense(dense, 2, 4)
    back = sparse.to_dense()
    assert type(back) is nn.Conv2d
    assert (back.kernel_size, back.stride, back.padding, back.dilation) == ((3, 3), (2, 2), (1, 1), (1, 1))
    assert torch.equal(back.weight.view(torch.int32), dense.weight.view(torch.int32))
    assert torch.equal(back.bias, dense.bias)


def test_state_dict_loads_into_a_fresh_module(make_nm):
    sparse = NMSparseConv2d.from_dense(_conv(make_nm), 2, 4)
    fresh = NMSparseConv2d(8, 16, 3, stride=2, padding=1, n=2, m=4, bias=False)
    fresh.load_state_dict(sparse.state_dict())
    assert set(sparse.state_dict()) == {"values", "codes"}
    assert torch.equal(fresh.dense_weight(), sparse.dense_weight())


@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_and_gradients_equal_the_dense_layer(make_nm, device, path, bias):
    dense = _linear(make_nm, bias=bias).to(device)
    sparse = NMSparseLinear.from_dense(dense, 2, 4)
    x = torch.randn(2, 7, 24, device=device)  # leading dimensions are kept
    assert kernels_available(x) == (path == "kernels")
    upstream = torch.randn(2, 7, 13, device=device)

    x_dense = x.clone().requires_grad_()
    y_dense = dense(x_dense)
    (y_dense * upstream).sum().backward()
    x_sparse = x.clone().requires_grad_()
    y_sparse = sparse(x_sparse)
    (y_sparse * upstream).sum().backward()

    if path == "fallback":
        assert torch.equal(y_sparse, y_dense)
    torch.testing.assert_close(y_sparse, y_dense, **TOL)
    torch.testing.assert_close(x_sparse.grad, x_dense.grad, **TOL)
    torch.testing.assert_close(sparse.values.grad, gather_kept(dense.weight.grad, sparse.codes, 2, 4), **TOL)
    if bias:
        torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, **TOL)


@pytest.mark.parametrize("geometry", [(3, 1, 1), (3, 2, 1), (1, 2, 0)], ids=["3x3s1p1", "3x3s2p1", "1x1s2p0"])
def test_conv_forward_and_gradients_equal_the_dense_layer(make_nm, device, path, geometry):
    kernel, stride, padding = geometry
    dense = _conv(make_nm, kernel=kernel, stride=stride, padding=padding, bias=True).to(device)
    sparse = NMSparseConv2d.from_dense(dense, 2, 4)
    x = torch.randn(2, 8, 7, 7, device=device)
    upstream = torch.randn(dense(x).shape, device=device)

    x_dense = x.clone().requires_grad_()
    y_dense = dense(x_dense)
    (y_dense * upstream).sum().backward()
    x_sparse = x.clone().requires_grad_()
    y_sparse = sparse(x_sparse)
    (y_sparse * upstream).sum().backward()

    if path == "fallback":
        assert torch.equal(y_sparse, y_dense)
    torch.testing.assert_close(y_sparse, y_dense, **TOL)
    torch.testing.assert_close(x_sparse.grad, x_dense.grad, **TOL)
    grad_kept = gather_kept(to_reduction_matrix(dense.weight.grad), sparse.codes, 2, 4)
    torch.testing.assert_close(sparse.values.grad, grad_kept, **TOL)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, **TOL)


def test_fallback_equals_kernel_path(make_nm, device, monkeypatch):
    if device.type == "cuda":
        pytest.skip("the fallback is the CPU path")
    sparse = NMSparseConv2d.from_dense(_conv(make_nm, bias=True), 2, 4)
    x = torch.randn(2, 8, 6, 6)
    through_kernels = sparse(x)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not kernels_available(x)
    torch.testing.assert_close(sparse(x), through_kernels, **TOL)


def test_fine_tuning_keeps_the_pattern(make_nm, device):
    sparse = NMSparseLinear.from_dense(_linear(make_nm), 2, 4).to(device)
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        sparse(torch.randn(5, 24, device=device)).pow(2).mean().backward()
        optimizer.step()
    weight = sparse.dense_weight().detach()
    assert nm_violation(weight, 2, 4) is None
    assert int((weight != 0).sum()) == 13 * 12  # every kept slot moved off zero; nothing else did


def test_half_input_casts_the_weights(make_nm, device):
    dense = _linear(make_nm)
    sparse = NMSparseLinear.from_dense(dense, 2, 4).to(device)
    x = torch.randn(4, 24, device=device)
    y = sparse(x.half())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), dense.to(device)(x), atol=3e-2, rtol=1e-2)


def test_kernels_available_rules(monkeypatch, device):
    assert not kernels_available(torch.ones(2, device=device, dtype=torch.float64))
    if device.type == "cpu":
        assert kernels_available(torch.ones(2))
        assert not kernels_available(torch.ones(2, dtype=torch.bfloat16))  # wrong tl.dot in the interpreter
        monkeypatch.delenv("TRITON_INTERPRET")
        assert not kernels_available(torch.ones(2))


def test_copy_and_pickle(make_nm):
    sparse = NMSparseLinear.from_dense(_linear(make_nm), 2, 4)
    for clone in (copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse))):
        assert torch.equal(clone.dense_weight(), sparse.dense_weight())


def test_from_dense_errors(make_nm):
    not_nm = nn.Linear(8, 4)
    with pytest.raises(ValueError, match=r"not 2:4: row 0, group 0 \(reduction columns 0\.\.3\) holds 4"):
        NMSparseLinear.from_dense(not_nm, 2, 4)
    with pytest.raises(ValueError, match="size 6 is not a multiple of M=4"):
        NMSparseLinear.from_dense(nn.Linear(6, 4), 2, 4)
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        NMSparseLinear.from_dense(nn.Conv2d(4, 4, 1), 2, 4)
    with pytest.raises(ValueError, match="groups=2"):
        NMSparseConv2d.from_dense(nn.Conv2d(8, 8, 3, groups=2), 2, 4)
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        NMSparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), 2, 4)
    with pytest.raises(ValueError, match="padding='same'"):
        NMSparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding="same"), 2, 4)
    with pytest.raises(ValueError, match="backend='dense'"):
        NMSparseLinear.from_dense(_linear(make_nm), 2, 4, backend="dense")
    with pytest.raises(ValueError, match="supports 2:4 only, got 1:3"):
        NMSparseLinear.from_dense(_linear(make_nm, 1, 3), 1, 3, backend="cusparselt")
    with pytest.raises(ValueError, match="in_features=10: must be a multiple of m=4"):
        NMSparseLinear(10, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_cusparselt_needs_cuda(make_nm):
    with pytest.raises(ValueError, match="backend='cusparselt': needs a CUDA weight"):
        NMSparseLinear.from_dense(_linear(make_nm, shape=(32, 64)), 2, 4, backend="cusparselt")


def test_forward_shape_errors(make_nm):
    with pytest.raises(ValueError, match=r"last dimension must be 24"):
        NMSparseLinear.from_dense(_linear(make_nm), 2, 4)(torch.ones(3, 20))
    with pytest.raises(ValueError, match=r"must be \(B, 8, H, W\)"):
        NMSparseConv2d.from_dense(_conv(make_nm), 2, 4)(torch.ones(1, 4, 5, 5))


@pytest.mark.gpu
def test_cusparselt_backend_on_gpu(make_nm):
    dense = _linear(make_nm, shape=(64, 128)).cuda().half()
    sparse = NMSparseLinear.from_dense(dense, 2, 4, backend="cusparselt")
    x = torch.randn(32, 128, device="cuda", dtype=torch.float16, requires_grad=True)
    y = sparse(x)
    torch.testing.assert_close(y, dense(x), atol=3e-2, rtol=1e-2)
    y.sum().backward()
    assert sparse.values.grad is not None and x.grad is not None
    conv = _conv(make_nm, cin=16, cout=32).cuda().half()
    sparse_conv = NMSparseConv2d.from_dense(conv, 2, 4, backend="cusparselt")
    xc = torch.randn(4, 16, 8, 8, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(sparse_conv(xc), conv(xc), atol=3e-2, rtol=1e-2)
