"""Races between finishing, retrying, draining, cancelling and inserting jobs.

Each test stops one thread at a chosen point with a gate: a wrapped dict
or method that waits on an event. That has the same effect as the thread
being descheduled there. The test then checks one guarantee of the engine.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
from support import (
    HANG_GUARD,
    Gate,
    HeldLive,
    new_instance,
    run_in_thread,
    unique_name,
    wait_until,
    watching,
)
from workers import BlockingWorker, CountingWorker, EchoWorker, runs_of

import stagehand
from stagehand import JobState
from stagehand.cron import parse

pytestmark = pytest.mark.usefixtures("clear_counts")


class _GatedLive(dict):  # type: ignore[type-arg]
    """An instance's live table in which a pool thread's pop of `target` waits.

    The thread that finishes a job calls pop() last in `_finish`, after the
    job has been retained and its final state set.
    """

    def __init__(self) -> None:
        super().__init__()
        self.target: str | None = None
        self.gate = Gate()
        # Set once a thread other than a pool thread has read `target`
        # twice while the gate held the pop back.
        self.read_twice = threading.Event()
        self._reads = 0

    def get(self, key: Any, default: Any = None) -> Any:
        if (
            key == self.target
            and self.gate.entered.is_set()
            and not threading.current_thread().name.startswith("stagehand-")
        ):
            self._reads += 1
            if self._reads >= 2:
                self.read_twice.set()
        return super().get(key, default)

    def pop(self, key: Any, *default: Any) -> Any:
        if (
            key == self.target
            and threading.current_thread().name.startswith("stagehand-")
            and not self.gate.entered.is_set()
        ):
            self.gate.hold()
        return super().pop(key, *default)


def test_retry_while_finishing_keeps_job_visible(cleanup: list[Any]) -> None:
    # _finish retains the job, sets its final state, and only then removes it
    # from _live. A retry_job in that window must not re-add the job to _live
    # before the finishing thread removes it, or the queued job would be in
    # neither table and get_job, jobs() and cancel_job() would miss it.
    live = _GatedLive()
    instance = new_instance(
        "final-review", queues={"default": {"limit": 1, "paused": True}}
    )
    instance._live = live
    instance.start()
    cleanup.append(instance.stop)
    cleanup.append(live.gate.release.set)
    with watching() as watcher:
        job = instance.insert(CountingWorker.new({"n": 1}))
        live.target = job.id
        instance.resume_queue("default")
        assert live.gate.entered.wait(HANG_GUARD)
        assert job.state is JobState.COMPLETED
        # Paused, so the retried job stays queued while the test looks.
        instance.pause_queue("default")
        # retry_job waits for the finishing thread to drop the job from the
        # live jobs, so it runs in a thread. Its first read of the job is
        # get_job's, its second the wait's.
        retrier = threading.Thread(target=instance.retry_job, args=(job.id,))
        retrier.start()
        cleanup.append(lambda: retrier.join(HANG_GUARD))
        assert live.read_twice.wait(HANG_GUARD)
        live.gate.release.set()
        retrier.join(HANG_GUARD)
        assert not retrier.is_alive()
        # job.stop is emitted after _finish returned.
        watcher.wait_stops(job, 1)

        assert job.state is JobState.AVAILABLE
        assert instance._queues["default"].available == 1
        assert instance.get_job(job.id) is job  # type: ignore[arg-type]
        assert job in instance.jobs()
        assert instance.check_queue("default")["available"] == 1


def test_jobs_lists_retried_job_at_retention_limit(
    cleanup: list[Any],
) -> None:
    # With retention_limit=1, job `late` is finished but still in _live, and
    # job `retried`, finished after it, is being retried: available and live
    # but not yet out of retention. Only `late` counts against the limit, so
    # jobs() must list both.
    live = _GatedLive()
    instance = new_instance(
        "final-review",
        queues={"default": {"limit": 2, "paused": True}},
        retention_limit=1,
    )
    instance._live = live
    retention = instance._retained
    retention_pop = retention.pop
    pop_gate = Gate()

    def gated_pop(job_id: str) -> Any:
        pop_gate.hold()
        return retention_pop(job_id)

    instance.start()
    cleanup.append(instance.stop)
    cleanup.append(live.gate.release.set)
    cleanup.append(pop_gate.release.set)
    with watching() as watcher:
        late = instance.insert(CountingWorker.new({"n": 1}))
        live.target = late.id
        instance.resume_queue("default")
        assert live.gate.entered.wait(HANG_GUARD)
        retried = instance.insert(CountingWorker.new({"n": 2}))
        watcher.wait_stops(retried, 1)
        instance.pause_queue("default")

        retention.pop = gated_pop  # type: ignore[method-assign]
        retrier = threading.Thread(target=instance.retry_job, args=(retried.id,))
        retrier.start()
        cleanup.append(lambda: retrier.join(HANG_GUARD))
        assert pop_gate.entered.wait(HANG_GUARD)
        assert retried.state is JobState.AVAILABLE

        listed = {job.id: job.state for job in instance.jobs()}
        pop_gate.release.set()
        live.gate.release.set()
        retrier.join(HANG_GUARD)
    assert listed == {late.id: JobState.COMPLETED, retried.id: JobState.AVAILABLE}


class _WatchedCondition(threading.Condition):
    """A condition that reports when `thread` is about to acquire it."""

    def __init__(self) -> None:
        super().__init__(threading.Lock())
        self.thread: int | None = None
        self.acquiring = threading.Event()
        # Condition binds acquire to its lock's; cancel_job calls it directly.
        inner = self.acquire

        def acquire(*args: Any, **kwargs: Any) -> bool:
            if threading.get_ident() == self.thread:
                self.acquiring.set()
            return inner(*args, **kwargs)

        self.acquire = acquire  # type: ignore[method-assign]


class _GatedPending(dict):  # type: ignore[type-arg]
    """A queue's `_pending` table whose pop by `thread` waits after `key`."""

    def __init__(self) -> None:
        super().__init__()
        self.key: int | None = None
        self.thread: int | None = None
        self.gate = Gate()

    def pop(self, key: Any, *default: Any) -> Any:
        value = super().pop(key, *default)
        if key == self.key and threading.get_ident() == self.thread:
            self.gate.hold()
        return value


def test_drain_and_cancel_both_take_one_job(cleanup: list[Any]) -> None:
    # drain_queue() has claimed one job part way while cancel_job() on the same
    # job waits. Of drain and cancel, only one may get the job: a drained job
    # must not also be cancelled and retained.
    instance = new_instance(
        "final-review", queues={"default": {"limit": 1, "paused": True}}
    )
    queue = instance._queues["default"]
    pending = _GatedPending()
    queue._pending = pending
    watched = _WatchedCondition()
    queue.cond = watched
    instance.start()
    cleanup.append(instance.stop)
    cleanup.append(pending.gate.release.set)
    job = instance.insert(CountingWorker.new({"n": 1}))
    pending.key = job._queue_seq
    drained: list[stagehand.Job] = []

    def drain() -> None:
        pending.thread = threading.get_ident()
        drained.extend(instance.drain_queue("default"))

    drainer = threading.Thread(target=drain)
    drainer.start()
    cleanup.append(lambda: drainer.join(HANG_GUARD))
    assert pending.gate.entered.wait(HANG_GUARD)

    # The drain holds the queue's lock while it claims jobs, so cancel_job
    # runs in a thread and waits for it.
    def cancel() -> None:
        watched.thread = threading.get_ident()
        instance.cancel_job(job.id)  # type: ignore[arg-type]

    canceller = threading.Thread(target=cancel)
    canceller.start()
    cleanup.append(lambda: canceller.join(HANG_GUARD))
    assert watched.acquiring.wait(HANG_GUARD)
    pending.gate.release.set()
    drainer.join(HANG_GUARD)
    canceller.join(HANG_GUARD)
    assert not canceller.is_alive()

    # Valid outcomes: drained and still available, or cancelled and not drained.
    outcome = (drained == [job], job.state)
    assert outcome in ((True, JobState.AVAILABLE), (False, JobState.CANCELLED)), (
        f"drained: {outcome[0]}, state after cancel_job: {job.state.value}"
    )


def test_rejected_insert_all_not_counted_lost(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    # stop() closes the queues while insert_all() is checking them, after
    # the scheduled job of the batch was stamped. insert_all must raise
    # ShuttingDown, and stop() must count the scheduled job as lost only if
    # the scheduler really took it.
    gate_name = unique_name("final-review")
    entered, release = BlockingWorker.gate(gate_name)
    instance = new_instance(
        "final-review", queues={"default": 1}, shutdown_grace_period=HANG_GUARD
    )
    instance.start()
    cleanup.append(instance.stop)
    cleanup.append(release.set)
    queue = instance._queues["default"]
    ensure_open = queue.ensure_open
    open_gate = Gate()

    def gated_ensure_open() -> None:
        open_gate.hold()
        ensure_open()

    # A running job keeps stop() waiting after it has closed the queues.
    instance.insert(BlockingWorker.new({"gate": gate_name}))
    assert entered.wait(HANG_GUARD)
    queue.ensure_open = gated_ensure_open  # type: ignore[method-assign]
    scheduled = EchoWorker.new({}, schedule_in=3600)
    errors: list[BaseException] = []

    def insert_all() -> None:
        try:
            instance.insert_all([scheduled, EchoWorker.new({})])
        except stagehand.ShuttingDown as error:
            errors.append(error)

    inserter = threading.Thread(target=insert_all)
    inserter.start()
    cleanup.append(lambda: inserter.join(HANG_GUARD))
    cleanup.append(open_gate.release.set)
    assert open_gate.entered.wait(HANG_GUARD)
    stopper = threading.Thread(target=instance.stop)
    with caplog.at_level(logging.WARNING, logger="stagehand"):
        stopper.start()
        cleanup.append(lambda: stopper.join(HANG_GUARD))
        wait_until(lambda: queue._closed)
        open_gate.release.set()
        inserter.join(HANG_GUARD)
        release.set()
        stopper.join(HANG_GUARD)

    assert len(errors) == 1
    lost = [r.getMessage() for r in caplog.records if "are lost" in r.getMessage()]
    if scheduled.id is None:
        # Not inserted, so stop() has no scheduled job to count.
        assert lost == [], f"{lost}; the scheduled job has id None"
    else:
        assert len(lost) == 1
        assert "1 scheduled" in lost[0]


def test_next_after_before_the_zones_first_midnight() -> None:
    # New York's offset in year 1 is -04:56:02, so 0001-01-01 00:00 UTC is
    # a wall time in year 0, outside datetime's range. The first local
    # midnight after it is still found.
    cron = parse("0 0 * * *", tz="America/New_York")
    start = datetime(1, 1, 1, tzinfo=UTC)
    first = cron.next_after(start)
    assert first.replace(tzinfo=None) == datetime(1, 1, 1)
    assert cron.matches(first)


@pytest.mark.parametrize(
    ("zone", "instant"),
    [
        ("America/New_York", datetime(1, 1, 1, tzinfo=UTC)),
        ("Asia/Kathmandu", datetime(9999, 12, 31, 23, 59, tzinfo=UTC)),
    ],
)
def test_matches_at_the_calendar_ends(zone: str, instant: datetime) -> None:
    # The wall time of `instant` in `zone` lies in year 0 or year 10000, so
    # no entry fires then, and matches() returns False instead of raising.
    assert parse("* * * * *", tz=zone).matches(instant) is False


def test_rejected_insert_keeps_cancelled_job(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    # The push makes the job live once it is in the queue's table, so
    # cancel_job() can cancel it before the push has put its key on the
    # heap. When stop() then closes the queue, the push must leave the
    # cancelled job cancelled, not take it back and unstamp it, and the
    # insert returns it.
    instance = new_instance("final-review", queues={"default": 1})
    live = HeldLive()
    instance._live = live
    instance.start()
    cleanup.append(instance.stop)
    cleanup.append(live.gate.release.set)
    queue = instance._queues["default"]
    job = CountingWorker.new({"n": 1})

    def insert() -> stagehand.Job:
        live.thread = threading.get_ident()
        return instance.insert(job)

    inserter, outcome = run_in_thread(cleanup, insert)
    assert live.gate.entered.wait(HANG_GUARD)
    instance.cancel_job(job.id)  # type: ignore[arg-type]
    assert job.state is JobState.CANCELLED
    with caplog.at_level(logging.WARNING, logger="stagehand"):
        stopper, _ = run_in_thread(cleanup, instance.stop)
        wait_until(lambda: queue._closed)
        live.gate.release.set()
        inserter.join(HANG_GUARD)
        stopper.join(HANG_GUARD)

    assert outcome == [job]
    listed = [(listed.id, listed.state.value) for listed in instance.jobs()]
    assert job.state is JobState.CANCELLED, (
        f"the cancelled job became {job.state.value} with id {job.id}; "
        f"jobs() lists {listed}"
    )
    assert job.id is not None
    assert runs_of(1) == 0
    assert not [r for r in caplog.records if "available" in r.getMessage()]


def test_next_after_gap_of_fractional_minutes() -> None:
    # Africa/Monrovia moved from -00:44:30 to +00:00 at 1972-01-07 00:00
    # local time, so wall times 00:00:00 to 00:44:29 that day never occur. A
    # fixed entry at 00:00 fires at the first wall minute after the gap. A
    # gap that is not a whole number of minutes once made the search loop
    # forever, so the call runs in a child process that a timeout kills.
    code = (
        "from datetime import datetime, timezone\n"
        "from stagehand.cron import parse\n"
        "cron = parse('0 0 * * *', tz='Africa/Monrovia')\n"
        "slot = cron.next_after(datetime(1972, 1, 6, 12, tzinfo=timezone.utc))\n"
        "print(slot.date(), cron.matches(slot))\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=5
        )
    except subprocess.TimeoutExpired:
        pytest.fail("next_after() did not return within 5 s (the same call takes ms)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1972-01-07", "True"]
