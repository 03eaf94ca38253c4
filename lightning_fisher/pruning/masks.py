"""Mask bookkeeping: boolean tensors keyed by parameter FQN (``True`` = kept), applied in place.

Masks are re-applied after every optimizer step (see :meth:`Pruner.attach`), which keeps pruned weights
exactly zero whatever the optimizer does in between (momentum, weight decay, clipping, AMP).

Optimizer state is deliberately left alone. Adam, AdamW, SGD, RMSprop and Adagrad update each entry from
that entry's own state, so a pruned entry's ``exp_avg``/``momentum_buffer`` can only move the pruned
weight itself, which the next application of the mask sets back to zero: zeroing the first moments
would cost a pass over the state every step and change no surviving weight. ``exp_avg_sq`` in
particular must stay intact, since it is the Squisher's Fisher estimate.

A pruned model exports as an ordinary ``state_dict`` with zeros in place (masks folded into the
weights) plus a separate mask file: :func:`export_pruned` / :func:`load_pruned`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fisher.pruning.selection import clean_fqn

__all__ = [
    "MASK_FILE_VERSION",
    "apply_masks_",
    "check_mask_keys",
    "export_pruned",
    "layer_sparsity",
    "load_masks",
    "load_pruned",
    "mask_path",
    "masks_state_dict",
    "save_masks",
    "sparsity",
]

log = logging.getLogger(__name__)

MASK_FILE_VERSION = 1


@torch.no_grad()
def apply_masks_(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Zero, in place, every entry of ``params[fqn]`` where ``masks[fqn]`` is False."""
    for name, mask in masks.items():
        params[name].masked_fill_(~mask, 0)


def sparsity(masks: Mapping[str, Tensor]) -> float:
    """Fraction of pruned entries over all masks (0.0 for no masks)."""
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        return 0.0
    return sum(int((~m).sum()) for m in masks.values()) / total


def layer_sparsity(masks: Mapping[str, Tensor]) -> dict[str, float]:
    """``{fqn: fraction pruned}``."""
    return {name: int((~m).sum()) / m.numel() for name, m in masks.items()}


def masks_state_dict(masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU boolean copies of ``masks``, ready for ``torch.save`` or a checkpoint."""
    return {name: m.detach().to("cpu", torch.bool).clone() for name, m in masks.items()}


def check_mask_keys(expected: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> None:
    """Raise listing missing/unexpected FQNs and shape mismatches between ``state`` and ``expected``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"mask state does not match the pruned parameters: missing {missing}, unexpected {unexpected}")
    wrong = [
        f"{name}: {tuple(state[name].shape)} vs {tuple(expected[name].shape)}"
        for name in expected
        if state[name].shape != expected[name].shape
    ]
    if wrong:
        raise ValueError(f"mask shapes do not match the parameters: {wrong}")


def load_masks(params: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Masks from ``state`` (strict: same FQNs and shapes as ``params``), on each parameter's device."""
    check_mask_keys(params, state)
    return {name: state[name].to(device=params[name].device, dtype=torch.bool).clone() for name in params}


def mask_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`export_pruned` puts the masks next to ``path``: ``model.pt`` → ``model.masks.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.masks{path.suffix or '.pt'}")


def save_masks(masks: Mapping[str, Tensor], path: str | os.PathLike[str]) -> None:
    """Write ``{"version": 1, "masks": {fqn: bool tensor}}`` to ``path``."""
    torch.save({"version": MASK_FILE_VERSION, "masks": masks_state_dict(masks)}, path)


def _read_masks(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("version") != MASK_FILE_VERSION:
        raise ValueError(f"{path}: mask file version {payload.get('version')!r}, expected {MASK_FILE_VERSION}")
    return payload["masks"]


@torch.no_grad()
def export_pruned(
    model: nn.Module, masks: Mapping[str, Tensor], path: str | os.PathLike[str]
) -> tuple[Path, Path]:
    """Save ``model``'s ``state_dict`` with the masks folded in (zeros in place), and the masks beside it.

    Keys lose ``torch.compile``'s ``_orig_mod.`` segment, so the file loads into the plain model with
    ``model.load_state_dict(torch.load(path))``. Returns ``(state_dict_path, mask_path)``.
    """
    path = Path(path)
    state = {clean_fqn(k): v.detach().clone() for k, v in model.state_dict().items()}
    missing = sorted(set(masks) - set(state))
    if missing:
        raise KeyError(f"masks name parameters the model does not have: {missing}")
    for name, mask in masks.items():
        state[name].masked_fill_(~mask.to(state[name].device), 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    masks_file = mask_path(path)
    save_masks(masks, masks_file)
    log.info("exported the pruned state_dict to %s and its masks to %s", path, masks_file)
    return path, masks_file


def load_pruned(model: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> dict[str, Tensor]:
    """Load a state_dict written by :func:`export_pruned` into ``model``; return its masks.

    Raises if a weight holds a non-zero where its mask says pruned (the files do not belong together).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=strict)
    masks = _read_masks(mask_path(path))
    params = {clean_fqn(k): v for k, v in model.state_dict().items()}
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise KeyError(f"{mask_path(path)}: masks name parameters the model does not have: {unknown}")
    check_mask_keys({k: params[k] for k in masks}, masks)
    dirty = [name for name, mask in masks.items() if bool((params[name].cpu()[~mask] != 0).any())]
    if dirty:
        raise ValueError(f"{path}: weights {dirty} are non-zero where their masks prune them")
    return {name: mask.to(params[name].device) for name, mask in masks.items()}
