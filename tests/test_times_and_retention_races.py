"""Races and edge cases of job times, retention and a finished job's claim.

- On the system clock a job stores its times as `time.time_ns()` ints, and
  the public fields build an aware UTC datetime when read. They must order
  the same way as `clock.now()` reads, which cut off below a microsecond.
- `Retention` keeps expiry and job as two items of its deque, and `pop`
  removes them by `deque.index` while worker threads add without the lock.
- `_finish` drops the job's claim list before it retains the job.
"""

from __future__ import annotations

import queue
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from support import (
    HANG_GUARD,
    new_instance,
    running,
    unique_name,
    wait_until,
    watching,
)
from workers import BlockingWorker, EchoWorker

import stagehand
from stagehand import FakeClock, Job, JobState, Worker
from stagehand._clock import SystemClock
from stagehand._retention import Retention
from stagehand.testing import drain_queue

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# One instant, 700 ns past a whole second, in ns since the epoch.
# datetime.now() cuts it to .000000, and so must a job's time. A float from
# time.time() (1780000000.0000007) would round to .000001 instead.
INSTANT_NS = 1_780_000_000_000_000_700


@pytest.fixture
def frozen_system_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every wall-clock read of the system clock return INSTANT_NS.

    Both readers see the same instant, as two reads within one microsecond
    do. On the test machine, `datetime.fromtimestamp(time.time(), UTC)`
    exceeded a `datetime.now(UTC)` read right after it in 81,508 of 200,000
    tries. The instance must be built after this fixture, since it binds
    `time.time_ns` when built.
    """
    monkeypatch.setattr(time, "time", lambda: INSTANT_NS / 1e9)
    monkeypatch.setattr(time, "time_ns", lambda: INSTANT_NS)
    monkeypatch.setattr(
        SystemClock,
        "now",
        staticmethod(lambda: EPOCH + timedelta(microseconds=INSTANT_NS // 1000)),
    )


# Times on the system clock


@pytest.mark.usefixtures("frozen_system_clock")
def test_attempted_at_not_after_completed_at() -> None:
    # EchoWorker returns a value, so Executor._complete reads clock.now()
    # for completed_at, while attempted_at is a time.time_ns() int.
    instance = new_instance("clock-order", testing="manual").start()
    try:
        assert type(instance.clock) is SystemClock
        job = instance.insert(EchoWorker.new({"value": 1}))
        drain_queue("default", instance)
    finally:
        instance.stop()
    assert job.state is JobState.COMPLETED
    assert job.attempted_at <= job.completed_at  # type: ignore[operator]


@pytest.mark.usefixtures("frozen_system_clock")
def test_inserted_at_before_later_clock_read() -> None:
    instance = new_instance("clock-order", testing="manual").start()
    try:
        job = instance.insert(EchoWorker.new({"value": 1}))
        after = instance.clock.now()
    finally:
        instance.stop()
    assert job.inserted_at <= after  # type: ignore[operator]


@pytest.mark.usefixtures("frozen_system_clock")
def test_error_time_not_before_attempted_at() -> None:
    instance = new_instance("clock-order", testing="manual").start()
    try:
        job = instance.insert(FailOnceWorker.new({}, max_attempts=1))
        drain_queue("default", instance)
    finally:
        instance.stop()
    assert job.state is JobState.DISCARDED
    failed_at = datetime.fromisoformat(job.errors[0]["at"])
    assert job.attempted_at <= failed_at  # type: ignore[operator]


class FailOnceWorker(Worker):
    def perform(self, job: Job) -> None:
        raise RuntimeError("fails")


def test_insert_all_mixed_times() -> None:
    due = datetime.now(UTC) + timedelta(hours=1)
    past = datetime.now(UTC) - timedelta(hours=1)
    with running(queues={"default": 1}) as instance:
        default_queue = instance._queues["default"]
        instance.pause_queue("default")
        now_job = EchoWorker.new({"value": 1})
        later_job = EchoWorker.new({"value": 2}, schedule_in=90)
        fixed_job = EchoWorker.new({"value": 3}, scheduled_at=due)
        past_job = EchoWorker.new({"value": 4}, scheduled_at=past)
        jobs = instance.insert_all([now_job, later_job, fixed_job, past_job])

        assert [job.state for job in jobs] == [
            JobState.AVAILABLE,
            JobState.SCHEDULED,
            JobState.SCHEDULED,
            JobState.AVAILABLE,
        ]
        inserted = now_job.inserted_at
        assert all(job.inserted_at == inserted for job in jobs)
        assert now_job.scheduled_at == inserted
        gap = later_job.scheduled_at - inserted  # type: ignore[operator]
        assert abs(gap - timedelta(seconds=90)) <= timedelta(microseconds=1)
        assert fixed_job.scheduled_at == due
        assert past_job.scheduled_at == past
        assert default_queue.available == 2


def test_failed_insert_all_unstamps_mixed_jobs(cleanup: list[Any]) -> None:
    # The queue closes under insert_all, as stop() would, so the batch is
    # taken back: each job must read as never inserted, except its own
    # scheduled_at, and insert into another instance as new.
    due = datetime.now(UTC) + timedelta(hours=1)
    instance = new_instance("unstamp", queues={"default": 1}).start()
    cleanup.append(instance.stop)
    now_job = EchoWorker.new({"value": 1})
    later_job = EchoWorker.new({"value": 2}, schedule_in=90)
    fixed_job = EchoWorker.new({"value": 3}, scheduled_at=due)
    batch = [now_job, later_job, fixed_job]
    instance._queues["default"].close()

    with pytest.raises(stagehand.ShuttingDown):
        instance.insert_all(batch)

    for job in batch:
        assert job.id is None
        assert job.inserted_at is None
        assert job.state is JobState.AVAILABLE
        assert job._instance is None
    assert now_job.scheduled_at is None
    assert later_job.scheduled_at is None
    assert fixed_job.scheduled_at == due
    assert instance.jobs() == []

    with running(queues={"default": 1}) as other:
        other.pause_queue("default")
        again = other.insert_all(batch)
        assert [job.state for job in again] == [
            JobState.AVAILABLE,
            JobState.SCHEDULED,
            JobState.SCHEDULED,
        ]
        assert fixed_job.scheduled_at == due


# Expiry and job as two deque items


def _check_paired(table: Retention) -> None:
    order = list(table._order)
    assert len(order) % 2 == 0
    assert all(isinstance(value, float) for value in order[0::2])
    jobs = order[1::2]
    assert all(isinstance(value, Job) for value in jobs)
    assert len({id(job) for job in jobs}) == len(jobs), "a job is in the deque twice"
    assert {job.id for job in jobs} == set(table._by_id)  # type: ignore[union-attr]
    assert all(table._by_id[job.id] is job for job in jobs)  # type: ignore[union-attr]


@pytest.mark.usefixtures("frequent_thread_switches")
@pytest.mark.parametrize("limit", [100_000, 50])
def test_pop_during_lockless_adds(limit: int) -> None:
    # Adder threads finish jobs, and one thread retries each finished job as
    # retry_job does: pop, then add once it finishes again. pop() must never
    # raise, and the deque must stay paired with the dict.
    adders, per_adder = 4, 2000
    table = Retention(60.0, limit, time.monotonic)
    finished: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
    errors: list[BaseException] = []
    start = threading.Barrier(adders + 1)

    def add_many(first: int) -> None:
        start.wait()
        for number in range(first, first + per_adder):
            job = EchoWorker.new({"value": number})
            job.id = f"job-{number}"
            table.add(job)
            finished.put(job)

    def retry_each() -> None:
        start.wait()
        done = 0
        while done < adders * per_adder:
            job = finished.get(timeout=HANG_GUARD)
            assert job is not None
            done += 1
            try:
                popped = table.pop(job.id)  # type: ignore[arg-type]
            except BaseException as error:
                errors.append(error)
                return
            if popped is not None:
                assert popped is job
                table.add(job)

    threads = [
        threading.Thread(target=add_many, args=(index * per_adder,))
        for index in range(adders)
    ]
    threads.append(threading.Thread(target=retry_each))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_GUARD)
    assert errors == []
    # len() trims under the lock, so the pairs checked next are final.
    len(table)
    _check_paired(table)
    assert len(table) == min(limit, adders * per_adder)


def test_retry_cycles_keep_retention_bounded() -> None:
    with running(queues={"default": 2}, retention_limit=3) as instance:
        with watching() as watcher:
            jobs = [instance.insert(EchoWorker.new({"value": n})) for n in range(5)]
            watcher.wait_final(*jobs)
            for _ in range(3):
                job = jobs[-1]
                stops = sum(job_id == job.id for job_id, _ in watcher.stopped)
                instance.retry_job(job.id)  # type: ignore[arg-type]
                watcher.wait_stops(job, stops + 1)
                watcher.wait_final(job)
        table = instance._retained
        assert len(table) == 3
        _check_paired(table)
        assert instance.get_job(jobs[-1].id) is jobs[-1]  # type: ignore[arg-type]
        assert jobs[-1].attempt == 4
        listed = instance.jobs(state="completed")
        assert len(listed) == 3
        assert jobs[-1] in listed


def test_retry_expired_job_not_found() -> None:
    clock = FakeClock()
    with running(queues={"default": 1}, clock=clock, retention_period=10) as instance:
        with watching() as watcher:
            job = instance.insert(EchoWorker.new({"value": 1}))
            watcher.wait_final(job)
        clock.advance(11)
        with pytest.raises(stagehand.JobNotFound):
            instance.retry_job(job.id)  # type: ignore[arg-type]
        _check_paired(instance._retained)
        assert len(instance._retained._order) == 0


# The claim list dropped in _finish


class TimedGateWorker(Worker):
    """Blocks in a C call on its first attempt, under a 5 s timeout."""

    def timeout(self, job: Job) -> float:
        return 5.0

    def perform(self, job: Job) -> str:
        if job.attempt == 1:
            return BlockingWorker().perform(job)
        return "second"


def test_retry_while_timed_out_thread_blocked(
    cleanup: list[Any],
) -> None:
    # The timeout discards attempt 1 and drops the claim. Then retry_job runs
    # the job again in the replacement thread while the first thread is
    # still stuck, and that thread must change nothing when it returns.
    clock = FakeClock()
    gate = unique_name("timeout-retry")
    entered, release = BlockingWorker.gate(gate)
    cleanup.append(release.set)
    with running(queues={"default": 1}, clock=clock) as instance, watching() as watcher:
        job = instance.insert(TimedGateWorker.new({"gate": gate}, max_attempts=1))
        assert entered.wait(HANG_GUARD)
        clock.advance(6)
        watcher.wait_state(job, "discarded")
        assert job._claim is None
        default_queue = instance._queues["default"]
        assert default_queue.stuck == 1

        instance.retry_job(job.id)  # type: ignore[arg-type]
        watcher.wait_state(job, "completed")
        assert job.attempt == 2
        assert job.result == "second"

        release.set()
        wait_until(lambda: default_queue.stuck == 0)
        assert job.state is JobState.COMPLETED
        assert job.attempt == 2
        assert len(job.errors) == 1
        assert watcher.started.count(job.id) == 2
        _check_paired(instance._retained)
        assert instance.get_job(job.id) is job  # type: ignore[arg-type]
