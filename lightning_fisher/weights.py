"""Weights-only warm starts: load a model's parameters from a checkpoint, and nothing else.

``ckpt_path=`` resumes a run (model, optimizer, schedulers, loop position, callback state such as
pruning masks): the same run, continued. A warm start (``init_ckpt=``) begins a new run from trained
weights: a fresh optimizer, epoch 0, and callbacks without state. This is what pruning a dense model
trained elsewhere needs, e.g. a 200-epoch dense checkpoint fine-tuned for 20 epochs by a pruning recipe
(a ``ckpt_path`` resume of it would find its 200 epochs already done).

Accepted files: a Lightning checkpoint (``{"state_dict": ...}`` with keys ``net.<...>``), a plain
``state_dict`` of the LightningModule (``net.<...>``), or a plain ``state_dict`` of the network itself
(``<...>``, e.g. from :func:`lightning_fisher.pruning.export_pruned` or ``torch.save(net.state_dict())``).
Loading is strict: every parameter and buffer must be present with its shape, so a checkpoint of
another architecture fails with the missing, unexpected and mis-shaped keys named.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["load_weights"]

log = logging.getLogger(__name__)


def _state_of(path: Path, what: str) -> Mapping[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{what}={str(path)!r}: no such file")
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors have many types; all mean "not a weights file"
        raise ValueError(f"{what}={str(path)!r}: not a readable checkpoint or state_dict ({error})") from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(
            f"{what}={str(path)!r}: holds neither a Lightning checkpoint nor a state_dict of tensors "
            f"(found {type(loaded).__name__})"
        )
    return loaded


def load_weights(module: nn.Module, path: str | os.PathLike[str], *, what: str = "init_ckpt") -> None:
    """Load the parameters and buffers of ``module`` (a LightningModule with a ``net``, or any module).

    Keys are matched as saved for ``module`` itself, or, when ``module`` has a ``net`` attribute and the
    file holds the network's own keys, for ``module.net``.

    Args:
        module: the model to load into (in place).
        path: the checkpoint or state_dict file.
        what: the setting's name, used in error messages.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a checkpoint/state_dict, or its keys or shapes do not fit the model.
    """
    path = Path(path)
    state = _state_of(path, what)
    target = module
    net = getattr(module, "net", None)
    own_keys = set(module.state_dict())
    if isinstance(net, nn.Module) and not own_keys & set(state) and set(net.state_dict()) & set(state):
        target = net
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{what}={str(path)!r}: does not fit the model {type(target).__name__}: {str(error)[:800]}"
        ) from error
    log.info("%s: %s weights loaded from %s", what, type(target).__name__, path)
