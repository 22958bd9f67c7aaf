"""Stuck-thread counts, scheduled_at in other zones, and job id types.

A worker thread whose job a timeout or stop() took returns, or crashes,
while the timeout or stop() is still recording the job. Then scheduled_at
in other zones and at the year limits, and str subclasses as job ids.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from support import (
    HANG_GUARD,
    new_instance,
    run_in_thread,
    unique_name,
    wait_until,
    watching,
)
from workers import BlockingWorker, EchoWorker, TimedBlockingWorker

from stagehand import FakeClock, InvalidOption, Job, JobNotFound, JobState
from stagehand._worker import worker_path


def _crash_when_lost(queue: Any, threads: list[threading.Thread]) -> None:
    """Make the queue's threads fail in Stagehand's code once their job is lost.

    Set before start(): each thread reads the runner when it starts.
    """
    run = queue._runner

    def runner(job: Job, owner: Any) -> bool:
        threads.append(threading.current_thread())
        if run(job, owner):
            raise RuntimeError("failure after the job was taken from this thread")
        return False

    queue._runner = runner


# A thread whose job its timeout took, crashing before the timeout records


class _HoldTimeoutLog(logging.Handler):
    """A log handler that stops the scheduler thread at `expire`'s warning.

    The timeout has then taken the claim and released the slot, but not yet
    recorded the failed attempt. The handler waits until `threads` exit.
    Waits in handle(), not emit(), so the handler's own lock stays free.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reached = threading.Event()
        self.threads: list[threading.Thread] = []

    def handle(self, record: logging.LogRecord) -> bool:
        if "timed out after" in record.getMessage() and not self.reached.is_set():
            self.reached.set()
            for thread in list(self.threads):
                thread.join(HANG_GUARD)
        return True


def test_crash_after_timeout_before_it_records(cleanup: list[Any]) -> None:
    clock = FakeClock()
    gate = unique_name("stuck-timeout-crash")
    entered, release = BlockingWorker.gate(gate)
    cleanup.append(release.set)
    instance = new_instance("stuck-timeout-crash", queues={"default": 1}, clock=clock)
    queue = instance._queues["default"]
    holder = _HoldTimeoutLog()
    _crash_when_lost(queue, holder.threads)
    log = logging.getLogger("stagehand._execute")
    log.addHandler(holder)
    cleanup.append(lambda: log.removeHandler(holder))
    instance.start()
    cleanup.append(instance.stop)
    with watching() as watcher:
        job = instance.insert(TimedBlockingWorker.new({"gate": gate}, max_attempts=3))
        assert entered.wait(HANG_GUARD)
        clock.advance(6)
        assert holder.reached.wait(HANG_GUARD)
        release.set()
        # The scheduler runs its callbacks in order: this one runs once the
        # timeout's callback has returned.
        done = threading.Event()
        assert instance._scheduler is not None
        instance._scheduler.call_at(clock.monotonic(), done.set)
        assert done.wait(HANG_GUARD)
        stops = [seen for job_id, seen in watcher.stopped if job_id == job.id]
    assert [error["attempt"] for error in job.errors] == [1], job.errors
    assert len(stops) == 1, stops
    assert queue.stats()["stuck"] == 0


# A thread whose job stop() took, before stop() finishes the job


class _HoldingClock(FakeClock):
    """A FakeClock whose first now() call in `thread` runs `waits` first."""

    def __init__(self) -> None:
        super().__init__()
        self.thread: int | None = None
        self.reached = threading.Event()
        self.waits: list[Callable[[], None]] = []

    def now(self) -> datetime:
        if threading.get_ident() == self.thread and not self.reached.is_set():
            self.reached.set()
            for wait in self.waits:
                wait()
        return super().now()


@pytest.mark.parametrize("crash", [True, False], ids=["crash", "return"])
def test_thread_ends_before_stop_finishes_job(cleanup: list[Any], crash: bool) -> None:
    # stop() has taken the claim and released the slot, and reads the time.
    # Then the thread returns from perform, finds the claim gone, and
    # crashes or returns. The job is discarded once, and the counts end at 0
    # without ever reading below it.
    clock = _HoldingClock()
    gate = unique_name("stuck-stop")
    entered, release = BlockingWorker.gate(gate)
    cleanup.append(release.set)
    instance = new_instance(
        "stuck-stop",
        queues={"default": 1},
        shutdown_grace_period=0,
        clock=clock,
    )
    queue = instance._queues["default"]
    threads: list[threading.Thread] = []
    if crash:
        _crash_when_lost(queue, threads)
    else:
        run = queue._runner

        def runner(job: Job, owner: Any) -> bool:
            threads.append(threading.current_thread())
            return run(job, owner)

        queue._runner = runner
    seen: list[int] = []

    def let_thread_end() -> None:
        release.set()
        threads[0].join(HANG_GUARD)
        seen.append(queue.stats()["stuck"])

    clock.waits.append(let_thread_end)
    instance.start()
    cleanup.append(instance.stop)

    def stop() -> None:
        clock.thread = threading.get_ident()
        instance.stop()

    with watching() as watcher:
        job = instance.insert(BlockingWorker.new({"gate": gate}))
        assert entered.wait(HANG_GUARD)
        stopper, outcome = run_in_thread(cleanup, stop)
        stopper.join(HANG_GUARD)
        assert clock.reached.is_set()
        stops = [state for job_id, state in watcher.stopped if job_id == job.id]
    assert outcome == [None]
    assert job.state is JobState.DISCARDED
    assert len(job.errors) == 1, job.errors
    assert stops == ["discarded"]
    assert seen == [0]
    stats = queue.stats()
    assert (stats["stuck"], stats["threads"]) == (0, 0), stats
    assert not queue._released


# Counts after a timeout, with the queue scaled or stopped meanwhile


def _timed_out_thread(
    cleanup: list[Any], prefix: str, limit: int
) -> tuple[Any, Any, FakeClock, threading.Event, Job, list[threading.Thread]]:
    clock = FakeClock()
    gate = unique_name(prefix)
    entered, release = BlockingWorker.gate(gate)
    cleanup.append(release.set)
    instance = new_instance(prefix, queues={"default": limit}, clock=clock)
    queue = instance._queues["default"]
    threads: list[threading.Thread] = []
    run = queue._runner

    def runner(job: Job, owner: Any) -> bool:
        threads.append(threading.current_thread())
        return run(job, owner)

    queue._runner = runner
    instance.start()
    cleanup.append(instance.stop)
    with watching() as watcher:
        job = instance.insert(TimedBlockingWorker.new({"gate": gate}, max_attempts=1))
        assert entered.wait(HANG_GUARD)
        clock.advance(6)
        watcher.wait_state(job, "discarded")
    return instance, queue, clock, release, job, threads


def _live_threads(queue: Any) -> int:
    prefix = f"stagehand-{queue.name}-"
    return sum(
        thread.name.startswith(prefix) and thread.is_alive()
        for thread in threading.enumerate()
    )


def test_stuck_thread_returns_after_scale_down(cleanup: list[Any]) -> None:
    instance, queue, _, release, job, threads = _timed_out_thread(
        cleanup, "stuck-scale-down", 3
    )
    assert queue.stats()["stuck"] == 1
    assert queue.stats()["threads"] == 3
    instance.scale_queue("default", 1)
    release.set()
    threads[0].join(HANG_GUARD)
    assert not threads[0].is_alive()
    stats = instance.check_queue("default")
    assert stats["stuck"] == 0
    assert stats["executing"] == 0
    assert stats["discarded"] == 1
    # The extra idle threads exit when woken by the scale.
    wait_until(lambda: queue.stats()["threads"] == 1)
    assert job.state is JobState.DISCARDED


def test_stuck_thread_returns_after_stop(cleanup: list[Any]) -> None:
    instance, queue, _, release, _job, threads = _timed_out_thread(
        cleanup, "stuck-stuck-stop", 1
    )
    instance.stop()
    assert queue.stats()["stuck"] == 1
    release.set()
    threads[0].join(HANG_GUARD)
    stats = queue.stats()
    assert (stats["stuck"], stats["threads"]) == (0, 0), stats
    assert not queue._released


def test_stuck_thread_and_scale_up_stay_within_limit(cleanup: list[Any]) -> None:
    instance, queue, _, release, _job, threads = _timed_out_thread(
        cleanup, "stuck-scale-up", 1
    )
    instance.scale_queue("default", 2)
    assert queue.stats()["threads"] == 2
    release.set()
    threads[0].join(HANG_GUARD)
    stats = queue.stats()
    assert (stats["stuck"], stats["threads"]) == (0, 2), stats
    # Two pool threads, the stuck one gone.
    wait_until(lambda: _live_threads(queue) == 2)


# scheduled_at and job ids


@pytest.mark.parametrize(
    "given",
    [
        datetime(2030, 3, 10, 2, 30, tzinfo=ZoneInfo("America/New_York")),  # gap
        datetime(2030, 11, 3, 1, 30, fold=1, tzinfo=ZoneInfo("America/New_York")),
        datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=-5))),
        datetime.max.replace(tzinfo=UTC),
    ],
)
def test_scheduled_at_any_zone_reads_utc(given: datetime) -> None:
    clock = FakeClock()
    job = EchoWorker.new({"value": 1}, scheduled_at=given)
    hand = Job(worker_path(EchoWorker), {"value": 1}, scheduled_at=given)
    instance = new_instance("stuck-zone", testing="manual", clock=clock).start()
    try:
        for inserted in (instance.insert(job), instance.insert(hand)):
            # Compared by timestamp: on this Python, == between zones was
            # False for a time in a DST gap or fold.
            assert inserted.scheduled_at.timestamp() == given.timestamp()  # type: ignore[union-attr]
            assert inserted.scheduled_at.tzinfo is UTC  # type: ignore[union-attr]
            assert inserted.to_dict()["scheduled_at"].endswith("+00:00")
    finally:
        instance.stop()


def test_hand_built_job_past_9999_rejected() -> None:
    late = datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5)))
    job = Job(worker_path(EchoWorker), {"value": 1}, scheduled_at=late)
    instance = new_instance("stuck-late", testing="manual").start()
    try:
        with pytest.raises(InvalidOption, match="outside the years 1 to 9999"):
            instance.insert(job)
        assert instance.jobs() == []
    finally:
        instance.stop()


def test_str_subclass_job_id() -> None:
    class JobId(str):
        pass

    instance = new_instance("stuck-ids", testing="manual").start()
    try:
        job = instance.insert(EchoWorker.new({"value": 1}))
        assert instance.get_job(JobId(job.id)) is job
        assert instance.cancel_job(JobId(job.id)).state is JobState.CANCELLED
        with pytest.raises(JobNotFound, match="retention_limit"):
            instance.retry_job(JobId("missing"))
        with pytest.raises(TypeError, match="job_id must be"):
            instance.get_job(b"x")  # type: ignore[arg-type]
    finally:
        instance.stop()
