"""The request budget: never more than N requests in any window of S seconds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hepsub_apiban.core.config import RateLimit
from hepsub_apiban.core.ratelimit import Budget

from .conftest import ManualClock


def test_sliding_window_refills_as_old_requests_age_out() -> None:
    clock = ManualClock(0.0)
    budget = Budget(RateLimit(3, 10.0), clock)
    assert [budget.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert budget.used() == 3
    assert budget.wait_time() == 10.0
    clock.advance(9.999)
    assert not budget.try_acquire()
    clock.advance(0.001)
    assert budget.try_acquire()
    assert budget.used() == 1


def test_block_for_stops_everything_until_it_ends() -> None:
    clock = ManualClock(0.0)
    budget = Budget(RateLimit(11, 120.0), clock)
    budget.block_for(120.0)
    assert not budget.try_acquire()
    assert budget.wait_time() == 120.0
    clock.advance(120.0)
    assert budget.try_acquire()


@given(
    limit=st.integers(min_value=1, max_value=12),
    window=st.floats(min_value=0.5, max_value=200.0),
    gaps=st.lists(st.floats(min_value=0.0, max_value=30.0), max_size=300),
)
def test_no_window_ever_holds_more_than_the_limit(limit: int, window: float, gaps: list[float]) -> None:
    clock = ManualClock(0.0)
    budget = Budget(RateLimit(limit, window), clock)
    sent: list[float] = []
    for gap in gaps:
        clock.advance(gap)
        if budget.try_acquire():
            sent.append(clock.now)
    for i, start in enumerate(sent):
        inside = [t for t in sent[i:] if t < start + window]
        assert len(inside) <= limit


def test_reserve_keeps_requests_of_the_window_for_others() -> None:
    clock = ManualClock(0.0)
    budget = Budget(RateLimit(3, 10.0), clock)
    assert budget.try_acquire()
    clock.advance(1)
    assert budget.try_acquire()
    assert budget.wait_time(reserve=1) == 9.0  # 2 of 3 spent: only the reserved one is left
    assert budget.wait_time() == 0.0
    assert budget.try_acquire()
    assert budget.wait_time(reserve=1) == 10.0  # the second must age out, at t=11
