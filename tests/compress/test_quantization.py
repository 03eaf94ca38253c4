"""Fake quantization, conversion to integer weights, and the QuantizationAware callback."""

import copy
from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher.callbacks import FisherPruning, QuantizationAware
from lightning_fisher.compress.metrics import model_bits
from lightning_fisher.compress.quantization import (
    FakeQuantConv2d,
    FakeQuantLinear,
    QuantizedConv2d,
    QuantizedLinear,
    convert,
    fake_quantize_weight,
    prepare_qat_,
    quantize_weight,
)
from lightning_fisher.models.resnet import ResNet18
from lightning_fisher.module import ImageClassifier


def _loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)), batch_size=16)


def _trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    kwargs = {"max_epochs": 1, "enable_checkpointing": False, **kwargs}
    return L.Trainer(callbacks=callbacks, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, **kwargs)


def _qat_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = ResNet18(10, width=4)
    prepare_qat_(model)
    model.train()
    model(torch.randn(16, 3, 8, 8))  # observe activation ranges
    return model.eval()


def test_weight_quantization_is_per_channel_symmetric_and_keeps_zeros():
    weight = torch.randn(6, 5)
    weight[weight.abs() < 0.5] = 0.0
    q, scale = quantize_weight(weight, 8)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert q.abs().amax(dim=1).eq(127).all()  # each channel's largest weight maps to the grid's end
    assert torch.equal(q == 0, weight == 0)
    assert (q.float() * scale[:, None] - weight).abs().max() <= scale.max() / 2 + 1e-7


def test_straight_through_gradient():
    weight = torch.randn(4, 3, requires_grad=True)
    fake_quantize_weight(weight, 4).sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))


def test_prepare_keeps_parameters_and_converted_outputs_match_fake_quant():
    torch.manual_seed(0)
    model = ResNet18(10, width=4)
    before = {id(p) for p in model.parameters()}
    swapped = prepare_qat_(model, exclude=["fc"])
    assert len(swapped) == 20 and "fc" not in swapped and type(model.fc) is nn.Linear
    assert isinstance(model.conv1, FakeQuantConv2d)
    assert {id(p) for p in model.parameters()} == before  # no new optimizer parameters
    model.train()
    model(torch.randn(16, 3, 8, 8))
    model.eval()
    converted = convert(model)
    assert isinstance(converted.conv1, QuantizedConv2d) and converted.conv1.weight.dtype == torch.int8
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        diff = (converted(x) - model(x)).abs().max().item()
    assert diff <= 1e-5  # measured 0.0 (same products; only float summation order could differ)
    # the fake-quant model is counted as if stored converted; only its 1-bit "observed" flags differ
    assert model_bits(model) - model_bits(converted) == len(swapped)


def test_quantized_model_is_about_four_times_smaller():
    torch.manual_seed(0)
    dense = ResNet18(10, width=4)
    fake = copy.deepcopy(dense)
    prepare_qat_(fake)
    fake.train()
    fake(torch.randn(4, 3, 8, 8))
    ratio = model_bits(dense) / model_bits(convert(fake))
    assert 3.3 < ratio < 4.0  # measured 3.60 at width 4: BatchNorm and scales stay fp32


def test_converted_linear_matches_and_pruned_zeros_stay_zero():
    layer = nn.Linear(8, 4)
    with torch.no_grad():
        layer.weight[:, ::2] = 0.0
    fake = FakeQuantLinear.from_float(layer)
    fake(torch.randn(10, 8))
    converted = convert(nn.Sequential(fake))[0]
    assert isinstance(converted, QuantizedLinear)
    assert torch.equal(converted.weight == 0, layer.weight == 0)
    x = torch.randn(5, 8)
    assert torch.allclose(converted(x), fake.eval()(x), atol=1e-6)  # measured 0.0


def test_convert_needs_fake_quant_layers_with_observed_ranges():
    with pytest.raises(ValueError, match="no fake-quant layers"):
        convert(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(RuntimeError, match="no activation range"):
        convert(nn.Sequential(FakeQuantLinear.from_float(nn.Linear(2, 2))))


def test_callback_trains_with_fake_quant_and_keeps_pruning_masks(tmp_path):
    torch.manual_seed(0)
    module = ImageClassifier(ResNet18(10, width=4), num_classes=10, optimizer=partial(torch.optim.Adam, lr=1e-2))
    pruning = FisherPruning(target_sparsity=0.5, criterion="magnitude", schedule="one_shot", start_epoch=0, verbose=False)
    qat = QuantizationAware(weight_bits=8, activation_bits=8)
    before = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    _trainer(tmp_path, [pruning, qat], max_epochs=2).fit(module, _loader())
    net = module.net
    assert qat.prepared and len(qat.layers) == 21
    assert isinstance(net.layer1[0].conv1, FakeQuantConv2d) and isinstance(net.fc, FakeQuantLinear)
    assert bool(net.layer1[0].conv1.observed)
    assert not torch.equal(before["layer1.0.conv1.weight"], net.layer1[0].conv1.weight)  # it trained
    converted = convert(net.eval())
    for fqn, mask in pruning.masks.items():
        layer_name = fqn.removeprefix("net.").removesuffix(".weight")
        q = converted.get_submodule(layer_name).weight
        assert q.dtype == torch.int8 and not q[~mask].any(), fqn
    assert sum(int((~m).sum()) for m in pruning.masks.values()) > 0


def test_callback_start_epoch_swaps_later(tmp_path):
    module = ImageClassifier(ResNet18(10, width=4), num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.01))
    qat = QuantizationAware(start_epoch=1)
    _trainer(tmp_path, [qat], max_epochs=1).fit(module, _loader())
    assert not qat.prepared and type(module.net.conv1) is nn.Conv2d
    _trainer(tmp_path, [qat], max_epochs=2).fit(module, _loader())
    assert qat.prepared and isinstance(module.net.conv1, FakeQuantConv2d)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_bits": 1}, "weight_bits=1"),
        ({"activation_bits": 17}, "activation_bits=17"),
        ({"start_epoch": -1}, "start_epoch=-1"),
        ({"momentum": 0.0}, "momentum=0.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizationAware(**kwargs)


def test_exclude_must_be_a_list():
    with pytest.raises(TypeError, match="exclude='fc'"):
        QuantizationAware(exclude="fc")


def test_callback_resumes_into_the_fake_quant_model(tmp_path):
    torch.manual_seed(0)
    module = ImageClassifier(ResNet18(10, width=4), num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.01))
    trainer = _trainer(tmp_path, [QuantizationAware(start_epoch=1)], max_epochs=2, enable_checkpointing=True)
    trainer.fit(module, _loader())
    ckpt = trainer.checkpoint_callback.best_model_path
    saved_range = module.net.conv1.act_range.clone()
    resumed = ImageClassifier(ResNet18(10, width=4), num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.01))
    callback = QuantizationAware(start_epoch=1)

    class Check(L.Callback):
        def on_train_start(self, trainer, pl_module):
            assert torch.equal(pl_module.net.conv1.act_range, saved_range)  # loaded, not re-observed

    _trainer(tmp_path, [callback, Check()], max_epochs=3, enable_checkpointing=True).fit(resumed, _loader(), ckpt_path=ckpt)
    assert callback.prepared and isinstance(resumed.net.conv1, FakeQuantConv2d)
