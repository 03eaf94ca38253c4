"""The compression pipeline on digits with a tiny ResNet18 and 1-epoch phases (fake stages where noted)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_fisher.callbacks import FisherPruning
from lightning_fisher.compress.pipeline import STAGES, MaskKeeper, narrow_student, run_pipeline
from lightning_fisher.data import DigitsDataModule
from lightning_fisher.models import ResNet18
from lightning_fisher.module import ImageClassifier

WIDTH = 4
PRUNE = {"target_sparsity": 0.5, "criterion": "magnitude", "schedule": "one_shot", "start_epoch": 0, "verbose": False}


class FakeQuant(Callback):
    """Declares 8-bit weights and activations on every Conv2d/Linear (what the metrics read), nothing else."""

    def __init__(self, weight_bits: int = 8) -> None:
        self.weight_bits = weight_bits

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for module in pl_module.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight_bits = module.activation_bits = self.weight_bits


class FakeDistill(Callback):
    """Records the teacher it was given."""

    teachers: list[nn.Module] = []

    def __init__(self, teacher: nn.Module, temperature: float = 4.0) -> None:
        FakeDistill.teachers.append(teacher)


def _trainer(tmp_path: Path, phase: str, epochs: int, callbacks: list[Callback]) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=3,
        limit_val_batches=1,
        default_root_dir=tmp_path / phase,
    )


@pytest.fixture
def data() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32, max_per_class=10, eval_batch_size=128)


def _module(width: int = WIDTH) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(ResNet18(num_classes=10, width=width, in_channels=1), num_classes=10,
                           optimizer=partial(torch.optim.Adam, lr=3e-3))


def test_prune_then_quantize_keeps_masks_exact_and_writes_the_record(tmp_path, data):
    result = run_pipeline(
        _module(), data, ["prune", "quantize"], partial(_trainer, tmp_path), settings={"prune": PRUNE},
        base_epochs=1, stage_epochs=1, output_dir=tmp_path, callback_classes={"quantize": FakeQuant},
    )
    assert [p.name for p in result.phases] == ["base", "1_prune", "2_quantize"]
    params = dict(result.module.named_parameters())
    # the quantize phase trained the weights with Adam after the prune: masks must still hold exactly
    keeper_masks = {n: p == 0 for n, p in params.items() if n.endswith("conv1.weight") and "layer" in n}
    assert keeper_masks and all(bool(m.any()) for m in keeper_masks.values())
    zeros = sum(int((p == 0).sum()) for n, p in params.items() if p.ndim == 4 and n != "net.conv1.weight")
    total = sum(p.numel() for n, p in params.items() if p.ndim == 4 and n != "net.conv1.weight")
    assert zeros / total == pytest.approx(0.5, abs=0.01)  # global 50% over the convs (stem and fc dense)
    record = json.loads((tmp_path / "compression.json").read_text())
    assert record["stages"] == ["prune", "quantize"]
    assert record["accuracy"] == result.accuracy and 0.0 <= result.accuracy <= 1.0
    # 8-bit declared weights (at most 4x) plus 50% sparsity: more than 4x smaller; bit-ops: 16x from the
    # bit widths alone, more from the zeros (measured 5.4x and 24.5x)
    assert record["report"]["compression_ratio"] > 4.0
    assert record["report"]["bit_op_reduction"] > 16.0
    assert record["dense_accuracy"] is not None and record["phases"][1]["name"] == "1_prune"


def test_mask_keeper_reapplies_after_training_and_drops_replaced_parameters():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    mask = torch.tensor([[True, False, True, False]] * 4)
    keeper = MaskKeeper({"0.weight": mask, "1.weight": torch.ones(2, 4, dtype=torch.bool)})
    net[1] = nn.Linear(4, 3)  # a later stage replaced this layer: its mask no longer fits
    keeper.on_train_start(None, net)  # type: ignore[arg-type]
    assert set(keeper.masks) == {"0.weight"}
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    keeper.on_train_batch_end(None, net, None, None, 0)  # type: ignore[arg-type]
    assert torch.equal(net[0].weight != 0, mask)
    assert keeper.sparsity() == 0.5


def test_distill_trains_a_narrower_student_of_the_current_model(tmp_path, data):
    FakeDistill.teachers.clear()
    base = _module()
    result = run_pipeline(
        base, data, ["distill"], partial(_trainer, tmp_path), base_epochs=1, stage_epochs=1,
        width_factor=0.5, callback_classes={"distill": FakeDistill},
    )
    (teacher,) = FakeDistill.teachers
    assert teacher is not base.net and torch.equal(teacher.conv1.weight, base.net.conv1.weight)
    assert result.module is not base and result.module.net.bn1.num_features == WIDTH // 2
    assert result.report.compression_ratio > 3.0  # half width: about 4x fewer parameters (measured 3.86x)


def test_base_checkpoint_is_the_dense_model(tmp_path, data):
    dense = _module()
    path = tmp_path / "dense.ckpt"
    torch.save({"state_dict": dense.state_dict()}, path)
    result = run_pipeline(
        _module(width=WIDTH), data, ["quantize"], partial(_trainer, tmp_path), base_ckpt=path,
        callback_classes={"quantize": FakeQuant},
    )
    from lightning_fisher.compress.pipeline import evaluate_accuracy

    assert result.dense_accuracy == evaluate_accuracy(dense.net, data)
    with pytest.raises(ValueError, match="does not fit the model"):
        run_pipeline(_module(width=8), data, ["quantize"], partial(_trainer, tmp_path), base_ckpt=path)


def test_narrow_student_and_bad_arguments(tmp_path, data):
    student = narrow_student(ResNet18(num_classes=7, width=8, in_channels=3), 0.25)
    assert (student.bn1.num_features, student.fc.out_features, student.conv1.in_channels) == (2, 7, 3)
    with pytest.raises(TypeError, match="narrows a ResNet18"):
        narrow_student(nn.Linear(2, 2), 0.5)
    make = partial(_trainer, tmp_path)
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['sparsify'\]"):
        run_pipeline(_module(), data, ["prune", "sparsify"], make)
    with pytest.raises(ValueError, match="stages='prune': must be a list"):
        run_pipeline(_module(), data, "prune", make)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="give one, not both"):
        run_pipeline(_module(), data, ["prune"], make, base_epochs=1, base_ckpt="x.ckpt")
    with pytest.raises(ValueError, match="stage_epochs=0 for 'prune'"):
        run_pipeline(_module(), data, ["prune"], make, stage_epochs=0)
    with pytest.raises(ValueError, match=r"no epochs for \['quantize'\]"):
        run_pipeline(_module(), data, ["prune", "quantize"], make, stage_epochs={"prune": 1})
    with pytest.raises(ValueError, match="width_factor=0: must be in"):
        run_pipeline(_module(), data, ["distill"], make, width_factor=0)
    with pytest.raises(ValueError, match=r"settings for \['pruning'\]"):
        run_pipeline(_module(), data, ["prune"], make, settings={"pruning": {}})
    assert STAGES == ("distill", "prune", "low_rank", "quantize", "early_exit")


def test_train_runs_the_pipeline_when_stages_are_set(compose_config, tmp_path):
    from lightning_fisher.train import train

    cfg = compose_config(
        "stages=[prune]", "+compress=default", "compress.base_epochs=1", "compress.stage_epochs=1",
        "compress.prune.start_epoch=0", "+compress.prune.criterion=magnitude", "optimizer=adam",
        "++data.max_per_class=10",
    )
    metrics, objects = train(cfg)
    record = json.loads((tmp_path / "run" / "compression.json").read_text())
    assert record["stages"] == ["prune"] and metrics["test/acc"] == record["accuracy"]
    assert metrics["compress/compression_ratio"] > 1.0 and "val/acc" in metrics
    assert (tmp_path / "run" / "checkpoints" / "1_prune" / "last.ckpt").is_file()
    assert any(isinstance(cb, FisherPruning) for cb in objects["trainer"].callbacks)


def test_train_rejects_stages_without_the_compress_group_or_with_pruning(compose_config):
    from lightning_fisher.train import train

    with pytest.raises(ValueError, match=r"needs the compress config group"):
        train(compose_config("stages=[prune]"))
    with pytest.raises(ValueError, match="pruning: set together with stages"):
        train(compose_config("stages=[prune]", "+compress=default", "pruning=fisher_pruning"))
    with pytest.raises(ValueError, match=r"init_ckpt='w.ckpt': set together with stages.*compress.base_ckpt"):
        train(compose_config("stages=[prune]", "+compress=default", "init_ckpt=w.ckpt"))
    with pytest.raises(ValueError, match=r"ckpt_path='last.ckpt': set together with stages.*compress.base_ckpt"):
        train(compose_config("stages=[prune]", "+compress=default", "ckpt_path=last.ckpt"))


def test_the_real_stages_in_one_chain(tmp_path, data):
    from lightning_fisher.compress import EarlyExitModel, FakeQuantConv2d

    result = run_pipeline(
        _module(), data, ["distill", "prune", "quantize", "early_exit"], partial(_trainer, tmp_path),
        settings={"prune": PRUNE, "early_exit": {"threshold": 0.5}}, base_epochs=1, stage_epochs=1, output_dir=tmp_path,
    )
    assert isinstance(result.deployed, EarlyExitModel) and result.deployed.backbone is result.module.net
    net = result.module.net
    assert net.bn1.num_features == WIDTH // 2  # the distilled student
    assert isinstance(net.layer1[0].conv1, FakeQuantConv2d)
    # masks held through the quantize and early-exit phases: the layer convs are still 50% zeros
    convs = [m.weight for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"]
    assert sum(int((w == 0).sum()) for w in convs) / sum(w.numel() for w in convs) == pytest.approx(0.5, abs=0.01)
    record = json.loads((tmp_path / "compression.json").read_text())
    assert record["stages"] == ["distill", "prune", "quantize", "early_exit"]
    # half width (~4x), 50% sparse, 8 bits, exits: measured 16.7x smaller and 87x fewer bit-operations
    assert record["report"]["compression_ratio"] > 10 and record["report"]["bit_op_reduction"] > 30


@pytest.mark.parametrize("stages", [["low_rank", "quantize"], ["quantize", "low_rank"]])
def test_low_rank_and_quantize_in_either_order(tmp_path, data, stages):
    from lightning_fisher.compress import FakeQuantConv2d, LowRankConv2d

    result = run_pipeline(
        _module(), data, stages, partial(_trainer, tmp_path), settings={"low_rank": {"energy": 0.5}},
        base_epochs=1, stage_epochs=1, output_dir=tmp_path,
    )
    modules = list(result.module.net.modules())
    quantized = [m for m in modules if isinstance(m, FakeQuantConv2d)]
    factored = [m for m in modules if isinstance(m, LowRankConv2d)]
    assert quantized, "quantization must survive whichever stage comes second"
    if stages[0] == "low_rank":
        assert factored  # factored first, then its factors are quantized
    else:
        # LowRank only factors plain nn.Conv2d/nn.Linear: already-quantized layers stay as they are, and say so
        assert not factored
        from lightning_fisher.compress import factorize

        report = factorize(result.module.net, energy=0.5)
        assert not report.layers and any("FakeQuantConv2d is a subclass" in why for why in report.skipped.values())
    record = json.loads((tmp_path / "compression.json").read_text())
    assert record["stages"] == stages and record["report"]["compression_ratio"] > 1.0
