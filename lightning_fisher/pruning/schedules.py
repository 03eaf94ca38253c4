"""Pruning schedules: when to prune and to what level, as pure functions of the position.

A position is an integer count of epochs or of optimizer steps (the caller decides which); pruning
"at position t" means before training epoch/step t. The level is a sparsity for unstructured pruning,
or the fraction of groups held at N:M for N:M pruning.

- ``gradual`` (Zhu & Gupta 2017, "To prune, or not to prune"): prune at ``start``, ``start + frequency``,
  ... and at ``end``, to s_t = s_f + (s_i − s_f)(1 − (t − t0)/(t_end − t0))³; the final level is
  reached exactly at ``end``.
- ``one_shot``: prune once at ``start`` to the final level (``end`` is not used).
- ``iterative`` (Han et al. 2015, "Learning both weights and connections"): prune → retrain cycles every
  ``frequency`` positions from ``start``, each removing ``fraction`` of the weights that remain, until the
  final level is reached (the last cycle clips to it exactly; ``end`` is not used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "SCHEDULES",
    "UNITS",
    "Schedule",
    "ScheduleKind",
    "SchedulePosition",
    "Unit",
    "cubic_sparsity",
    "iterative_levels",
]

ScheduleKind = Literal["gradual", "one_shot", "iterative"]
SCHEDULES: tuple[str, ...] = ("gradual", "one_shot", "iterative")
Unit = Literal["epoch", "step"]
UNITS: tuple[str, ...] = ("epoch", "step")


def cubic_sparsity(t: float, initial: float, final: float, t0: float, t_end: float) -> float:
    """Zhu & Gupta's cubic ramp, ``initial`` at ``t0`` to ``final`` at ``t_end`` (clamped outside)."""
    if t_end <= t0:
        raise ValueError(f"t_end={t_end}: must be greater than t0={t0}")
    progress = min(max((t - t0) / (t_end - t0), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def iterative_levels(initial: float, final: float, fraction: float) -> list[float]:
    """Levels after each prune → retrain cycle: 1 − (1 − s)(1 − fraction) per cycle, the last clipped."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"iterative_fraction={fraction}: must be in (0, 1)")
    levels: list[float] = []
    level = initial
    while level < final - 1e-12:
        level = min(final, 1.0 - (1.0 - level) * (1.0 - fraction))
        if final - level < 1e-12:
            level = final
        levels.append(level)
    return levels


@dataclass(frozen=True)
class Schedule:
    """Where pruning happens and to which level; pure (no state), see the module docstring.

    Attributes:
        kind: ``"gradual"``, ``"one_shot"`` or ``"iterative"``.
        final: the level at the end (sparsity, or 1.0 = all groups at N:M).
        start: the first pruning position.
        end: the last position (``gradual`` only).
        frequency: positions between two prunes (``gradual`` and ``iterative``).
        initial: the level at ``start`` (``gradual``) or before the first cycle (``iterative``).
        fraction: fraction of what remains removed per cycle (``iterative``).
    """

    kind: ScheduleKind
    final: float
    start: int = 0
    end: int | None = None
    frequency: int = 1
    initial: float = 0.0
    fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule={self.kind!r}: must be one of {SCHEDULES}")
        if not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"start={self.start!r}: must be a non-negative integer")
        if not isinstance(self.frequency, int) or self.frequency < 1:
            raise ValueError(f"frequency={self.frequency!r}: must be a positive integer")
        if not 0.0 <= self.initial <= self.final:
            raise ValueError(f"initial_sparsity={self.initial}: must be in [0, final={self.final}]")
        if self.kind == "gradual":
            if self.end is None:
                raise ValueError(f"end=None: the gradual schedule needs an end greater than start={self.start}")
            if not isinstance(self.end, int) or self.end <= self.start:
                raise ValueError(f"end={self.end!r}: must be an integer greater than start={self.start}")
        if self.kind == "iterative":
            iterative_levels(self.initial, self.final, self.fraction)  # validates fraction

    def positions(self) -> list[int]:
        """Every position at which a prune happens, in order."""
        if self.kind == "one_shot":
            return [self.start]
        if self.kind == "iterative":
            return [self.start + i * self.frequency for i in range(len(self._levels()))]
        assert self.end is not None  # checked in __post_init__
        return [*range(self.start, self.end, self.frequency), self.end]

    def _levels(self) -> list[float]:
        return iterative_levels(self.initial, self.final, self.fraction)

    def latest_position(self, t: int) -> int | None:
        """The last prune position ≤ ``t`` (``None`` before the first); constant time for gradual."""
        if t < self.start:
            return None
        if self.kind == "one_shot":
            return self.start
        if self.kind == "gradual":
            assert self.end is not None
            if t >= self.end:
                return self.end
            return self.start + (t - self.start) // self.frequency * self.frequency
        cycles = len(self._levels())
        if cycles == 0:
            return None
        return self.start + min((t - self.start) // self.frequency, cycles - 1) * self.frequency

    def level_at(self, t: int) -> float:
        """The level the masks hold from position ``t`` on: that of the latest prune, 0 before any."""
        latest = self.latest_position(t)
        if latest is None:
            return 0.0
        if self.kind == "one_shot":
            return self.final
        if self.kind == "gradual":
            assert self.end is not None
            return cubic_sparsity(latest, self.initial, self.final, self.start, self.end)
        return self._levels()[(latest - self.start) // self.frequency]

    @property
    def last(self) -> int:
        """The final prune position (the schedule is complete from there on)."""
        positions = self.positions()
        return positions[-1] if positions else self.start


@dataclass
class SchedulePosition:
    """The one piece of schedule state: the position of the last prune done (``None``: none yet)."""

    last_pruned: int | None = None
    num_prunes: int = 0

    def due(self, schedule: Schedule, t: int) -> int | None:
        """The prune position to act on at ``t`` (the latest one not yet done), or ``None``."""
        latest = schedule.latest_position(t)
        if latest is None or (self.last_pruned is not None and latest <= self.last_pruned):
            return None
        return latest

    def advance(self, position: int) -> None:
        self.last_pruned = position
        self.num_prunes += 1

    def state_dict(self) -> dict[str, Any]:
        return {"last_pruned": self.last_pruned, "num_prunes": self.num_prunes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_pruned = state["last_pruned"]
        self.num_prunes = int(state["num_prunes"])

