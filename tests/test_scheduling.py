"""Scheduled jobs: schedule_in, scheduled_at, far-future times, wake-ups."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from stagehand import FakeClock, InvalidOption, JobState
from support import running, watching
from workers import EchoWorker, OutcomeWorker


def test_schedule_in_waits_for_clock() -> None:
    clock = FakeClock()
    with running(clock=clock) as instance, watching() as watcher:
        job = instance.insert(EchoWorker.new({"value": 1}, schedule_in=(1, "minutes")))
        sentinel = instance.insert(EchoWorker.new({}, schedule_in=59))

        assert job.state is JobState.SCHEDULED
        assert job.scheduled_at == datetime(2026, 1, 1, 0, 1, tzinfo=UTC)

        clock.advance(59)
        watcher.wait_final(sentinel)
        assert job.state is JobState.SCHEDULED

        clock.advance(1)
        watcher.wait_final(job)

    assert job.result == 1


def test_scheduled_at_in_future_and_past() -> None:
    clock = FakeClock()
    start = clock.now()
    with running(clock=clock) as instance, watching() as watcher:
        future = instance.insert(EchoWorker.new({"value": "f"}, scheduled_at=start + timedelta(hours=2)))
        past = instance.insert(EchoWorker.new({"value": "p"}, scheduled_at=start - timedelta(hours=2)))
        watcher.wait_final(past)

        assert future.state is JobState.SCHEDULED
        assert past.scheduled_at == start - timedelta(hours=2)

        clock.set(start + timedelta(hours=2))
        watcher.wait_final(future)

    assert future.result == "f"


def test_far_future_job_waits() -> None:
    clock = FakeClock()
    with running(clock=clock) as instance, watching() as watcher:
        job = instance.insert(EchoWorker.new({}, schedule_in=(180, "days")))
        clock.advance(179 * 86400)
        sentinel = instance.insert(EchoWorker.new({}))
        watcher.wait_final(sentinel)

        assert job.state is JobState.SCHEDULED

        clock.advance(86400)
        watcher.wait_final(job)


def test_earlier_job_wakes_scheduler() -> None:
    # Real clock: the scheduler sleeps towards a job an hour away and must
    # wake for one due in 50 ms.
    with running() as instance, watching() as watcher:
        late = instance.insert(EchoWorker.new({}, schedule_in=3600))
        soon = instance.insert(EchoWorker.new({"value": "soon"}, schedule_in=0.05))
        watcher.wait_final(soon)

        assert late.state is JobState.SCHEDULED
        assert soon.result == "soon"


def test_many_jobs_due_together() -> None:
    clock = FakeClock()
    with running(clock=clock, queues={"default": 4}) as instance, watching() as watcher:
        jobs = instance.insert_all(
            [EchoWorker.new({"value": i}, schedule_in=5) for i in range(2000)]
        )
        clock.advance(5)
        watcher.wait_final(*jobs)

    assert [job.result for job in jobs] == list(range(2000))


def test_schedule_past_year_9999_changes_nothing() -> None:
    clock = FakeClock(start=datetime(9990, 1, 1, tzinfo=UTC))
    with running(clock=clock) as instance:
        now = EchoWorker.new({})
        late = EchoWorker.new({}, schedule_in=(36_500, "days"))

        with pytest.raises(InvalidOption) as raised:
            instance.insert_all([now, late])

        assert instance.jobs() == []

    assert str(raised.value) == (
        "schedule_in=3,153,600,000 s from 9990-01-01T00:00:00+00:00 is past the "
        "year 9999; schedule the job earlier"
    )
    assert (now.id, late.id) == (None, None)


def test_internal_error_discards_the_job() -> None:
    # A snooze whose wake time lies past the year 9999 fails inside the worker
    # thread, outside perform. The job is discarded, not left executing.
    clock = FakeClock(start=datetime(9999, 12, 31, 23, 59, 50, tzinfo=UTC))
    with running(clock=clock) as instance, watching() as watcher:
        job = instance.insert(OutcomeWorker.new({"outcome": "snooze"}))
        watcher.wait_final(job)
        counts = instance.check_queue("default")

    assert job.state is JobState.DISCARDED
    assert job.errors[-1]["error"] == (
        "internal error: OverflowError('date value out of range')"
    )
    assert (counts["executing"], counts["discarded"]) == (0, 1)
    # The snooze failed before it could give the attempt back.
    assert (job.attempt, job.max_attempts) == (1, OutcomeWorker.max_attempts)
