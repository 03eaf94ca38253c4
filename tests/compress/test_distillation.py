"""Knowledge distillation: the loss, teacher loading, and the KnowledgeDistillation callback."""

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher.callbacks import KnowledgeDistillation
from lightning_fisher.compress.distillation import distillation_loss, load_teacher, soft_kl
from lightning_fisher.models.resnet import ResNet18
from lightning_fisher.module import ImageClassifier


def _data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _teacher() -> nn.Module:
    torch.manual_seed(1)
    teacher = ResNet18(10, width=4)
    with torch.no_grad():
        teacher.fc.weight.mul_(20.0)  # confident, far-from-uniform targets the student must learn
    return teacher.eval()


def test_loss_limits():
    torch.manual_seed(0)
    student, teacher, targets = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    assert torch.allclose(distillation_loss(student, teacher, targets, alpha=0.0), F.cross_entropy(student, targets))
    soft = distillation_loss(student, teacher, targets, temperature=3.0, alpha=1.0)
    expected = 9.0 * F.kl_div(F.log_softmax(student / 3, -1), F.softmax(teacher / 3, -1), reduction="batchmean")
    assert torch.allclose(soft, expected)
    assert distillation_loss(teacher, teacher, targets, alpha=1.0).abs() < 1e-6


def test_teacher_gets_no_gradient():
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    distillation_loss(student, teacher, torch.tensor([0, 1, 2, 0])).backward()
    assert student.grad is not None and teacher.grad is None


def test_load_teacher_from_files(tmp_path):
    teacher = _teacher()
    torch.save(teacher, tmp_path / "teacher.pt")
    torch.save({"state_dict": {f"net.{k}": v for k, v in teacher.state_dict().items()}}, tmp_path / "ckpt.pt")
    loaded = load_teacher(tmp_path / "teacher.pt")
    from_ckpt = load_teacher(str(tmp_path / "ckpt.pt"), teacher_net=ResNet18(10, width=4))
    x = _data(4)[0]
    for model in (loaded, from_ckpt):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert torch.allclose(model(x), teacher(x))
    with pytest.raises(ValueError, match="teacher_net"):
        load_teacher(tmp_path / "ckpt.pt")


def _fit_student(tmp_path, callbacks, x, y) -> tuple[ImageClassifier, L.Trainer]:
    torch.manual_seed(0)
    module = ImageClassifier(ResNet18(10, width=4), num_classes=10, optimizer=partial(torch.optim.Adam, lr=1e-2))
    trainer = L.Trainer(callbacks=callbacks, max_epochs=6, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    return module, trainer


def _kl(module: ImageClassifier, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return soft_kl(module.net.eval()(x), teacher(x), 4.0).item()


def test_callback_moves_the_student_toward_the_teacher(tmp_path):
    teacher = _teacher()
    x, y = _data()
    torch.manual_seed(0)
    kl_start = _kl(ImageClassifier(ResNet18(10, width=4), num_classes=10), teacher, x)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    callback = KnowledgeDistillation(teacher, temperature=4.0, alpha=0.9)
    module, trainer = _fit_student(tmp_path, [callback], x, y)
    kl_distilled = _kl(module, teacher, x)
    kl_plain = _kl(_fit_student(tmp_path, [], x, y)[0], teacher, x)
    assert kl_distilled < 0.7 * kl_start  # measured 0.231 -> 0.125
    assert kl_distilled < 0.7 * kl_plain  # measured 0.125 vs 0.277 when training on the labels alone
    assert {"train/distillation", "distillation/kl", "train/task_loss"} <= set(trainer.callback_metrics)
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())  # frozen
    assert not any("teacher" in k for k in module.state_dict())
    assert module.loss_terms == {}  # removed at teardown


def test_total_loss_is_the_hinton_mix(tmp_path):
    teacher = _teacher()
    module = ImageClassifier(ResNet18(10, width=4), num_classes=10)
    callback = KnowledgeDistillation(teacher, temperature=2.0, alpha=0.7)
    term = callback._make_term(module)
    callback.teacher = teacher
    x, y = _data(8)
    logits = module.net(x)
    total = module.loss(logits, y) + term(x, logits, y)
    assert torch.allclose(total, distillation_loss(logits, teacher(x), y, temperature=2.0, alpha=0.7), atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": 0.0}, ValueError, "temperature=0.0"),
        ({"alpha": 1.5}, ValueError, "alpha=1.5"),
        ({"teacher": "/no/such/teacher.ckpt"}, ValueError, "no such file"),
        ({"teacher": 3}, TypeError, "teacher=3"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        KnowledgeDistillation(**{"teacher": nn.Linear(2, 2), **kwargs})


def test_loss_term_hook_adds_logs_and_removes():
    module = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)), num_classes=10)
    handle = module.add_loss_term("extra", lambda inputs, logits, targets: logits.sum() * 0 + 2.0)
    with pytest.raises(ValueError, match="already added"):
        module.add_loss_term("extra", lambda *args: torch.tensor(0.0))
    with pytest.raises(ValueError, match="name='a/b'"):
        module.add_loss_term("a/b", lambda *args: torch.tensor(0.0))
    with pytest.raises(TypeError, match="fn=3"):
        module.add_loss_term("other", 3)
    x, y = _data(4)
    module.log = lambda *args, **kwargs: None  # no trainer attached
    plain = module.loss(module(x), y)
    assert torch.allclose(module.training_step((x, y), 0), plain + 2.0)
    handle.remove()
    assert module.loss_terms == {}
    assert torch.allclose(module.training_step((x, y), 0), plain)
