"""FakeClock: advancing time wakes waiters, even right before they wait."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from support import HANG_GUARD

import stagehand
from stagehand import FakeClock, testing


def test_advance_moves_both_clocks() -> None:
    clock = FakeClock(datetime(2026, 5, 1, 12, 0, tzinfo=UTC))
    clock.advance(90)

    assert clock.monotonic() == 90.0
    assert clock.now() == datetime(2026, 5, 1, 12, 1, 30, tzinfo=UTC)


def test_advance_between_read_and_wait() -> None:
    # The advance lands after the caller read the time and before its first
    # wait on a new condition: the wait must return instead of hanging.
    clock = FakeClock()
    condition = threading.Condition()
    returned = threading.Event()

    def caller() -> None:
        with condition:
            remaining = 5 - clock.monotonic()
            advancer = threading.Thread(target=clock.advance, args=(5,))
            advancer.start()
            advancer.join(30)
            clock.wait(condition, remaining)
        returned.set()

    threading.Thread(target=caller, daemon=True).start()

    assert returned.wait(30)
    assert clock.monotonic() == 5.0


def test_waiter_wakes_on_advance() -> None:
    clock = FakeClock()
    condition = threading.Condition()
    waiting = threading.Event()
    woke = threading.Event()

    def waiter() -> None:
        with condition:
            deadline = clock.monotonic() + 10
            while clock.monotonic() < deadline:
                waiting.set()
                clock.wait(condition, deadline - clock.monotonic())
        woke.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    assert waiting.wait(30)
    clock.advance(4)
    clock.advance(6)
    thread.join(30)

    assert woke.is_set()


@pytest.mark.parametrize("bad", [-1, "5", True])
def test_advance_rejects_bad_seconds(bad: object) -> None:
    clock = FakeClock()
    with pytest.raises((TypeError, ValueError)):
        clock.advance(bad)  # type: ignore[arg-type]

    assert clock.monotonic() == 0.0


def test_set_rejects_past_and_naive() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="cannot go back"):
        clock.set(datetime(2025, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="aware datetime"):
        clock.set(datetime(2027, 1, 1))
    with pytest.raises(ValueError, match="aware datetime"):
        FakeClock(datetime(2026, 1, 1))


def test_set_reaches_a_due_time_exactly() -> None:
    # A delay that rounds down to the microsecond: the datetime of the due
    # time is a little earlier than the delay, and set() must still reach it.
    clock = FakeClock()
    for delay in (15.0000004, 0.1, 1 / 3, 86_400.00000049):
        when = clock.now() + timedelta(seconds=delay)
        due = clock.due(when, clock.monotonic(), delay)
        clock.set(when)
        assert clock.now() == when
        assert clock.monotonic() >= due


class _RetryOnce(stagehand.Worker):
    max_attempts = 2

    def backoff(self, job: stagehand.Job) -> float:
        return 15.0000004  # rounds down to the microsecond

    def perform(self, job: stagehand.Job) -> None:
        if job.attempt == 1:
            raise RuntimeError("first attempt fails")


def test_retry_runs_once_clock_set_to_scheduled_at() -> None:
    clock = FakeClock()
    with stagehand.Stagehand(
        name="clock-retry", clock=clock, queues={"default": 1}
    ) as sh:
        job = sh.insert(_RetryOnce.new({}))
        testing.wait_for_job(job, "retryable", instance=sh, timeout=HANG_GUARD)
        clock.set(job.scheduled_at)  # type: ignore[arg-type]
        testing.wait_for_job(job, "completed", instance=sh, timeout=HANG_GUARD)

    assert job.attempt == 2


def test_advance_reaches_a_due_time_too() -> None:
    # After an advance by a fraction of a microsecond, now() rounds up; a
    # job due `delay` later must be due after advance(delay) as well.
    clock = FakeClock()
    clock.advance(0.0000006)
    when = clock.now() + timedelta(seconds=1)
    due = clock.due(when, clock.monotonic(), 1.0)
    clock.advance(1.0)

    assert clock.monotonic() >= due
