"""Knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015).

The student matches the teacher's softened class probabilities ``softmax(z / T)``. The soft loss is the
KL divergence from the teacher's distribution to the student's, ``KL(p_teacher,T ‖ p_student,T)`` (the
cross-entropy with the teacher's soft targets minus the teacher's entropy, which has no gradient), and
is multiplied by ``T²`` so that its gradients keep the same scale as the hard loss when ``T`` changes
(section 2 of the paper).

:func:`distillation_loss` returns ``α·T²·KL + (1 − α)·CE(student, targets)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["check_distillation_args", "distillation_loss", "load_teacher", "soft_kl"]

log = logging.getLogger(__name__)


def check_distillation_args(temperature: Any, alpha: Any) -> None:
    """Raise ``ValueError`` unless ``temperature > 0`` and ``0 ≤ alpha ≤ 1``."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: must be a positive number")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r}: must be in [0, 1]")


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Batch-mean ``KL(softmax(teacher/T) ‖ softmax(student/T))`` (no ``T²`` factor)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} != teacher_logits shape "
            f"{tuple(teacher_logits.shape)}: the teacher and the student must predict the same classes"
        )
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
    hard_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """``α·T²·KL(teacher_T ‖ student_T) + (1 − α)·hard_loss(student, targets)`` (Hinton et al. 2015).

    ``hard_loss`` defaults to the mean cross-entropy. The teacher's logits get no gradient.
    """
    check_distillation_args(temperature, alpha)
    hard_loss = hard_loss or F.cross_entropy
    soft = soft_kl(student_logits, teacher_logits, temperature) * temperature**2
    if alpha == 1.0:
        return alpha * soft
    return alpha * soft + (1.0 - alpha) * hard_loss(student_logits, targets)


def _strip_prefix(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Lightning checkpoints of ``ImageClassifier`` key the network as ``net.*``; keep only those keys."""
    wanted = set(model.state_dict())
    if set(state) & wanted:
        return {k: v for k, v in state.items() if k in wanted}
    stripped = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    return stripped or state


def load_teacher(source: nn.Module | str | Path, teacher_net: nn.Module | None = None) -> nn.Module:
    """The teacher as a frozen module in eval mode.

    ``source`` is a module, or a path to either a whole pickled module (``torch.save(model)``, loaded
    with ``weights_only=False``: only load files you trust) or a checkpoint/state dict (a Lightning
    checkpoint of ``ImageClassifier`` works) whose weights are loaded into ``teacher_net``.
    """
    if isinstance(source, nn.Module):
        teacher = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"teacher={str(source)!r}: no such file")
        loaded = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(loaded, nn.Module):
            teacher = loaded
        else:
            if teacher_net is None:
                raise ValueError(
                    f"teacher={str(source)!r}: holds a state dict, not a module; pass teacher_net= (the "
                    "architecture) to load it into"
                )
            state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
            if not isinstance(state, dict):
                raise ValueError(f"teacher={str(source)!r}: neither a module nor a state dict")
            teacher_net.load_state_dict(_strip_prefix(state, teacher_net))
            teacher = teacher_net
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher
