"""Early exits: auxiliary classifiers after intermediate stages that let confident samples stop early.

Teerapittayanon, McDanel & Kung, "BranchyNet: Fast Inference via Early Exiting from Deep Neural
Networks" (ICPR 2016). Heads (global average pool + Linear) sit after named stages of a backbone. In
training every head is trained jointly with the final classifier (:func:`early_exit_loss` adds their
weighted cross-entropies). In inference a sample leaves at the first head whose largest softmax
probability reaches ``threshold`` (BranchyNet thresholds the entropy; the max-probability rule is the
common variant and has an easier scale), and only the samples still undecided run the later layers.

How it is wired, so the backbone keeps its parameter names (pruning masks and checkpoints are keyed by
them): the heads are registered inside the backbone as ``backbone.exit_heads`` (an ``nn.ModuleDict``
keyed by the stage FQN with ``.`` replaced by ``_``), so they are saved with the model, and forward hooks
on the stages compute them. :class:`EarlyExitModel` owns the hooks:

- calling the backbone directly, or the wrapper in training mode, runs the whole batch through every
  layer and leaves each head's logits in ``exit_logits`` (for the training loss);
- calling the wrapper in eval mode exits early per sample: a stage's hook removes the samples that
  exited from the batch it hands on, so the later layers really run on fewer samples (which is what
  :func:`lightning_fisher.compress.metrics.bit_operations` then counts). This needs a backbone whose
  layers after the exits treat samples independently (true in eval mode: BatchNorm uses running
  statistics).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EarlyExitModel", "check_threshold", "early_exit_loss", "head_key"]

log = logging.getLogger(__name__)

HEADS_ATTRIBUTE = "exit_heads"


def head_key(stage: str) -> str:
    """The ``exit_heads`` key of the head after ``stage`` (``"layer2.1"`` → ``"layer2_1"``)."""
    return stage.replace(".", "_")


class _AllExited(Exception):
    """Raised from a stage hook to stop the backbone's forward once every sample has exited."""


class _Run:
    """Bookkeeping of one early-exit forward: which samples remain and what each one returned."""

    def __init__(self, batch_size: int, device: torch.device) -> None:
        self.remaining = torch.arange(batch_size, device=device)
        self.exit_index = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        self.logits: Tensor | None = None

    def record(self, rows: Tensor, logits: Tensor, index: int) -> None:
        if self.logits is None:
            self.logits = logits.new_empty(self.exit_index.shape[0], logits.shape[-1])
        self.logits[rows] = logits
        self.exit_index[rows] = index


def _channels(stage: nn.Module) -> int | None:
    channels = None
    for module in stage.modules():
        if isinstance(getattr(module, "num_features", None), int):
            channels = module.num_features
        elif isinstance(getattr(module, "out_channels", None), int):
            channels = module.out_channels
    return channels


def _num_classes(backbone: nn.Module) -> int | None:
    heads = getattr(backbone, HEADS_ATTRIBUTE, None)
    skip = {id(m) for m in heads.modules()} if isinstance(heads, nn.Module) else set()
    linears = [m for m in backbone.modules() if isinstance(m, nn.Linear) and id(m) not in skip]
    return linears[-1].out_features if linears else None


class EarlyExitModel(nn.Module):
    """Early-exit inference around a backbone (BranchyNet, Teerapittayanon et al., ICPR 2016).

    Args:
        backbone: the classifier, e.g. ``ResNet18`` (stages ``layer1`` .. ``layer4``).
        exits: FQNs of the stages after which a head sits, none inside another; they are used in the
            order the backbone registers them (for ResNet18, the order of execution).
        threshold: a sample exits at the first head whose max softmax probability is ``>= threshold``
            (0: always the first head; above 1: never, the backbone's own output is used).
        num_classes: classes of the heads; ``None`` takes the ``out_features`` of the backbone's last
            Linear.

    Heads already present in ``backbone.exit_heads`` are reused (e.g. after loading a checkpoint);
    missing ones are created. After a forward in eval mode ``last_exit_index`` holds, per sample, the
    index of the exit it took (``len(exits)`` for the final classifier) and ``exit_counts`` accumulates
    them (see :meth:`exit_fractions`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        exits: Sequence[str] = ("layer2", "layer3"),
        threshold: float = 0.9,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(exits, str) or not exits or len(set(exits)) != len(exits):
            raise ValueError(f"exits={exits!r}: must be a non-empty list of distinct stage names")
        check_threshold(threshold)
        names = [name for name, _ in backbone.named_modules()]
        unknown = [e for e in exits if e not in names or not e]
        if unknown:
            raise ValueError(f"exits={list(exits)!r}: {unknown} are not submodules of {type(backbone).__name__}")
        nested = [(a, b) for a in exits for b in exits if a != b and b.startswith(a + ".")]
        if nested:
            raise ValueError(f"exits={list(exits)!r}: {nested[0][1]!r} lies inside {nested[0][0]!r}")
        if num_classes is None:
            num_classes = _num_classes(backbone)
            if num_classes is None:
                raise ValueError(f"num_classes=None: {type(backbone).__name__} has no Linear to infer it from")
        self.backbone = backbone
        self.exits = sorted(exits, key=names.index)
        self.threshold = float(threshold)
        self.num_classes = num_classes
        self._attach_heads()
        self.exit_logits: dict[str, Tensor] = {}
        self.exit_counts = torch.zeros(len(self.exits) + 1, dtype=torch.long)
        self.last_exit_index: Tensor | None = None
        self._run: _Run | None = None
        self._handles = [
            backbone.get_submodule(stage).register_forward_hook(self._hook(i, stage))
            for i, stage in enumerate(self.exits)
        ]

    @property
    def heads(self) -> nn.ModuleDict:
        return getattr(self.backbone, HEADS_ATTRIBUTE)

    def _attach_heads(self) -> None:
        heads = getattr(self.backbone, HEADS_ATTRIBUTE, None)
        if heads is None:
            heads = nn.ModuleDict()
            self.backbone.add_module(HEADS_ATTRIBUTE, heads)
        elif not isinstance(heads, nn.ModuleDict):
            raise ValueError(f"backbone.{HEADS_ATTRIBUTE}: exists and is not an nn.ModuleDict")
        reference = next(self.backbone.parameters(), None)
        factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        for stage in self.exits:
            if head_key(stage) in heads:
                continue
            channels = _channels(self.backbone.get_submodule(stage))
            if channels is None:
                raise ValueError(f"exits: cannot tell the output channels of {stage!r} (no conv or norm layer)")
            heads[head_key(stage)] = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, self.num_classes, **factory)
            )

    def _hook(self, index: int, stage: str) -> Callable[[nn.Module, Any, Tensor], Tensor | None]:
        key = head_key(stage)

        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
            logits = self.heads[key](output)
            run = self._run
            if run is None:
                self.exit_logits[stage] = logits
                return None
            confident = F.softmax(logits.float(), dim=-1).amax(dim=-1) >= self.threshold
            if bool(confident.any()):
                run.record(run.remaining[confident], logits[confident], index)
                run.remaining = run.remaining[~confident]
                if run.remaining.numel() == 0:
                    raise _AllExited
                return output[~confident]
            return None

        return hook

    def forward(self, x: Tensor) -> Tensor:
        self.exit_logits = {}
        if self.training:
            return self.backbone(x)
        run = _Run(x.shape[0], x.device)
        self._run = run
        try:
            final = self.backbone(x)
            run.record(run.remaining, final, len(self.exits))
        except _AllExited:
            pass
        finally:
            self._run = None
        self.last_exit_index = run.exit_index
        self.exit_counts += torch.bincount(run.exit_index.cpu(), minlength=len(self.exits) + 1)
        if run.logits is None:  # cannot happen: every sample was recorded above
            raise RuntimeError("EarlyExitModel: no logits recorded")
        return run.logits

    def exit_fractions(self) -> dict[str, float]:
        """Fraction of the samples seen in eval mode that left at each exit (``"final"``: none)."""
        total = int(self.exit_counts.sum())
        names = [*self.exits, "final"]
        return {name: (int(c) / total if total else 0.0) for name, c in zip(names, self.exit_counts)}

    def reset_exit_counts(self) -> None:
        self.exit_counts.zero_()

    def remove_hooks(self) -> None:
        """Detach from the backbone (the heads stay in ``backbone.exit_heads``)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def check_threshold(threshold: Any) -> None:
    """Raise ``ValueError`` unless ``threshold`` is a number ``>= 0``."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"threshold={threshold!r}: must be a number >= 0 (above 1 never exits early)")


def early_exit_loss(
    exit_logits: dict[str, Tensor],
    targets: Tensor,
    loss_weight: float = 0.3,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """``loss_weight × Σ_heads loss_fn(head_logits, targets)`` (the final classifier's loss not included)."""
    if not exit_logits:
        raise ValueError("exit_logits={}: no head ran in this forward (is the EarlyExitModel attached?)")
    loss_fn = loss_fn or F.cross_entropy
    losses = [loss_fn(logits, targets) for logits in exit_logits.values()]
    return loss_weight * torch.stack(losses).sum()
