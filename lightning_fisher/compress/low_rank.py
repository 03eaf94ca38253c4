"""Low-rank factorisation of Linear and Conv2d layers by truncated SVD.

Denton et al., "Exploiting Linear Structure Within Convolutional Networks for Efficient Evaluation"
(NeurIPS 2014) and Jaderberg et al. (BMVC 2014): a weight ``W`` (out × in, or out × in·kh·kw for a
convolution) is replaced by its rank-``r`` truncated SVD ``U_r S_r V_rᵀ``, split as two layers
``(U_r √S_r)(√S_r V_rᵀ)``: a Linear in → r then r → out, or a kh×kw convolution with r output channels
(same stride, padding, dilation) followed by a 1×1 convolution r → out that carries the bias. By
Eckart–Young the Frobenius error is ``sqrt(Σ dropped σ²)``, the smallest any rank-r matrix achieves.

The rank of each layer comes from exactly one rule:

- ``energy``: the smallest r whose kept squared singular values reach that fraction of the total;
- ``rank_fraction``: ``ceil(rank_fraction × min(out, in·kh·kw))``;
- ``parameter_budget``: the largest r whose two factors hold at most that fraction of the layer's
  original weights (at least rank 1).

A layer stays as it is (and is listed with the reason) when the factors would not hold fewer
parameters than the original weight, when it is a grouped convolution, or when it matches ``exclude``.
Pruning zeros are not preserved: the factors are dense.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LayerRank", "LowRankConv2d", "LowRankLinear", "LowRankReport", "check_rank_rule", "choose_rank", "factorize"]

log = logging.getLogger(__name__)


@dataclass
class LayerRank:
    """One factored layer: its rank, the full rank, the kept energy and the weights before/after."""

    rank: int
    full_rank: int
    kept_energy: float
    params_before: int
    params_after: int


@dataclass
class LowRankReport:
    """What :func:`factorize` did: ``layers`` factored (by module FQN), ``skipped`` with the reason."""

    layers: dict[str, LayerRank] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers.values())

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers.values())

    @property
    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.layers.items()}

    def summary(self) -> str:
        text = (
            f"factorize: {len(self.layers)} layers factored, weights {self.params_before} -> {self.params_after}, "
            f"{len(self.skipped)} kept"
        )
        if self.skipped:
            text += ": " + "; ".join(f"{name}: {reason}" for name, reason in self.skipped.items())
        return text

    def __str__(self) -> str:
        return self.summary()


class LowRankLinear(nn.Module):
    """A Linear factored as ``up(down(x))``: ``down`` in → rank (no bias), ``up`` rank → out."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, **factory: Any) -> None:
        super().__init__()
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, **factory)
        self.up = nn.Linear(rank, out_features, bias=bias, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


class LowRankConv2d(nn.Module):
    """A Conv2d factored as ``up(down(x))``: ``down`` the original kh×kw conv with ``rank`` output
    channels (no bias), ``up`` a 1×1 conv rank → out with the original bias."""

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        self.rank = rank
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.down = nn.Conv2d(
            conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode, **factory,
        )  # fmt: skip
        self.up = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


RULES = ("energy", "rank_fraction", "parameter_budget")


def check_rank_rule(
    energy: float | None, rank_fraction: float | None, parameter_budget: float | None
) -> tuple[str, float]:
    """The one rule given, as ``(name, value)``; ``ValueError`` if none, several, or out of (0, 1]."""
    given = {k: v for k, v in zip(RULES, (energy, rank_fraction, parameter_budget)) if v is not None}
    if len(given) != 1:
        raise ValueError(
            f"energy={energy!r}, rank_fraction={rank_fraction!r}, parameter_budget={parameter_budget!r}: "
            "give exactly one of them"
        )
    (name, value), = given.items()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value!r}: must be in (0, 1]")
    return name, float(value)


def _matrix(module: nn.Module) -> Tensor:
    return module.weight.detach().reshape(module.weight.shape[0], -1).float()


def choose_rank(singular_values: Tensor, shape: tuple[int, int], rule: str, value: float) -> int:
    """The rank that ``rule`` (one of ``RULES``) picks for a (out, in) matrix with these singular values."""
    out_dim, in_dim = shape
    full = singular_values.numel()
    if rule == "energy":
        squared = singular_values.double() ** 2
        total = float(squared.sum())
        if total == 0.0:
            return 1
        cumulative = torch.cumsum(squared, 0) / total
        # the small slack keeps energy=1.0 from demanding more than full rank through rounding
        return min(full, int(torch.searchsorted(cumulative, torch.tensor(value - 1e-12, dtype=cumulative.dtype))) + 1)
    if rule == "rank_fraction":
        return max(1, min(full, math.ceil(value * full)))
    if rule == "parameter_budget":
        return max(1, min(full, int(value * out_dim * in_dim // (out_dim + in_dim))))
    raise ValueError(f"rule={rule!r}: must be one of {RULES}")


def _factor(module: nn.Module, rank: int, u: Tensor, s: Tensor, vh: Tensor) -> nn.Module:
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).to(module.weight.dtype)
    down = (root[:, None] * vh[:rank]).to(module.weight.dtype)
    if isinstance(module, nn.Conv2d):
        new: nn.Module = LowRankConv2d(module, rank)
        new.down.weight.data.copy_(down.reshape(rank, *module.weight.shape[1:]))
        new.up.weight.data.copy_(up.reshape(module.out_channels, rank, 1, 1))
    else:
        factory = {"device": module.weight.device, "dtype": module.weight.dtype}
        new = LowRankLinear(module.in_features, module.out_features, rank, bias=module.bias is not None, **factory)
        new.down.weight.data.copy_(down)
        new.up.weight.data.copy_(up)
    if module.bias is not None:
        new.up.bias.data.copy_(module.bias.detach())
    new.train(module.training)
    return new


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def factorize(
    model: nn.Module,
    energy: float | None = None,
    rank_fraction: float | None = None,
    parameter_budget: float | None = None,
    exclude: Sequence[str] = (),
    ranks: Mapping[str, int] | None = None,
) -> LowRankReport:
    """Replace ``nn.Linear``/``nn.Conv2d`` layers (exact types) of ``model`` by SVD factors, in place.

    Args:
        model: the network; layers are named by their FQN in it.
        energy, rank_fraction, parameter_budget: the rank rule (exactly one; see the module docstring).
        exclude: ``fnmatch`` patterns of module FQNs to leave alone.
        ranks: fixed ranks by FQN (e.g. ``report.ranks`` of an earlier run, to rebuild the same shapes
            before loading a checkpoint); when given, only these layers are factored and the rule is
            not needed.

    Returns:
        A :class:`LowRankReport`: per factored layer the rank and kept energy, and the skipped layers.
    """
    if isinstance(exclude, str):
        raise TypeError(f"exclude={exclude!r}: must be a list of patterns, not a string")
    rule, value = ("ranks", 0.0) if ranks is not None else check_rank_rule(energy, rank_fraction, parameter_budget)
    report = LowRankReport()
    candidates = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if type(module) in (nn.Linear, nn.Conv2d):
            candidates.append((name, module))
        else:  # e.g. fake-quantized layers: factoring them would drop what the subclass adds
            base = "Conv2d" if isinstance(module, nn.Conv2d) else "Linear"
            report.skipped[name] = f"{type(module).__name__} is a subclass of nn.{base}, not factored"
    if ranks is not None:
        missing = sorted(set(ranks) - {n for n, _ in candidates})
        if missing:
            raise ValueError(f"ranks: no Linear/Conv2d layers named {missing}")
    for name, module in candidates:
        if ranks is not None and name not in ranks:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            report.skipped[name] = "excluded"
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            report.skipped[name] = f"grouped convolution (groups={module.groups})"
            continue
        matrix = _matrix(module)
        out_dim, in_dim = matrix.shape
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        rank = ranks[name] if ranks is not None else choose_rank(s, (out_dim, in_dim), rule, value)
        before = out_dim * in_dim
        after = rank * (out_dim + in_dim)
        if after >= before and ranks is None:
            report.skipped[name] = f"rank {rank} of {s.numel()} would not save weights ({after} >= {before})"
            continue
        squared = s.double() ** 2
        kept = float(squared[:rank].sum() / squared.sum()) if float(squared.sum()) > 0 else 1.0
        _set_submodule(model, name, _factor(module, rank, u, s, vh))
        report.layers[name] = LayerRank(rank, s.numel(), kept, before, after)
    log.info("%s", report.summary())
    return report
