"""Argument checks shared by the DataModules, raising ``ValueError("name=value: rule")``."""

from __future__ import annotations

from typing import Any

__all__ = ["check_bool", "check_int"]


def check_int(name: str, value: Any, minimum: int, none_ok: bool = False) -> None:
    """Raises unless ``value`` is an int (not a bool) ``>= minimum``, or ``None`` when ``none_ok``."""
    if value is None and none_ok:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        rule = f"must be an integer >= {minimum}" + (" or None" if none_ok else "")
        raise ValueError(f"{name}={value!r}: {rule}")


def check_bool(name: str, value: Any) -> None:
    """Raises unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: must be True or False")
