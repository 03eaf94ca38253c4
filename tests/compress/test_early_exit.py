"""Early exits: the per-sample exit rule, the bit-operations it saves, and the EarlyExit callback."""

import copy
from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher.callbacks import EarlyExit
from lightning_fisher.compress.early_exit import EarlyExitModel, early_exit_loss
from lightning_fisher.compress.metrics import bit_operations, model_bits
from lightning_fisher.models.resnet import ResNet18
from lightning_fisher.module import ImageClassifier


def _backbone() -> ResNet18:
    torch.manual_seed(0)
    return ResNet18(10, width=4).eval()


def _inputs(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_threshold_zero_always_takes_the_first_exit():
    backbone = _backbone()
    model = EarlyExitModel(backbone, exits=("layer3", "layer2"), threshold=0.0).eval()
    assert model.exits == ["layer2", "layer3"]  # execution order
    x = _inputs()
    with torch.no_grad():
        logits = model(x)
        backbone(x)  # a direct call runs every head on the whole batch
    assert torch.equal(model.last_exit_index, torch.zeros(16, dtype=torch.long))
    assert torch.allclose(logits, model.exit_logits["layer2"])
    assert model.exit_fractions() == {"layer2": 1.0, "layer3": 0.0, "final": 0.0}


def test_threshold_above_one_never_exits():
    backbone = _backbone()
    dense = copy.deepcopy(backbone)
    model = EarlyExitModel(backbone, threshold=1.01).eval()
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(model(x), dense(x))
    assert model.last_exit_index.eq(2).all()


def test_confident_samples_leave_and_later_layers_run_on_the_rest():
    backbone = _backbone()
    model = EarlyExitModel(backbone, threshold=0.0).eval()
    x = _inputs()
    with torch.no_grad():
        backbone(x)
        confidence = torch.softmax(model.exit_logits["layer2"], -1).amax(-1)
    model.threshold = float(confidence.median())  # about half the samples exit at layer2
    with torch.no_grad():
        logits = model(x)
    early = model.last_exit_index == 0
    assert 0 < int(early.sum()) < 16
    assert torch.equal(early, confidence >= model.threshold)
    assert torch.allclose(logits[early], model.heads["layer2"](backbone.layer2(backbone.layer1(
        backbone.relu(backbone.bn1(backbone.conv1(x[early])))))), atol=1e-6)
    # fewer samples run layer3/layer4: the average cost lies between always- and never-exiting
    always = bit_operations(EarlyExitModel(copy.deepcopy(backbone), threshold=0.0), x)
    never = bit_operations(EarlyExitModel(copy.deepcopy(backbone), threshold=2.0), x)
    mixed = bit_operations(model, x)
    assert always < mixed < never
    assert bit_operations(_backbone(), x) < never  # the heads cost something when nobody exits


def test_heads_are_part_of_the_backbone_and_counted_in_its_size():
    backbone = _backbone()
    size = model_bits(backbone)
    model = EarlyExitModel(backbone, exits=("layer2",))
    head = model.heads["layer2"][-1]
    assert head.in_features == 8 and head.out_features == 10  # width 4: layer2 has 8 channels
    assert model_bits(backbone) == size + (8 * 10 + 10) * 32
    assert any(k.startswith("exit_heads.layer2") for k in backbone.state_dict())
    again = EarlyExitModel(backbone, exits=("layer2",))  # reuses the existing head
    assert again.heads["layer2"] is model.heads["layer2"]


def test_training_loss_sums_the_heads():
    model = EarlyExitModel(_backbone(), threshold=0.5).train()
    targets = torch.randint(0, 10, (16,))
    model(_inputs())
    loss = early_exit_loss(model.exit_logits, targets, loss_weight=0.3)
    expected = 0.3 * sum(nn.functional.cross_entropy(v, targets) for v in model.exit_logits.values())
    assert torch.allclose(loss, expected)
    loss.backward()
    assert model.heads["layer2"][-1].weight.grad is not None


def test_callback_trains_heads_and_reports_exits(tmp_path):
    torch.manual_seed(0)
    module = ImageClassifier(ResNet18(10, width=4), num_classes=10, optimizer=partial(torch.optim.Adam, lr=1e-2))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g))
    callback = EarlyExit(exits=("layer2", "layer3"), threshold=0.2, loss_weight=0.3)
    trainer = L.Trainer(callbacks=[callback], max_epochs=2, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, num_sanity_val_steps=0)
    heads_before = None

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal heads_before
            heads_before = pl_module.net.exit_heads.layer2[-1].weight.detach().clone()

    trainer.callbacks.append(Snapshot())
    trainer.fit(module, DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
    metrics = trainer.callback_metrics
    assert "train/early_exit" in metrics and "early_exit/bit_ops" in metrics
    fractions = [float(metrics[f"early_exit/fraction/{k}"]) for k in ("layer2", "layer3", "final")]
    assert sum(fractions) == pytest.approx(1.0)
    assert 0 < float(metrics["early_exit/bit_ops"]) < bit_operations(ResNet18(10, width=4), data.tensors[0])
    assert not torch.equal(heads_before, module.net.exit_heads.layer2[-1].weight)  # the heads trained
    assert "net.exit_heads.layer3.2.weight" in module.state_dict()
    assert module.loss_terms == {}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": -0.1}, "threshold=-0.1"),
        ({"loss_weight": -1.0}, "loss_weight=-1.0"),
        ({"exits": "layer2"}, "exits='layer2'"),
        ({"exits": ()}, "exits=()"),
    ],
)
def test_bad_callback_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyExit(**kwargs)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="not submodules"):
        EarlyExitModel(_backbone(), exits=("layer9",))
    with pytest.raises(ValueError, match="lies inside"):
        EarlyExitModel(_backbone(), exits=("layer2", "layer2.0"))
    with pytest.raises(ValueError, match="num_classes=None"):
        EarlyExitModel(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1)), exits=("0",))
