"""What happens to a job for each outcome of perform, in real worker threads."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from stagehand import FakeClock, Job, JobState, Worker
from support import running, watching
from workers import EchoWorker, FailingWorker, OutcomeWorker


def test_return_value_completes_job() -> None:
    with running() as instance, watching() as watcher:
        job = instance.insert(EchoWorker.new({"value": [1, 2]}))
        watcher.wait_final(job)

    assert job.state is JobState.COMPLETED
    assert job.result == [1, 2]
    assert job.attempt == 1
    assert job.errors == []
    assert job.attempted_at is not None
    assert job.completed_at is not None
    assert job.inserted_at <= job.attempted_at <= job.completed_at


def test_exception_retries_then_discards() -> None:
    clock = FakeClock()
    with running(clock=clock) as instance, watching() as watcher:
        job = instance.insert(FailingWorker.new({}))
        watcher.wait_state(job, "retryable")
        assert job.attempt == 1
        assert job.scheduled_at.isoformat() == "2026-01-01T00:00:10+00:00"

        clock.advance(10)
        watcher.wait_stops(job, 2)
        assert job.state is JobState.RETRYABLE
        clock.advance(10)
        watcher.wait_final(job)

    assert job.state is JobState.DISCARDED
    assert job.attempt == 3
    assert [error["attempt"] for error in job.errors] == [1, 2, 3]
    assert "RuntimeError: attempt 3 failed" in job.errors[2]["error"]
    assert "Traceback (most recent call last)" in job.errors[0]["error"]
    assert job.errors[0]["at"] == "2026-01-01T00:00:00+00:00"
    assert job.errors[1]["at"] == "2026-01-01T00:00:10+00:00"


def test_retry_waits_for_backoff() -> None:
    clock = FakeClock()
    with running(clock=clock) as instance, watching() as watcher:
        failing = instance.insert(FailingWorker.new({}))
        watcher.wait_state(failing, "retryable")
        # The sentinel is due one second before the retry; once it has run,
        # the scheduler has looked at the heap at that time.
        sentinel = instance.insert(EchoWorker.new({}, schedule_in=9))
        clock.advance(9)
        watcher.wait_final(sentinel)

        assert failing.state is JobState.RETRYABLE
        assert failing.attempt == 1


def test_error_return_fails_attempt() -> None:
    with running() as instance, watching() as watcher:
        job = instance.insert(OutcomeWorker.new({"outcome": "error"}, max_attempts=1))
        watcher.wait_final(job)

    assert job.state is JobState.DISCARDED
    assert job.errors[0]["error"] == "bad input"
    assert job.errors[0]["attempt"] == 1


def test_snooze_keeps_attempts() -> None:
    clock = FakeClock()
    with running(clock=clock) as instance, watching() as watcher:
        job = instance.insert(OutcomeWorker.new({"outcome": "snooze"}, max_attempts=1))
        watcher.wait_state(job, "scheduled")

        assert job.attempt == 1
        assert job.max_attempts == 2
        assert job.errors == []
        assert job.scheduled_at.isoformat() == "2026-01-01T00:00:30+00:00"

        clock.advance(30)
        watcher.wait_stops(job, 2)
        assert job.state is JobState.SCHEDULED

    assert job.max_attempts == 3


def test_cancel_return_stops_job() -> None:
    with running() as instance, watching() as watcher:
        job = instance.insert(OutcomeWorker.new({"outcome": "cancel"}))
        watcher.wait_final(job)

    assert job.state is JobState.CANCELLED
    assert job.attempt == 1
    assert job.errors[0]["error"] == "cancelled: not needed"


class BadBackoffWorker(Worker):
    max_attempts = 2

    def backoff(self, job: Job) -> Any:
        return "soon"

    def perform(self, job: Job) -> None:
        raise ValueError("nope")


def test_invalid_backoff_uses_default(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    with running(clock=clock) as instance, watching() as watcher:
        job = instance.insert(BadBackoffWorker.new({}))
        watcher.wait_state(job, "retryable")

    delay = (job.scheduled_at - clock.now()).total_seconds()
    assert 17 * 0.9 <= delay <= 17 * 1.1
    assert "returned 'soon', not seconds >= 0; using the default" in caplog.text


class SpinningWorker(Worker):
    """Runs Python bytecode until interrupted by its timeout."""

    max_attempts = 1
    started = threading.Event()
    threads: list[threading.Thread] = []

    def timeout(self, job: Job) -> float:
        return 5

    def perform(self, job: Job) -> None:
        self.threads.append(threading.current_thread())
        self.started.set()
        while True:
            pass


def test_timeout_interrupts_python_code() -> None:
    clock = FakeClock()
    with running(clock=clock, queues={"default": 1}) as instance, watching() as watcher:
        job = instance.insert(SpinningWorker.new({}))
        assert SpinningWorker.started.wait(30)
        clock.advance(5)
        watcher.wait_final(job)
        follow_up = instance.insert(EchoWorker.new({"value": "next"}))
        watcher.wait_final(follow_up)
        SpinningWorker.threads[0].join(30)

        assert not SpinningWorker.threads[0].is_alive()
        assert instance.check_queue("default")["stuck"] == 0

    assert job.state is JobState.DISCARDED
    assert job.errors[0]["error"] == "JobTimeout: attempt 1 ran longer than 5 s"
    assert follow_up.result == "next"


class StuckWorker(Worker):
    """Blocks in a C-level wait that a timeout cannot interrupt."""

    max_attempts = 1
    entered = threading.Event()
    release = threading.Event()
    threads: list[threading.Thread] = []

    def timeout(self, job: Job) -> float:
        return 2

    def perform(self, job: Job) -> str:
        self.threads.append(threading.current_thread())
        self.entered.set()
        self.release.wait(60)
        return "late result"


def test_timeout_frees_slot_of_stuck_thread() -> None:
    clock = FakeClock()
    with running(clock=clock, queues={"default": 1}) as instance, watching() as watcher:
        stuck = instance.insert(StuckWorker.new({}))
        assert StuckWorker.entered.wait(30)
        clock.advance(2)
        watcher.wait_final(stuck)

        next_job = instance.insert(EchoWorker.new({"value": 7}))
        watcher.wait_final(next_job)
        stats = instance.check_queue("default")

        assert stuck.state is JobState.DISCARDED
        assert next_job.result == 7
        assert stats["stuck"] == 1
        assert stats["executing"] == 0
        assert stats["threads"] == 1

        StuckWorker.release.set()
        StuckWorker.threads[0].join(30)

        assert not StuckWorker.threads[0].is_alive()
        assert instance.check_queue("default")["stuck"] == 0

    assert stuck.state is JobState.DISCARDED
    assert stuck.result is None
