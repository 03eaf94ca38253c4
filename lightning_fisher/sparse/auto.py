"""How ``backend="auto"`` chooses, per layer, between dense, the Triton kernels and cuSPARSELt.

The rule, applied by :func:`choose_backend` when :func:`~lightning_fisher.sparse.to_sparse` converts a layer:

1. A weight that is not on a GPU gets ``"triton"``: on the CPU its forward is the torch fallback (dense
   math on the decompressed weight, the same result as the dense layer), and the Triton kernels under
   ``TRITON_INTERPRET=1``. Nothing can be measured there, and the result is identical either way.
2. A CUDA weight is looked up in the measured table (:mod:`lightning_fisher.sparse.measured`, written by
   ``benchmarks/kernels.py``) by device name, layer kind, layer shape (:func:`layer_key`), pattern and
   dtype. No entry: the layer **stays dense** (an unmeasured kernel could be slower than cuBLAS/cuDNN).
3. With entries, each sparse backend's speed-up is ``dense_ms / backend_ms`` at every measured batch size
   (only the one nearest to ``batch_size``, on a log scale, when given); a backend is judged by its worst
   case. The best backend is chosen when that worst case is at least ``min_speedup`` (1.0: never slower
   than dense where measured); otherwise the layer stays dense. A backend missing at some measured batch
   (unsupported shape) is not considered.

Convert on the device and in the dtype you will run (``model.cuda().half()`` first): a model converted on
the CPU runs the Triton kernels, unmeasured, once moved to a GPU.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["AUTO_MIN_SPEEDUP", "choose_backend", "layer_key", "load_measurements", "pick_backend"]

AUTO_MIN_SPEEDUP = 1.0


def layer_key(module: nn.Module) -> tuple[str, tuple[int, ...]]:
    """``("linear", (out, in))`` or ``("conv2d", (out, in, kh, kw, sh, sw, ph, pw, dh, dw))``."""
    if isinstance(module, nn.Linear):
        return "linear", (module.out_features, module.in_features)
    if isinstance(module, nn.Conv2d):
        padding = module.padding if not isinstance(module.padding, str) else (-1, -1)
        return "conv2d", (module.out_channels, module.in_channels, *module.kernel_size, *module.stride,
                          *padding, *module.dilation)
    raise TypeError(f"module={type(module).__name__}: must be an nn.Linear or nn.Conv2d")


def load_measurements(table: str | os.PathLike[str] | Sequence[dict] | None = None) -> list[dict]:
    """The measured entries: the packaged table (``None``), a JSON file, or a list of entries."""
    if table is None:
        from lightning_fisher.sparse.measured import MEASUREMENTS

        return list(MEASUREMENTS)
    if isinstance(table, (str, os.PathLike)):
        data = json.loads(Path(table).read_text())
        entries = data["measurements"] if isinstance(data, dict) else data
    else:
        entries = list(table)
    for entry in entries:
        missing = {"device", "kind", "shape", "pattern", "dtype", "batch", "ms"} - set(entry)
        if missing:
            raise ValueError(f"measured entry {entry!r}: missing keys {sorted(missing)}")
    return list(entries)


def pick_backend(
    entries: Sequence[dict], batch_size: int | None = None, min_speedup: float = AUTO_MIN_SPEEDUP
) -> tuple[str | None, str]:
    """``(backend or None for dense, reason)`` from one layer's measured entries (rule 3 above)."""
    if not entries:
        return None, "auto: no measurement"
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be positive")
        batches = sorted({int(e["batch"]) for e in entries})
        nearest = min(batches, key=lambda b: (abs(math.log(b / batch_size)), -b))
        entries = [e for e in entries if int(e["batch"]) == nearest]
    worst: dict[str, float] = {}
    names = set.intersection(*({k for k, v in e["ms"].items() if v} for e in entries)) - {"dense"}
    for name in sorted(names):
        worst[name] = min(e["ms"]["dense"] / e["ms"][name] for e in entries)
    batches_text = ",".join(str(b) for b in sorted({int(e["batch"]) for e in entries}))
    if not worst:
        return None, f"auto: no sparse backend measured at batch {batches_text}"
    best = max(worst, key=lambda name: worst[name])
    if worst[best] >= min_speedup:
        return best, f"auto: {best} {worst[best]:.2f}x dense (worst at batch {batches_text})"
    return None, f"auto: best sparse backend {best} is {worst[best]:.2f}x dense (batch {batches_text}); kept dense"


def choose_backend(
    module: nn.Module,
    n: int,
    m: int,
    table: str | os.PathLike[str] | Sequence[dict] | None = None,
    batch_size: int | None = None,
    min_speedup: float = AUTO_MIN_SPEEDUP,
) -> tuple[str | None, str]:
    """``(backend or None for dense, reason)`` for one eligible layer, by the rule of this module."""
    weight = module.weight
    if not weight.is_cuda:
        return "triton", "auto: no GPU, torch fallback on the CPU"
    kind, shape = layer_key(module)
    device = torch.cuda.get_device_name(weight.device)
    dtype = str(weight.dtype).removeprefix("torch.")
    pattern = f"{n}:{m}"
    entries = [
        e for e in load_measurements(table)
        if e["device"] == device and e["kind"] == kind and tuple(e["shape"]) == shape and e["pattern"] == pattern
        and e["dtype"] == dtype
    ]
    if not entries:
        return None, f"auto: no measurement for {kind} {shape} {dtype} {pattern} on {device}; kept dense"
    return pick_backend(entries, batch_size, min_speedup)
