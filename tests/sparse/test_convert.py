import copy

import pytest
import torch
from torch import nn

from lightning_fisher.sparse import NMSparseConv2d, NMSparseLinear, fqn_filter, sparsify_, to_dense, to_sparse
from lightning_fisher.sparse.format import nm_violation

RESNET_LAYERS = 21  # stem + 16 block convs + 3 downsample convs + fc


def _bits(state: dict) -> dict:
    return {k: v.view(torch.int32) if v.dtype == torch.float32 else v for k, v in state.items()}


def test_report_names_every_layer_and_why(resnet_2_4):
    report = sparsify_(copy.deepcopy(resnet_2_4), "2:4")
    assert report.dense == {"conv1": "in_channels=3 is not a multiple of M=4"}
    assert len(report.sparse) == RESNET_LAYERS - 1
    assert set(report.sparse.values()) == {"triton"}  # auto without a GPU
    assert "layer2.0.downsample.0" in report.sparse and "fc" in report.sparse
    assert report.summary().startswith("to_sparse 2:4: 20 layers sparse (triton 20), 1 dense: conv1: in_channels=3")


def test_to_sparse_logs_one_line(resnet_2_4, caplog):
    with caplog.at_level("INFO", logger="lightning_fisher.sparse.convert"):
        to_sparse(resnet_2_4)
    lines = [r for r in caplog.records if r.name == "lightning_fisher.sparse.convert"]
    assert len(lines) == 1 and "20 layers sparse" in lines[0].getMessage()


def test_round_trip_of_resnet18_is_bit_exact(resnet_2_4):
    original = {k: v.clone() for k, v in resnet_2_4.state_dict().items()}
    sparse = to_sparse(resnet_2_4, pattern="2:4")
    assert sum(isinstance(m, (NMSparseConv2d, NMSparseLinear)) for m in sparse.modules()) == RESNET_LAYERS - 1
    assert type(resnet_2_4.layer1[0].conv1) is nn.Conv2d  # a copy was converted
    dense = to_dense(sparse)
    assert not any(isinstance(m, (NMSparseConv2d, NMSparseLinear)) for m in dense.modules())
    restored = dense.state_dict()
    assert list(restored) == list(original)
    for key, value in _bits(original).items():
        assert torch.equal(_bits(restored)[key], value), key
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(dense(x), resnet_2_4(x))


def test_sparse_resnet_fallback_equals_dense_exactly(resnet_2_4, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(to_sparse(resnet_2_4)(x), resnet_2_4(x))


def test_sparse_resnet_kernel_path_equals_dense(resnet_2_4, device):
    # largest difference measured under the interpreter: 3.6e-7 (logits up to 0.66)
    model = resnet_2_4.to(device)
    x = torch.randn(1, 3, 8, 8, device=device)
    with torch.no_grad():
        torch.testing.assert_close(to_sparse(model)(x), model(x), atol=1e-4, rtol=1e-4)


def test_sparse_resnet_fine_tunes_and_keeps_the_pattern(resnet_2_4, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sparse = to_sparse(resnet_2_4).train()
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(sparse(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    dense = to_dense(sparse)
    assert not torch.equal(dense.layer1[0].conv1.weight, resnet_2_4.layer1[0].conv1.weight)  # it did train
    for name, module in dense.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and name != "conv1":
            assert nm_violation(module.weight, 2, 4) is None, name


def test_layers_that_are_not_n_m_stay_dense(resnet_2_4):
    model = copy.deepcopy(resnet_2_4)
    with torch.no_grad():
        model.layer3[1].conv2.weight.fill_(1.0)
    report = sparsify_(model, "2:4")
    assert report.dense["layer3.1.conv2"].startswith("weight of shape (32, 32, 3, 3) is not 2:4: row 0, group 0")
    assert type(model.layer3[1].conv2) is nn.Conv2d


def test_filter_accepts_mask_keys(resnet_2_4):
    masks = {"layer1.0.conv1.weight": None, "fc.weight": None}
    model = copy.deepcopy(resnet_2_4)
    report = sparsify_(model, "2:4", filter_fn=fqn_filter(masks))
    assert set(report.sparse) == {"layer1.0.conv1", "fc"}
    assert report.dense["layer1.0.conv2"] == "excluded by filter_fn"
    assert isinstance(model.fc, NMSparseLinear) and type(model.layer1[0].conv2) is nn.Conv2d
    only_convs = sparsify_(copy.deepcopy(resnet_2_4), "2:4", filter_fn=lambda module, fqn: fqn.startswith("layer4"))
    assert set(only_convs.sparse) == {name for name in only_convs.sparse if name.startswith("layer4")}
    assert len(only_convs.sparse) == 5


def test_fqn_filter_ignores_compile_segments():
    accept = fqn_filter(["net._orig_mod.layer1.0.conv1.weight"])
    assert accept(nn.Identity(), "net.layer1.0.conv1")
    assert accept(nn.Identity(), "net._orig_mod.layer1.0.conv1")
    assert not accept(nn.Identity(), "net.layer1.0.conv2")


def test_inplace_and_already_sparse(resnet_2_4):
    model = copy.deepcopy(resnet_2_4)
    assert to_sparse(model, inplace=True) is model
    again = sparsify_(model, "2:4")
    assert again.sparse["fc"] == "triton (already)"
    assert to_dense(model, inplace=True) is model
    assert type(model.fc) is nn.Linear


def test_subclasses_and_shared_modules():
    shared = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        shared.weight.mul_(torch.tensor([1.0, 1, 0, 0] * 2))
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.MultiheadAttention(8, 2))
    with torch.no_grad():
        model[3].out_proj.weight.mul_(torch.tensor([1.0, 1, 0, 0] * 2))
    report = sparsify_(model, "2:4")
    assert isinstance(model[0], NMSparseLinear) and model[0] is model[2]
    assert report.dense == {"3.out_proj": "NonDynamicallyQuantizableLinear is a subclass, not swapped"}


def test_argument_errors(resnet_2_4):
    with pytest.raises(ValueError, match="pattern='2-4'"):
        to_sparse(resnet_2_4, pattern="2-4")
    with pytest.raises(ValueError, match="backend='fast'"):
        to_sparse(resnet_2_4, backend="fast")
    with pytest.raises(ValueError, match="supports pattern '2:4' only, got '1:4'"):
        to_sparse(resnet_2_4, pattern="1:4", backend="cusparselt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_cusparselt_on_cpu_is_an_error(resnet_2_4):
    with pytest.raises(ValueError, match="backend='cusparselt': runs on CUDA only; layer1.0.conv1 is on cpu"):
        sparsify_(resnet_2_4, backend="cusparselt")
    assert not any(isinstance(m, (NMSparseConv2d, NMSparseLinear)) for m in resnet_2_4.modules())


def test_other_patterns(make_nm):
    model = nn.Sequential(nn.Linear(24, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.copy_(make_nm((6, 24), 1, 3))
    report = sparsify_(model, "1:3")
    assert report.sparse == {"0": "triton"}
    assert report.dense == {"2": "weight of shape (3, 6) is not 1:3: row 0, group 0 (reduction columns 0..2) "
                                 "holds 3 non-zeros (at most 1)"}
