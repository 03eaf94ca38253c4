"""Order of compression: pairwise precedences from runs, a precedence graph, a topological order.

Implements the planning step of "Order of Compression" (Shen et al., arXiv 2403.17447): every pair of
stages {a, b} is run in both orders (a → b and b → a, each a two-stage chain from the same dense model),
the better order sets the edge "a before b" of a precedence graph, and a topological sort of the graph
(``graphlib.TopologicalSorter``) is the chosen order of the whole chain.

Deciding a pair (``metric``):

- ``"accuracy"`` (default), accuracy at equal compression: both orders use the same per-stage settings
  (same sparsity, bit width, rank, student width), so their compression is nominally equal and the order
  with the higher accuracy goes first. Margin: the accuracy difference. When the two orders' compression
  (``compression_key``) differ by more than ``compression_tolerance`` (relative), the pair is flagged
  ``unequal compression`` in the report (a distillation after pruning, for example, trains a fresh dense
  student and loses the pruning), since the comparison is then not at equal compression.
- ``"compression"``, compression at an accuracy floor: orders below ``accuracy_floor`` are out; of those
  left, the one with the larger ``compression_key`` goes first. Margin: ``|ln(c_ab / c_ba)|`` when both
  pass, ``inf`` when only one does; when neither passes the pair has no edge (``below floor``).

A margin at or below ``tie_margin`` is a tie: no edge. A pair with a missing order has no edge. Several
runs of the same ordered pair (seeds) are averaged.

Cycles: the precedences need not be transitive. When the graph has a cycle, the cycle that
``graphlib`` reports is recorded with its edges, and its weakest edge (smallest margin; ties go to the
alphabetically first edge) is dropped; this repeats until the graph is acyclic. Stages with no
precedence between them are ordered as they come in ``stages`` (the candidate list), so the result is
deterministic.

This module is plain Python (no torch): it works on the ``compression.json`` records the pipeline writes.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "check_rule",
    "COMPRESSION_KEYS",
    "CycleResolution",
    "METRICS",
    "OrderPlan",
    "PairDecision",
    "RunRecord",
    "decide_pairs",
    "load_records",
    "plan_order",
    "plan_from_records",
    "topological_order",
]

log = logging.getLogger(__name__)

Metric = Literal["accuracy", "compression"]
METRICS: tuple[str, ...] = ("accuracy", "compression")
COMPRESSION_KEYS: tuple[str, ...] = ("bit_op_reduction", "compression_ratio")
RECORD_FILENAME = "compression.json"


@dataclass(frozen=True)
class RunRecord:
    """One pipeline run: its stages in order and what came out (from a ``compression.json``)."""

    stages: tuple[str, ...]
    accuracy: float
    compression_ratio: float
    bit_op_reduction: float
    bits: float | None = None
    bit_ops: float | None = None
    source: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> RunRecord:
        """Reads the pipeline's ``compression.json`` layout (``stages``, ``accuracy``, ``report``)."""
        report = data.get("report") or {}
        accuracy = data.get("accuracy", report.get("accuracy"))
        if accuracy is None:
            raise ValueError(f"{source or 'record'}: no accuracy in {sorted(data)}")
        stages = data.get("stages")
        if not isinstance(stages, (list, tuple)) or not all(isinstance(s, str) for s in stages):
            raise ValueError(f"{source or 'record'}: stages={stages!r}: must be a list of stage names")
        return cls(
            stages=tuple(stages),
            accuracy=float(accuracy),
            compression_ratio=float(report.get("compression_ratio", 1.0)),
            bit_op_reduction=float(report.get("bit_op_reduction", 1.0)),
            bits=_float_or_none(report.get("bits")),
            bit_ops=_float_or_none(report.get("bit_ops")),
            source=source,
        )

    def compression(self, key: str) -> float:
        return float(getattr(self, key))


@dataclass(frozen=True)
class PairDecision:
    """The verdict on one unordered pair of stages.

    ``first``/``second`` name the winning order (``None`` when there is no edge: tie, missing order or,
    with the floor metric, neither order reaching it); ``margin`` is how clearly it won (see the module
    docstring); ``forward``/``backward`` are the averaged records of ``a → b`` and ``b → a``.
    """

    a: str
    b: str
    forward: RunRecord | None
    backward: RunRecord | None
    first: str | None
    second: str | None
    margin: float
    note: str = ""

    @property
    def edge(self) -> tuple[str, str] | None:
        return None if self.first is None or self.second is None else (self.first, self.second)


@dataclass(frozen=True)
class CycleResolution:
    """A cycle found in the precedence graph (its edges, in cycle order) and the edge dropped to break it."""

    edges: tuple[tuple[str, str], ...]
    margins: tuple[float, ...]
    dropped: tuple[str, str]


@dataclass
class OrderPlan:
    """Everything the order search decided: pairwise table, graph, cycles, chosen order, final run."""

    stages: tuple[str, ...]
    metric: str
    compression_key: str
    accuracy_floor: float | None
    decisions: list[PairDecision]
    edges: list[tuple[str, str]]
    kept_edges: list[tuple[str, str]]
    cycles: list[CycleResolution]
    order: tuple[str, ...]
    final: RunRecord | None = None
    dense_accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def margin(self, edge: tuple[str, str]) -> float:
        return next(d.margin for d in self.decisions if d.edge == edge)

    # ------------------------------------------------------------ exports
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "stages": list(self.stages),
            "metric": self.metric,
            "compression_key": self.compression_key,
            "accuracy_floor": self.accuracy_floor,
            "pairs": [
                {
                    "a": d.a,
                    "b": d.b,
                    "forward": _record_dict(d.forward),
                    "backward": _record_dict(d.backward),
                    "first": d.first,
                    "second": d.second,
                    "margin": _json_float(d.margin),
                    "note": d.note,
                }
                for d in self.decisions
            ],
            "edges": [list(e) for e in self.edges],
            "kept_edges": [list(e) for e in self.kept_edges],
            "cycles": [
                {"edges": [list(e) for e in c.edges], "margins": [_json_float(m) for m in c.margins], "dropped": list(c.dropped)}
                for c in self.cycles
            ],
            "order": list(self.order),
            "final": _record_dict(self.final),
            "dense_accuracy": self.dense_accuracy,
            **self.extra,
        }

    def to_markdown(self) -> str:
        lines = ["# Order of compression", ""]
        rule = (
            "accuracy at equal compression (higher accuracy goes first)"
            if self.metric == "accuracy"
            else f"{self.compression_key} at an accuracy floor of {self.accuracy_floor} (larger goes first)"
        )
        lines += [f"Candidate stages: {', '.join(self.stages)}. Pair decided by {rule}.", ""]
        if self.dense_accuracy is not None:
            lines += [f"Dense model accuracy: {self.dense_accuracy:.4f}.", ""]
        lines += ["## Pairwise table", ""]
        lines += [
            "| pair | a → b acc | a → b bit-op red. | a → b size red. | b → a acc | b → a bit-op red. | b → a size red. "
            "| goes first | margin | note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for d in self.decisions:
            cells = [f"{d.a} / {d.b}"]
            for rec in (d.forward, d.backward):
                cells += (
                    ["missing", "", ""]
                    if rec is None
                    else [f"{rec.accuracy:.4f}", f"{rec.bit_op_reduction:.1f}×", f"{rec.compression_ratio:.1f}×"]
                )
            cells += [d.first or "—", _format_margin(d.margin, self.metric), d.note]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "## Precedence graph", ""]
        if self.edges:
            lines += ["```mermaid", "graph LR"]
            dropped = {c.dropped for c in self.cycles}
            for first, second in self.edges:
                arrow = "-.->|dropped|" if (first, second) in dropped else "-->"
                lines.append(f"  {first} {arrow} {second}")
            lines += ["```", ""]
            for first, second in self.edges:
                lines.append(f"- {first} → {second} (margin {_format_margin(self.margin((first, second)), self.metric)})")
        else:
            lines.append("No precedences: every pair tied or is missing a run.")
        lines += ["", "## Cycles", ""]
        if self.cycles:
            for cycle in self.cycles:
                path = " → ".join([cycle.edges[0][0], *(e[1] for e in cycle.edges)])
                margins = ", ".join(_format_margin(m, self.metric) for m in cycle.margins)
                lines.append(
                    f"- cycle {path} (margins {margins}): dropped the weakest edge {cycle.dropped[0]} → {cycle.dropped[1]}"
                )
        else:
            lines.append("None: the precedences are consistent.")
        lines += ["", "## Chosen order", "", " → ".join(self.order) if self.order else "(no stages)", ""]
        lines += ["## Final model", ""]
        if self.final is None:
            lines.append(
                "Not run. Run the chosen chain with "
                f"`lightning-fisher recipe=cifar10_resnet18_compress stages=[{','.join(self.order)}]`."
            )
        else:
            lines += [
                "| stages | accuracy | size (bits) | size reduction | bit-ops / sample | bit-op reduction |",
                "|---|---|---|---|---|---|",
                f"| {' → '.join(self.final.stages)} | {self.final.accuracy:.4f} | {_format_number(self.final.bits)} "
                f"| {self.final.compression_ratio:.1f}× | {_format_number(self.final.bit_ops)} "
                f"| {self.final.bit_op_reduction:.1f}× |",
            ]
        return "\n".join(lines) + "\n"

    def write(self, directory: str | Path, stem: str = "order_report") -> tuple[Path, Path]:
        """Writes ``<stem>.md`` and ``<stem>.json`` into ``directory``; returns both paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        md, js = directory / f"{stem}.md", directory / f"{stem}.json"
        md.write_text(self.to_markdown())
        js.write_text(json.dumps(self.to_dict(), indent=2))
        return md, js


# ---------------------------------------------------------------- loading
def load_records(root: str | Path, exclude: Iterable[str] = ()) -> list[RunRecord]:
    """Every ``compression.json`` under ``root`` (recursively), skipping sub-folders named in ``exclude``."""
    root = Path(root)
    excluded = set(exclude)
    records = []
    for path in sorted(root.rglob(RECORD_FILENAME)):
        if excluded & set(path.relative_to(root).parts[:-1]):
            continue
        records.append(RunRecord.from_dict(json.loads(path.read_text()), source=str(path)))
    return records


# --------------------------------------------------------------- deciding
def decide_pairs(
    records: Sequence[RunRecord],
    stages: Sequence[str] | None = None,
    metric: Metric = "accuracy",
    accuracy_floor: float | None = None,
    compression_key: str = "bit_op_reduction",
    tie_margin: float = 0.0,
    compression_tolerance: float = 0.1,
) -> list[PairDecision]:
    """One :class:`PairDecision` per unordered pair of ``stages`` (default: every stage in a two-stage record)."""
    check_rule(metric, accuracy_floor, compression_key, tie_margin)
    if compression_tolerance < 0:
        raise ValueError(f"compression_tolerance={compression_tolerance!r}: must be >= 0")
    by_order: dict[tuple[str, str], list[RunRecord]] = {}
    for record in records:
        if len(record.stages) == 2 and record.stages[0] != record.stages[1]:
            by_order.setdefault((record.stages[0], record.stages[1]), []).append(record)
    if stages is None:
        stages = _unique([s for order in sorted(by_order) for s in order])
    decisions = []
    for a, b in itertools.combinations(stages, 2):
        forward = _average(by_order.get((a, b), []))
        backward = _average(by_order.get((b, a), []))
        decisions.append(
            _decide(a, b, forward, backward, metric, accuracy_floor, compression_key, tie_margin, compression_tolerance)
        )
    return decisions


def _decide(
    a: str,
    b: str,
    forward: RunRecord | None,
    backward: RunRecord | None,
    metric: str,
    floor: float | None,
    key: str,
    tie_margin: float,
    tolerance: float,
) -> PairDecision:
    def verdict(winner_forward: bool | None, margin: float, note: str = "") -> PairDecision:
        if winner_forward is None:
            return PairDecision(a, b, forward, backward, None, None, margin, note)
        first, second = (a, b) if winner_forward else (b, a)
        return PairDecision(a, b, forward, backward, first, second, margin, note)

    if forward is None or backward is None:
        missing = f"{a} → {b}" if forward is None else f"{b} → {a}"
        return verdict(None, 0.0, f"missing run: {missing}")
    if metric == "accuracy":
        margin = abs(forward.accuracy - backward.accuracy)
        c_f, c_b = forward.compression(key), backward.compression(key)
        note = "unequal compression" if abs(c_f - c_b) > tolerance * max(abs(c_f), abs(c_b), 1e-12) else ""
        if margin <= tie_margin:
            return verdict(None, margin, _join("tie", note))
        return verdict(forward.accuracy > backward.accuracy, margin, note)
    assert floor is not None  # check_rule guarantees it
    passes_f, passes_b = forward.accuracy >= floor, backward.accuracy >= floor
    if not passes_f and not passes_b:
        return verdict(None, 0.0, "below floor")
    if passes_f != passes_b:
        return verdict(passes_f, math.inf, "only one order reaches the floor")
    c_f, c_b = forward.compression(key), backward.compression(key)
    margin = abs(math.log(c_f / c_b)) if c_f > 0 and c_b > 0 else abs(c_f - c_b)
    if margin <= tie_margin:
        return verdict(None, margin, "tie")
    return verdict(c_f > c_b, margin)


# ---------------------------------------------------------------- sorting
def topological_order(
    stages: Sequence[str], edges: Iterable[tuple[str, str]], margins: Mapping[tuple[str, str], float]
) -> tuple[tuple[str, ...], list[tuple[str, str]], list[CycleResolution]]:
    """Sorts ``stages`` under ``edges`` (``(first, second)``), breaking cycles by the weakest-margin rule.

    Returns the order, the edges kept, and one :class:`CycleResolution` per cycle broken. Stages that
    no edge orders keep their relative position in ``stages``.
    """
    edges = set(edges)
    unknown = {s for e in edges for s in e} - set(stages)
    if unknown:
        raise ValueError(f"edges name stages {sorted(unknown)} that are not among stages={list(stages)}")
    stages = list(stages)
    kept = sorted(edges, key=lambda e: (stages.index(e[0]), stages.index(e[1])))
    cycles: list[CycleResolution] = []
    while True:
        sorter = TopologicalSorter({s: {f for f, t in kept if t == s} for s in stages})
        try:
            sorter.prepare()
        except CycleError as error:
            nodes = error.args[1]  # [n0, n1, ..., n0]: each node is a predecessor of the next
            cycle_edges = tuple(zip(nodes[:-1], nodes[1:]))
            cycle_margins = tuple(margins.get(e, 0.0) for e in cycle_edges)
            dropped = min(zip(cycle_margins, cycle_edges))[1]
            cycles.append(CycleResolution(cycle_edges, cycle_margins, dropped))
            log.warning(
                "precedence cycle %s: dropping the weakest edge %s -> %s (margin %s)",
                " -> ".join(nodes), dropped[0], dropped[1], margins.get(dropped, 0.0),
            )
            kept.remove(dropped)
            continue
        break
    # graphlib hands out each ready stage once; keep them in `ready` and take the best-ranked one at a
    # time, so that a stage freed by it competes with the others by its position in `stages`.
    rank = {s: i for i, s in enumerate(stages)}
    order: list[str] = []
    ready: set[str] = set()
    while sorter.is_active():
        ready.update(sorter.get_ready())
        first = min(ready, key=rank.__getitem__)
        ready.remove(first)
        order.append(first)
        sorter.done(first)
    return tuple(order), kept, cycles


def plan_order(
    decisions: Sequence[PairDecision],
    stages: Sequence[str],
    metric: Metric = "accuracy",
    accuracy_floor: float | None = None,
    compression_key: str = "bit_op_reduction",
) -> OrderPlan:
    """Builds the precedence graph of ``decisions`` and sorts it (see :func:`topological_order`)."""
    edges = [d.edge for d in decisions if d.edge is not None]
    margins = {d.edge: d.margin for d in decisions if d.edge is not None}
    order, kept, cycles = topological_order(stages, edges, margins)
    return OrderPlan(
        stages=tuple(stages),
        metric=metric,
        compression_key=compression_key,
        accuracy_floor=accuracy_floor,
        decisions=list(decisions),
        edges=sorted(edges, key=lambda e: (stages.index(e[0]), stages.index(e[1]))),
        kept_edges=kept,
        cycles=cycles,
        order=order,
    )


def plan_from_records(
    records: Sequence[RunRecord],
    stages: Sequence[str] | None = None,
    metric: Metric = "accuracy",
    accuracy_floor: float | None = None,
    compression_key: str = "bit_op_reduction",
    tie_margin: float = 0.0,
    compression_tolerance: float = 0.1,
    dense_accuracy: float | None = None,
) -> OrderPlan:
    """Pairwise decisions, graph and order from run records; ``final`` is the record of the chosen chain, if any."""
    pair_stages = [s for r in records if len(r.stages) == 2 for s in r.stages]
    if stages is None:
        stages = _unique(pair_stages)
    decisions = decide_pairs(
        records, stages, metric, accuracy_floor, compression_key, tie_margin, compression_tolerance
    )
    plan = plan_order(decisions, stages, metric, accuracy_floor, compression_key)
    plan.final = _average([r for r in records if r.stages == plan.order])
    plan.dense_accuracy = dense_accuracy
    return plan


# ---------------------------------------------------------------- helpers
def check_rule(metric: str, accuracy_floor: float | None, compression_key: str, tie_margin: float = 0.0) -> None:
    """Validate a decision rule (metric, floor, compression key, tie margin); raises ``ValueError``."""
    if tie_margin < 0:
        raise ValueError(f"tie_margin={tie_margin!r}: must be >= 0")
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: must be one of {METRICS}")
    if compression_key not in COMPRESSION_KEYS:
        raise ValueError(f"compression_key={compression_key!r}: must be one of {COMPRESSION_KEYS}")
    if metric == "compression" and accuracy_floor is None:
        raise ValueError("accuracy_floor=None: metric='compression' needs an accuracy floor in [0, 1]")
    if accuracy_floor is not None and not 0.0 <= accuracy_floor <= 1.0:
        raise ValueError(f"accuracy_floor={accuracy_floor!r}: must be in [0, 1]")


def _average(records: Sequence[RunRecord]) -> RunRecord | None:
    if not records:
        return None
    if len(records) == 1:
        return records[0]

    def mean(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]

    return RunRecord(
        stages=records[0].stages,
        accuracy=sum(r.accuracy for r in records) / len(records),
        compression_ratio=sum(r.compression_ratio for r in records) / len(records),
        bit_op_reduction=sum(r.bit_op_reduction for r in records) / len(records),
        bits=mean([r.bits for r in records]),
        bit_ops=mean([r.bit_ops for r in records]),
        source=f"mean of {len(records)} runs",
    )


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _json_float(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


def _record_dict(record: RunRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {
        "stages": list(record.stages),
        "accuracy": record.accuracy,
        "compression_ratio": record.compression_ratio,
        "bit_op_reduction": record.bit_op_reduction,
        "bits": record.bits,
        "bit_ops": record.bit_ops,
        "source": record.source,
    }


def _format_margin(margin: float, metric: str) -> str:
    if math.isinf(margin):
        return "∞"
    return f"{100 * margin:.2f} pts" if metric == "accuracy" else f"{margin:.3f} (ln ratio)"


def _format_number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3e}"
