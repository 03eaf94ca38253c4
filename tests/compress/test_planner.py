"""The order planner on synthetic pairwise results: precedences, order, cycles and their resolution, report."""

from __future__ import annotations

import json
import math

import pytest

from lightning_fisher.compress.planner import (
    RunRecord,
    decide_pairs,
    load_records,
    plan_from_records,
    topological_order,
)

# Accuracies of every ordered pair, shaped like the paper's finding: distill → prune → quantize → early_exit.
PAPER_LIKE = {
    ("distill", "prune"): 0.90, ("prune", "distill"): 0.85,
    ("distill", "quantize"): 0.91, ("quantize", "distill"): 0.86,
    ("distill", "early_exit"): 0.89, ("early_exit", "distill"): 0.84,
    ("prune", "quantize"): 0.92, ("quantize", "prune"): 0.90,
    ("prune", "early_exit"): 0.88, ("early_exit", "prune"): 0.87,
    ("quantize", "early_exit"): 0.93, ("early_exit", "quantize"): 0.925,
}
STAGES = ["early_exit", "quantize", "prune", "distill"]  # deliberately not the answer


def _records(accuracies: dict[tuple[str, ...], float], ratio: float = 10.0) -> list[RunRecord]:
    return [RunRecord(stages=k, accuracy=v, compression_ratio=ratio, bit_op_reduction=ratio) for k, v in accuracies.items()]


def test_order_follows_pairwise_accuracy():
    plan = plan_from_records(_records(PAPER_LIKE), stages=STAGES)
    assert plan.order == ("distill", "prune", "quantize", "early_exit")
    assert plan.cycles == []
    assert ("distill", "prune") in plan.edges and len(plan.edges) == 6
    decision = next(d for d in plan.decisions if {d.a, d.b} == {"prune", "quantize"})
    assert decision.first == "prune" and decision.margin == pytest.approx(0.02)


def test_unordered_stages_keep_the_candidate_order():
    # Only one precedence: b before a. c is free and stays where the candidate list puts it.
    records = _records({("b", "a"): 0.9, ("a", "b"): 0.8, ("a", "c"): 0.5, ("c", "a"): 0.5})
    plan = plan_from_records(records, stages=["a", "c", "b"])
    assert plan.edges == [("b", "a")]
    assert plan.order == ("c", "b", "a")
    tie = next(d for d in plan.decisions if {d.a, d.b} == {"a", "c"})
    assert tie.edge is None and "tie" in tie.note
    missing = next(d for d in plan.decisions if {d.a, d.b} == {"b", "c"})
    assert missing.edge is None and missing.note.startswith("missing run")


def test_cycle_is_reported_and_its_weakest_edge_dropped():
    # a > b by 5 points, b > c by 3, c > a by 1: a cycle; the weakest edge (c → a) goes.
    records = _records(
        {("a", "b"): 0.90, ("b", "a"): 0.85, ("b", "c"): 0.90, ("c", "b"): 0.87, ("c", "a"): 0.90, ("a", "c"): 0.89}
    )
    plan = plan_from_records(records, stages=["c", "b", "a"])
    assert len(plan.cycles) == 1
    cycle = plan.cycles[0]
    assert set(cycle.edges) == {("a", "b"), ("b", "c"), ("c", "a")}
    assert cycle.dropped == ("c", "a")
    assert plan.order == ("a", "b", "c")
    assert ("c", "a") not in plan.kept_edges and ("c", "a") in plan.edges
    text = plan.to_markdown()
    assert "dropped the weakest edge c → a" in text and "-.->|dropped|" in text


def test_two_cycles_are_both_broken():
    edges = [("a", "b"), ("b", "a2"), ("a2", "a"), ("c", "d"), ("d", "c")]
    margins = {("a", "b"): 0.3, ("b", "a2"): 0.2, ("a2", "a"): 0.1, ("c", "d"): 0.05, ("d", "c"): 0.5}
    order, kept, cycles = topological_order(["a", "a2", "b", "c", "d"], edges, margins)
    assert {c.dropped for c in cycles} == {("a2", "a"), ("c", "d")}
    assert order == ("a", "b", "a2", "d", "c")
    assert len(kept) == 3


def test_floor_metric_prefers_compression_among_orders_that_reach_it():
    records = [
        RunRecord(("p", "q"), accuracy=0.80, compression_ratio=40.0, bit_op_reduction=40.0),
        RunRecord(("q", "p"), accuracy=0.85, compression_ratio=20.0, bit_op_reduction=20.0),
        RunRecord(("p", "e"), accuracy=0.70, compression_ratio=40.0, bit_op_reduction=40.0),
        RunRecord(("e", "p"), accuracy=0.80, compression_ratio=10.0, bit_op_reduction=10.0),
        RunRecord(("q", "e"), accuracy=0.60, compression_ratio=10.0, bit_op_reduction=10.0),
        RunRecord(("e", "q"), accuracy=0.60, compression_ratio=12.0, bit_op_reduction=12.0),
    ]
    by_acc = {(d.a, d.b): d for d in decide_pairs(records, ["p", "q", "e"])}
    assert by_acc[("p", "q")].first == "q"  # higher accuracy
    by_floor = {(d.a, d.b): d for d in decide_pairs(records, ["p", "q", "e"], metric="compression", accuracy_floor=0.75)}
    assert by_floor[("p", "q")].first == "p" and by_floor[("p", "q")].margin == pytest.approx(math.log(2))
    assert by_floor[("p", "e")].first == "e" and math.isinf(by_floor[("p", "e")].margin)
    assert by_floor[("q", "e")].edge is None and by_floor[("q", "e")].note == "below floor"


def test_unequal_compression_is_flagged_and_seeds_are_averaged():
    records = [
        RunRecord(("p", "d"), accuracy=0.80, compression_ratio=4.0, bit_op_reduction=4.0),
        RunRecord(("d", "p"), accuracy=0.70, compression_ratio=20.0, bit_op_reduction=20.0),
        RunRecord(("d", "p"), accuracy=0.80, compression_ratio=20.0, bit_op_reduction=20.0),
    ]
    (decision,) = decide_pairs(records, ["d", "p"])
    assert decision.forward is not None and decision.forward.accuracy == pytest.approx(0.75)  # d → p, two seeds
    assert decision.first == "p" and decision.note == "unequal compression"


def test_final_record_and_files(tmp_path):
    accuracies = dict(PAPER_LIKE)
    accuracies[("distill", "prune", "quantize", "early_exit")] = 0.88
    for i, (stages, acc) in enumerate(accuracies.items()):
        (tmp_path / str(i)).mkdir()
        report = {"bits": 1e6, "compression_ratio": 12.0, "bit_ops": 2e9, "bit_op_reduction": 30.0}
        (tmp_path / str(i) / "compression.json").write_text(json.dumps({"stages": list(stages), "accuracy": acc, "report": report}))
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "compression.json").write_text("not read")
    records = load_records(tmp_path, exclude=["final"])
    assert len(records) == 13
    plan = plan_from_records(records, stages=STAGES, dense_accuracy=0.95)
    assert plan.final is not None and plan.final.accuracy == 0.88
    md, js = plan.write(tmp_path)
    data = json.loads(js.read_text())
    assert data["order"] == ["distill", "prune", "quantize", "early_exit"]
    assert data["final"]["bit_op_reduction"] == 30.0 and len(data["pairs"]) == 6
    text = md.read_text()
    assert "| distill → prune → quantize → early_exit | 0.8800 |" in text
    assert "distill → prune → quantize → early_exit" in text.split("## Chosen order")[1]


def test_report_without_final_run_names_the_command():
    plan = plan_from_records(_records(PAPER_LIKE), stages=STAGES)
    assert plan.final is None
    assert "stages=[distill,prune,quantize,early_exit]" in plan.to_markdown()


def test_bad_arguments():
    records = _records(PAPER_LIKE)
    with pytest.raises(ValueError, match="metric='speed': must be one of"):
        decide_pairs(records, metric="speed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="accuracy_floor=None: metric='compression' needs"):
        decide_pairs(records, metric="compression")
    with pytest.raises(ValueError, match="accuracy_floor=1.5"):
        decide_pairs(records, metric="compression", accuracy_floor=1.5)
    with pytest.raises(ValueError, match="compression_key='bits'"):
        decide_pairs(records, compression_key="bits")
    with pytest.raises(ValueError, match="tie_margin=-1"):
        decide_pairs(records, tie_margin=-1)
    with pytest.raises(ValueError, match=r"not among stages"):
        topological_order(["a"], [("a", "z")], {})
    with pytest.raises(ValueError, match="stages='ab'"):
        RunRecord.from_dict({"stages": "ab", "accuracy": 0.5})
    with pytest.raises(ValueError, match="no accuracy"):
        RunRecord.from_dict({"stages": ["a", "b"]})
