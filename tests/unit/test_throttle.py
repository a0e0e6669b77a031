"""The client-side rate limit (runtime/throttle.py) with a clock the test moves."""

from __future__ import annotations

import pytest

from meridio_debug.controller.runtime.throttle import Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_goes_at_once_then_requests_are_spaced_by_the_rate() -> None:
    clock = Clock()
    t = Throttle(qps=50, burst=300, clock=clock)
    assert [t.reserve() for _ in range(300)] == [0.0] * 300
    waits = [t.reserve() for _ in range(3)]
    assert waits == pytest.approx([0.02, 0.04, 0.06])


def test_tokens_come_back_with_time_up_to_the_burst() -> None:
    clock = Clock()
    t = Throttle(qps=10, burst=5, clock=clock)
    for _ in range(5):
        t.reserve()
    clock.now += 0.3  # three tokens back
    assert [t.reserve() for _ in range(4)] == pytest.approx([0.0, 0.0, 0.0, 0.1])
    clock.now += 3600  # never more than the burst
    assert sum(1 for _ in range(6) if t.reserve() == 0.0) == 5


def test_nonsense_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="qps"):
        Throttle(qps=0)
