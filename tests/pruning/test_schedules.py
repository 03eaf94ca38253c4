import pytest

from lightning_fisher.pruning.schedules import Schedule, SchedulePosition, cubic_sparsity, iterative_levels


def test_cubic_sparsity_by_hand():
    # s_t = 0.8 + (0 - 0.8)(1 - t/10)^3
    assert cubic_sparsity(0, 0.0, 0.8, 0, 10) == 0.0
    assert cubic_sparsity(5, 0.0, 0.8, 0, 10) == pytest.approx(0.8 * (1 - 0.125))  # 0.7
    assert cubic_sparsity(2, 0.0, 0.8, 0, 10) == pytest.approx(0.8 * (1 - 0.512))  # 0.3904
    assert cubic_sparsity(10, 0.0, 0.8, 0, 10) == 0.8
    assert cubic_sparsity(14, 0.1, 0.8, 4, 14) == 0.8
    assert cubic_sparsity(4, 0.1, 0.8, 4, 14) == pytest.approx(0.1)
    assert cubic_sparsity(-3, 0.1, 0.8, 4, 14) == pytest.approx(0.1)  # clamped before t0


def test_gradual_positions_end_exactly_at_end():
    s = Schedule("gradual", final=0.9, start=2, end=9, frequency=3)
    assert s.positions() == [2, 5, 8, 9]
    assert [s.latest_position(t) for t in (0, 1, 2, 4, 5, 8, 9, 30)] == [None, None, 2, 2, 5, 8, 9, 9]
    assert s.level_at(1) == 0.0
    assert s.level_at(6) == pytest.approx(cubic_sparsity(5, 0.0, 0.9, 2, 9))
    assert s.level_at(9) == 0.9 and s.level_at(100) == 0.9


def test_one_shot_prunes_once_at_start():
    s = Schedule("one_shot", final=0.5, start=3)
    assert s.positions() == [3]
    assert (s.level_at(2), s.level_at(3), s.level_at(50)) == (0.0, 0.5, 0.5)


def test_iterative_removes_a_fraction_of_what_remains_and_clips():
    assert iterative_levels(0.0, 0.8, 0.5) == pytest.approx([0.5, 0.75, 0.8])
    s = Schedule("iterative", final=0.8, start=1, frequency=2, fraction=0.5)
    assert s.positions() == [1, 3, 5]
    assert [s.level_at(t) for t in (0, 1, 2, 3, 5, 9)] == pytest.approx([0.0, 0.5, 0.5, 0.75, 0.8, 0.8])
    # 95% at 20% per cycle: 1 - 0.8^k >= 0.95 first at k = 14, and the last level is exactly 0.95
    levels = iterative_levels(0.0, 0.95, 0.2)
    assert len(levels) == 14 and levels[-1] == 0.95 and levels[-2] < 0.95


def test_position_tracks_the_latest_undone_prune():
    s = Schedule("gradual", final=0.9, start=0, end=4, frequency=2)
    pos = SchedulePosition()
    assert pos.due(s, 0) == 0
    pos.advance(0)
    assert pos.due(s, 0) is None and pos.due(s, 1) is None
    assert pos.due(s, 3) == 2  # catches up to the latest position
    pos.advance(2)
    restored = SchedulePosition()
    restored.load_state_dict(pos.state_dict())
    assert restored == pos and restored.due(s, 4) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kind="cubic", final=0.5), r"schedule='cubic': must be one of"),
        (dict(kind="gradual", final=0.5, start=0, end=None), r"end=None: the gradual schedule needs"),
        (dict(kind="gradual", final=0.5, start=5, end=5), r"end=5: must be an integer greater than start=5"),
        (dict(kind="gradual", final=0.5, start=-1, end=5), r"start=-1: must be a non-negative"),
        (dict(kind="gradual", final=0.5, end=5, frequency=0), r"frequency=0: must be a positive"),
        (dict(kind="iterative", final=0.5, fraction=1.0), r"iterative_fraction=1.0: must be in \(0, 1\)"),
        (dict(kind="gradual", final=0.5, end=5, initial=0.6), r"initial_sparsity=0.6"),
    ],
)
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


def test_cubic_needs_an_interval():
    with pytest.raises(ValueError, match="t_end=3: must be greater than t0=3"):
        cubic_sparsity(3, 0.0, 0.5, 3, 3)
