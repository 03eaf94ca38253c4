"""Weights-only warm starts: ``load_weights`` and ``init_ckpt=`` in the training entry point."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fisher.models import ResNet18
from lightning_fisher.module import ImageClassifier
from lightning_fisher.train import train
from lightning_fisher.weights import load_weights


def _module(width: int = 4, seed: int = 0) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier(ResNet18(num_classes=10, width=width), num_classes=10)


def _equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("layout", ["lightning", "module", "net"])
def test_loads_every_layout(tmp_path, layout):
    source, target = _module(seed=1), _module(seed=2)
    assert not _equal(source, target)
    state = {
        "lightning": {"state_dict": source.state_dict(), "epoch": 7, "optimizer_states": []},
        "module": source.state_dict(),
        "net": source.net.state_dict(),
    }[layout]
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    load_weights(target, path)
    assert _equal(source, target)


def test_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="init_ckpt=.*missing.ckpt"):
        load_weights(_module(), tmp_path / "missing.ckpt")
    wide = tmp_path / "wide.ckpt"
    torch.save({"state_dict": _module(width=8).state_dict()}, wide)
    with pytest.raises(ValueError, match=r"(?s)init_ckpt=.*wide.ckpt.*does not fit the model ImageClassifier.*size mismatch"):
        load_weights(_module(width=4), wide)
    partial = tmp_path / "partial.pt"
    state = _module().state_dict()
    del state["net.fc.bias"]
    torch.save(state, partial)
    with pytest.raises(ValueError, match="(?s)Missing key.*net.fc.bias"):
        load_weights(_module(), partial)
    junk = tmp_path / "junk.pt"
    torch.save([1, 2, 3], junk)
    with pytest.raises(ValueError, match="neither a Lightning checkpoint nor a state_dict"):
        load_weights(_module(), junk, what="base_ckpt")
    text = tmp_path / "text.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_weights(_module(), text)


def test_init_ckpt_starts_a_new_run_from_the_weights(compose_config, tmp_path):
    # A dense run of one epoch leaves last.ckpt (epoch 1 done).
    metrics, objects = train(compose_config())
    dense = objects["model"]
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()

    # Zero epochs from it: the model tested is the checkpoint's, bit for bit.
    cfg = compose_config("trainer.max_epochs=0", f"init_ckpt={checkpoint}")
    metrics0, objects0 = train(cfg)
    assert _equal(objects0["model"], dense)
    assert metrics0["test/acc"] == metrics["test/acc"]

    # One epoch from it trains one epoch (a ckpt_path resume of the same file would train none: its
    # epoch 1 is done) with a fresh optimizer.
    _, objects1 = train(compose_config(f"init_ckpt={checkpoint}"))
    assert objects1["trainer"].current_epoch == 1
    assert objects1["trainer"].global_step == 2  # limit_train_batches=2
    assert not _equal(objects1["model"], dense)

    with pytest.raises(ValueError, match="does not fit the model"):
        train(compose_config("model.width=8", f"init_ckpt={checkpoint}"))
