"""Sparsity patterns: which weights a mask may remove, given scores (low score = remove first).

- ``"unstructured"``: any weight. ``scope="layer"`` prunes every layer to the same sparsity, exactly
  ``round(s·numel)`` weights each; ``scope="global"`` ranks all pruned layers together, exactly
  ``round(s·total)`` weights in all.
- ``"N:M"`` (``0 < N < M``): in every group of M consecutive weights along the reduction dimension, at
  most N are non-zero. The reduction dimension is dim 1 of the weight (Linear: input features; Conv2d:
  input channels, grouped separately at each kernel position, i.e. reduction order (kh, kw, cin)): the
  weight ``[out, in, kh, kw]`` is viewed as ``[out, kh, kw, in]`` and grouped along ``in``. A weight
  whose ``in`` is not a multiple of M cannot hold the pattern (:func:`nm_eligible`).

Masks are boolean, ``True`` = kept. Updates are monotone: a weight already pruned stays pruned (its
score is taken as −inf, and the new mask is intersected with the old one). Ties between equal scores
are broken by position (flattened index, layers in order), so masks are deterministic.

Layer-collapse guard (``min_layer_density``, unstructured ``scope="global"`` only). One global
threshold can remove a whole layer, which disconnects the network ("layer collapse", Tanaka et al.
2020, "Pruning neural networks without any data by iteratively conserving synaptic flow"). With
``min_layer_density = d > 0`` every layer keeps at least its floor ``max(1, ceil(d·numel))`` weights,
namely its highest-scoring survivors (ties as above: the lower index is pruned first, so the higher
index is kept), and the global threshold ranks the remaining weights so that exactly
``round(s·total)`` are pruned in all. A layer that already holds fewer survivors than its floor (from
an earlier prune) keeps what it has and loses nothing more; nothing is un-pruned. Floors that leave
too few weights to prune (``sum(floors) > total − round(s·total)``) are a ``ValueError``. Where no
layer would fall below its floor, the masks are exactly those without the guard; ``d = 0`` switches
the guard off. ``scope="layer"`` keeps ``1 − s`` of every layer anyway, so the guard does not apply
there; nor to N:M patterns, which keep N of every M weights of every group.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "SCOPES",
    "Pattern",
    "Scope",
    "check_layer_floors",
    "from_reduction_layout",
    "layer_floor",
    "lowest_k",
    "nm_eligible",
    "nm_groups_held",
    "nm_mask",
    "nm_masks",
    "parse_pattern",
    "to_reduction_layout",
    "unstructured_masks",
    "validate_min_layer_density",
]

log = logging.getLogger(__name__)

Scope = Literal["layer", "global"]
SCOPES: tuple[str, ...] = ("layer", "global")
_NM = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern: unstructured (``n = m = None``) or N:M."""

    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def nm_sparsity(self) -> float:
        """(M − N)/M, the sparsity of a layer whose every group holds the pattern."""
        if self.n is None or self.m is None:
            raise ValueError("an unstructured pattern has no fixed sparsity")
        return (self.m - self.n) / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def parse_pattern(pattern: str) -> Pattern:
    """``"unstructured"`` or ``"N:M"`` with integers ``0 < N < M`` (``"2:4"``)."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern={pattern!r}: must be a string, 'unstructured' or 'N:M'")
    if pattern.strip() == "unstructured":
        return Pattern()
    match = _NM.match(pattern)
    if match is None:
        raise ValueError(f"pattern={pattern!r}: must be 'unstructured' or 'N:M' with integers 0 < N < M, e.g. '2:4'")
    n, m = int(match.group(1)), int(match.group(2))
    if n < 1 or m < 1:
        raise ValueError(f"pattern={pattern!r}: N and M must be at least 1")
    if n >= m:
        raise ValueError(f"pattern={pattern!r}: N must be smaller than M (N:M keeps N of every M weights)")
    return Pattern(n, m)


def to_reduction_layout(tensor: Tensor) -> Tensor:
    """Move dim 1 (the input dimension) last: ``[out, in, kh, kw] → [out, kh, kw, in]`` (a view)."""
    if tensor.ndim < 2:
        raise ValueError(f"a tensor of shape {tuple(tensor.shape)} has no reduction dimension (needs ndim >= 2)")
    return tensor.movedim(1, -1)


def from_reduction_layout(tensor: Tensor) -> Tensor:
    """Inverse of :func:`to_reduction_layout` (a view)."""
    return tensor.movedim(-1, 1)


def nm_eligible(shape: torch.Size | tuple[int, ...], m: int) -> bool:
    """Whether a weight of ``shape`` can hold an N:M pattern: ndim >= 2 and ``shape[1] % m == 0``."""
    return len(shape) >= 2 and shape[1] % m == 0


def _groups(tensor: Tensor, m: int) -> Tensor:
    if not nm_eligible(tensor.shape, m):
        raise ValueError(
            f"a weight of shape {tuple(tensor.shape)} cannot hold an N:M pattern with M={m}: "
            "its input dimension (dim 1) must be a multiple of M"
        )
    return to_reduction_layout(tensor).reshape(-1, m)


def _ungroup(groups: Tensor, shape: torch.Size) -> Tensor:
    reduced = (shape[0], *shape[2:], shape[1])
    return from_reduction_layout(groups.reshape(reduced)).contiguous()


def _top_n_in_groups(groups: Tensor, n: int) -> Tensor:
    """Boolean ``[G, m]``: the ``n`` highest scores of every group (ties: the lower index wins)."""
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, :n], True)
    return keep


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """The N:M mask keeping the ``n`` highest scores in every group of ``m`` along dim 1.

    >>> nm_mask(torch.arange(1.0, 9.0).reshape(1, 8), 2, 4).int().tolist()
    [[0, 0, 1, 1, 0, 0, 1, 1]]
    """
    if not 0 < n < m:
        raise ValueError(f"n={n}, m={m}: must satisfy 0 < n < m")
    return _ungroup(_top_n_in_groups(_groups(scores, m), n), scores.shape)


def nm_groups_held(mask: Tensor, n: int, m: int) -> Tensor:
    """Per group (flattened in reduction layout), whether it already holds the N:M pattern."""
    return _groups(mask, m).sum(dim=1) <= n


def lowest_k(values: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` smallest entries of 1-D ``values``; ties go to the lower index.

    Runs in linear time (``kthvalue``) instead of a full sort, so it scales to millions of weights.
    """
    count = values.numel()
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k >= count:
        return torch.ones_like(values, dtype=torch.bool)
    threshold = torch.kthvalue(values, k).values
    below = values < threshold
    tied = values == threshold
    need = k - int(below.sum())
    return below | (tied & (torch.cumsum(tied, dim=0) <= need))


def _masked_scores(scores: dict[str, Tensor], masks: dict[str, Tensor]) -> dict[str, Tensor]:
    return {
        name: torch.where(masks[name], s.float(), torch.tensor(float("-inf"), device=s.device))
        for name, s in scores.items()
    }


def validate_min_layer_density(min_layer_density: float) -> float:
    """Return ``min_layer_density`` as a float after checking it is a number in [0, 1)."""
    if isinstance(min_layer_density, bool) or not isinstance(min_layer_density, (int, float)):
        raise ValueError(f"min_layer_density={min_layer_density!r}: must be a float in [0, 1)")
    if not 0.0 <= min_layer_density < 1.0:
        raise ValueError(f"min_layer_density={min_layer_density!r}: must be a float in [0, 1)")
    return float(min_layer_density)


def layer_floor(numel: int, min_layer_density: float) -> int:
    """Weights a layer of ``numel`` keeps under the guard: ``max(1, ceil(d·numel))``, 0 when ``d = 0``.

    The product is rounded to 6 decimals before ``ceil`` so that float noise (``0.07 * 100 =
    7.000000000000001``) does not add a weight.
    """
    if min_layer_density <= 0.0 or numel <= 0:
        return 0
    return min(numel, max(1, math.ceil(round(min_layer_density * numel, 6))))


def check_layer_floors(sizes: dict[str, int], sparsity: float, min_layer_density: float) -> None:
    """Raise ``ValueError`` if the floors of layers of ``sizes`` leave fewer than ``round(s·total)``
    weights to prune (global scope): the target would be unreachable."""
    total = sum(sizes.values())
    floors = sum(layer_floor(n, min_layer_density) for n in sizes.values())
    k = round(sparsity * total)
    if floors > total - k:
        raise _unreachable(floors, total, len(sizes), k, sparsity, min_layer_density)


def _unreachable(floors: int, total: int, layers: int, k: int, sparsity: float, density: float) -> ValueError:
    return ValueError(
        f"min_layer_density={density!r}: the per-layer floors keep {floors} of {total} weights "
        f"({layers} layers), but sparsity={sparsity:g} prunes {k} and leaves only {total - k}; "
        "lower min_layer_density or the sparsity (0 disables the guard)"
    )


def unstructured_masks(
    scores: dict[str, Tensor],
    masks: dict[str, Tensor],
    sparsity: float,
    scope: Scope,
    *,
    min_layer_density: float = 0.01,
) -> dict[str, Tensor]:
    """New masks pruning the lowest scores to ``sparsity`` (never un-pruning a weight).

    Args:
        scores: ``{fqn: scores}`` shaped like the weights.
        masks: the current masks (``True`` = kept), same keys.
        sparsity: the fraction to prune, per layer (``scope="layer"``) or over all (``"global"``).
        scope: ``"layer"`` or ``"global"``.
        min_layer_density: ``scope="global"`` only: every layer keeps at least ``max(1, ceil(d·numel))``
            of its highest-scoring survivors (the layer-collapse guard, see the module docstring);
            ``0`` disables it. Ignored with ``scope="layer"``.

    Raises:
        ValueError: ``min_layer_density`` outside [0, 1), or floors that make the target unreachable.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: must be one of {SCOPES}")
    density = validate_min_layer_density(min_layer_density)
    masked = _masked_scores(scores, masks)
    if scope == "layer":
        out = {}
        for name, s in masked.items():
            k = max(round(sparsity * s.numel()), int((~masks[name]).sum()))
            out[name] = ~lowest_k(s.flatten(), k).reshape(s.shape) & masks[name]
        return out
    names = list(masked)
    device = masked[names[0]].device
    flat = torch.cat([masked[name].flatten().to(device) for name in names])
    already = sum(int((~masks[name]).sum()) for name in names)
    k = max(round(sparsity * flat.numel()), already)
    pruned = lowest_k(flat, k)
    if density > 0.0:
        pruned = _guard_layers(masked, masks, names, flat, pruned, k, sparsity, density)
    out, offset = {}, 0
    for name in names:
        size = masked[name].numel()
        piece = pruned[offset : offset + size].reshape(masked[name].shape).to(masks[name].device)
        out[name] = ~piece & masks[name]
        offset += size
    return out


def _guard_layers(
    masked: dict[str, Tensor],
    masks: dict[str, Tensor],
    names: list[str],
    flat: Tensor,
    pruned: Tensor,
    k: int,
    sparsity: float,
    density: float,
) -> Tensor:
    """The global selection of ``k`` weights to prune, with every layer's top survivors held back.

    ``pruned`` is the unguarded selection: when it removes no protected weight it is already the
    answer (the guarded and unguarded masks then coincide bit for bit).
    """
    protected_parts, held, protected_total = [], [], 0
    for name in names:
        s = masked[name].flatten()
        survivors = int(masks[name].sum())
        keep = min(layer_floor(s.numel(), density), survivors)
        # The top `keep` survivors: everything outside the lowest numel − keep (pruned ones score −inf,
        # so they are all among the lowest); ties follow lowest_k, the lower index goes first.
        protected_parts.append(~lowest_k(s, s.numel() - keep).to(flat.device))
        protected_total += keep
    protected = torch.cat(protected_parts)
    if not bool((pruned & protected).any()):
        return pruned
    total = flat.numel()
    if protected_total > total - k:
        raise _unreachable(protected_total, total, len(names), k, sparsity, density)
    candidates = ~protected
    guarded = torch.zeros_like(pruned)
    # boolean indexing keeps the order, so ties are still broken by global position among candidates
    guarded[candidates] = lowest_k(flat[candidates], k)
    offset = 0
    for name in names:
        size = masked[name].numel()
        if bool((pruned[offset : offset + size] & protected[offset : offset + size]).any()):
            kept = size - int(guarded[offset : offset + size].sum())
            held.append(f"{name} ({kept}/{size})")
        offset += size
    log.info(
        "global pruning to sparsity=%g: layers held at their min_layer_density=%g floor (kept/numel): %s",
        sparsity,
        density,
        ", ".join(held),
    )
    return guarded


def nm_masks(
    scores: dict[str, Tensor], masks: dict[str, Tensor], n: int, m: int, fraction: float, scope: Scope
) -> dict[str, Tensor]:
    """New masks holding ``fraction`` of the N:M groups at N:M; groups once at N:M stay at N:M.

    A group's cost is the total score of the ``m − n`` weights it would lose; the cheapest groups are
    converted first, per layer (``scope="layer"``: the same fraction of every layer's groups) or over
    all layers (``"global"``). Within a converted group the ``n`` highest scores are kept.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: must be one of {SCOPES}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction}: must be in [0, 1]")
    masked = _masked_scores(scores, masks)
    grouped = {name: _groups(s, m) for name, s in masked.items()}
    keep_top = {name: _top_n_in_groups(g, n) for name, g in grouped.items()}
    held = {name: nm_groups_held(masks[name], n, m) for name in grouped}
    costs = {}
    for name, g in grouped.items():
        cost = torch.where(keep_top[name], torch.zeros_like(g), g).sum(dim=1)
        costs[name] = torch.where(held[name], torch.tensor(float("-inf"), device=g.device), cost)

    if scope == "layer":
        chosen = {
            name: lowest_k(c, max(round(fraction * c.numel()), int(held[name].sum()))) for name, c in costs.items()
        }
    else:
        names = list(costs)
        device = costs[names[0]].device
        flat = torch.cat([costs[name].to(device) for name in names])
        picked = lowest_k(flat, max(round(fraction * flat.numel()), sum(int(h.sum()) for h in held.values())))
        chosen, offset = {}, 0
        for name in names:
            size = costs[name].numel()
            chosen[name] = picked[offset : offset + size].to(costs[name].device)
            offset += size

    out = {}
    for name, g in grouped.items():
        group_mask = torch.where(chosen[name].unsqueeze(1), keep_top[name], torch.ones_like(g, dtype=torch.bool))
        out[name] = _ungroup(group_mask, masks[name].shape) & masks[name]
    return out
