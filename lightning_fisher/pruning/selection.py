"""Which parameters of a model are pruned: Conv2d and Linear weights, filtered by name patterns.

Parameters are named by their fully qualified name (FQN) in the model, with any ``_orig_mod.`` segment
that ``torch.compile`` inserts removed, so a compiled and an uncompiled model give the same names.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence

from torch import nn

__all__ = ["DEFAULT_MODULE_TYPES", "clean_fqn", "select_parameters"]

log = logging.getLogger(__name__)

DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
_COMPILE_SEGMENT = "_orig_mod"


def clean_fqn(name: str) -> str:
    """``name`` without the ``_orig_mod`` segments ``torch.compile`` adds (``net._orig_mod.fc`` → ``net.fc``)."""
    return ".".join(part for part in name.split(".") if part != _COMPILE_SEGMENT)


def _matches(patterns: Sequence[str], module_fqn: str, param_fqn: str) -> list[str]:
    return [p for p in patterns if fnmatch.fnmatchcase(module_fqn, p) or fnmatch.fnmatchcase(param_fqn, p)]


def select_parameters(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    keep_first_dense: bool = True,
    keep_last_dense: bool = True,
    module_types: tuple[type[nn.Module], ...] = DEFAULT_MODULE_TYPES,
) -> dict[str, nn.Parameter]:
    """The prunable weights of ``model`` as ``{fqn: parameter}``, in module order.

    Candidates are the ``weight`` of every module of ``module_types`` (Conv2d and Linear by default).
    A pattern (``fnmatch`` syntax, case-sensitive) selects a weight when it matches either its module's
    FQN (``net.layer1.0.conv1``) or the parameter's FQN (``net.layer1.0.conv1.weight``).

    Args:
        model: the network (a compiled one works too; names drop ``_orig_mod``).
        include: keep only candidates matching at least one pattern; ``None`` keeps all. A pattern
            that matches no candidate is an error (a typo would otherwise prune nothing, silently).
        exclude: drop candidates matching any pattern.
        keep_first_dense: leave the first candidate module in ``named_modules`` order (the stem,
            which sees the input) dense, even when ``include`` matches it.
        keep_last_dense: leave the last ``nn.Linear`` (the classifier) dense, even when ``include``
            matches it.
        module_types: the module classes whose ``weight`` may be pruned.

    Raises:
        ValueError: an ``include`` pattern matches nothing, or nothing is left to prune.
    """
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError(f"include={include!r}, exclude={exclude!r}: must be lists of patterns, not strings")
    candidates: dict[str, tuple[str, nn.Parameter, nn.Module]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, module_types):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) in seen:
            continue
        seen.add(id(weight))
        module_fqn = clean_fqn(module_name)
        candidates[f"{module_fqn}.weight" if module_fqn else "weight"] = (module_fqn, weight, module)
    if not candidates:
        raise ValueError(f"model {type(model).__name__} has no {_type_names(module_types)} weights to prune")

    dense: set[str] = set()
    names = list(candidates)
    if keep_first_dense:
        dense.add(names[0])
    if keep_last_dense:
        linears = [n for n in names if isinstance(candidates[n][2], nn.Linear)]
        if linears:
            dense.add(linears[-1])

    selected = dict.fromkeys(names)
    if include is not None:
        include = list(include)
        used: set[str] = set()
        keep = {}
        for name in names:
            hits = _matches(include, candidates[name][0], name)
            used.update(hits)
            if hits:
                keep[name] = None
        unused = [p for p in include if p not in used]
        if unused:
            raise ValueError(
                f"include={unused!r}: matches no {_type_names(module_types)} module or weight; "
                f"candidates are {names}"
            )
        selected = keep
    exclude = list(exclude)
    result = {
        name: candidates[name][1]
        for name in selected
        if name not in dense and not _matches(exclude, candidates[name][0], name)
    }
    if not result:
        raise ValueError(
            f"include={include!r}, exclude={exclude!r}, keep_first_dense={keep_first_dense}, "
            f"keep_last_dense={keep_last_dense}: leave no weight to prune among {names}"
        )
    log.debug("prunable parameters: %s (dense by default: %s)", list(result), sorted(dense))
    return result


def _type_names(module_types: tuple[type[nn.Module], ...]) -> str:
    return "/".join(t.__name__ for t in module_types)
