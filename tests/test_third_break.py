"""The crash path, batch checks of due times, worker filters, and abandon.

Each race test stops one thread at a chosen point with a gate or an event
handler that waits, which has the same effect as the thread being
descheduled there.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
from support import HANG_GUARD, Gate, new_instance, running, unique_name, wait_until
from workers import CountingWorker, EchoWorker, runs_of

import stagehand
from stagehand import JobState, events, testing
from stagehand.exceptions import InvalidOption
from stagehand.testing import FakeClock

pytestmark = pytest.mark.usefixtures("clear_counts")


# ---------------------------------------------------------------------------
# crashed() against a copy of the job that runs in another thread

_SECOND_ATTEMPT = threading.Event()


class SnoozeThenWaitWorker(stagehand.Worker):
    """A worker that snoozes for 0 s on attempt 1, then waits for _SECOND_ATTEMPT."""

    def perform(self, job: stagehand.Job) -> Any:
        if job.attempt == 1:
            return stagehand.Snooze(0)
        if not _SECOND_ATTEMPT.wait(HANG_GUARD):
            raise AssertionError("the test never released the second attempt")
        return "second attempt done"


def test_crash_spares_next_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Guarantee: nothing is lost or run twice silently, and stop() waits for
    # executing jobs. A job snoozes for 0 s in thread A, so the scheduler
    # queues it again and thread B starts attempt 2. Thread A then fails outside
    # perform (a job.stop handler raises KeyboardInterrupt, which events
    # re-raise) and its crash handler calls crashed() for the job. crashed()
    # must leave attempt 2, which thread A does not run, to thread B.
    _SECOND_ATTEMPT.clear()
    handler_id = unique_name("third-crash")
    crashed_threads: list[threading.Thread] = []

    def crash_after_snooze(event: str, measurements: Any, metadata: Any) -> None:
        job = metadata["job"]
        if (
            job.worker.endswith("SnoozeThenWaitWorker")
            and metadata["state"] is JobState.SCHEDULED
            and not crashed_threads
        ):
            crashed_threads.append(threading.current_thread())
            wait_until(lambda: job.attempt == 2 and job.state is JobState.EXECUTING)
            raise KeyboardInterrupt

    instance = new_instance("third", queues={"default": 2}, shutdown_grace_period=2)
    instance.start()
    queue = instance._queues["default"]
    events.attach(handler_id, ["job.stop"], crash_after_snooze)
    try:
        with caplog.at_level(logging.CRITICAL, logger="stagehand"):
            job = instance.insert(SnoozeThenWaitWorker.new({}))
            wait_until(lambda: len(crashed_threads) == 1)
            crashed_threads[0].join(HANG_GUARD)
            assert not crashed_threads[0].is_alive()
        # Attempt 2 still runs in thread B.
        assert (job.attempt, job.state) == (2, JobState.EXECUTING)
        _SECOND_ATTEMPT.set()
        wait_until(lambda: job.is_final)
        wait_until(lambda: not queue._running)
        assert job.state is JobState.COMPLETED
        assert job.result == "second attempt done"
        assert queue.stats()["stuck"] == 0
    finally:
        _SECOND_ATTEMPT.set()
        events.detach(handler_id)
        instance.stop()


# ---------------------------------------------------------------------------
# insert_all with a schedule past the year 9999


@pytest.mark.parametrize(
    ("testing_mode", "unique"),
    [("manual", None), ("inline", None), ("disabled", {"period": 60})],
    ids=["manual", "inline", "unique"],
)
def test_insert_all_overflow_inserts_nothing(testing_mode: str, unique: Any) -> None:
    # Guarantee: bad input raises a clear error at the call and changes
    # nothing. insert_all gets a valid job, then one whose schedule_in lies
    # past the year 9999. It raises InvalidOption, and no job is inserted,
    # recorded or run.
    clock = FakeClock(start=datetime(9990, 1, 1, tzinfo=UTC))
    with running(
        testing=testing_mode,
        clock=clock,
        queues={"default": {"limit": 1, "paused": True}},
    ) as instance:
        first = EchoWorker.new({"value": 1}, unique=unique)
        late = EchoWorker.new({"value": 2}, schedule_in=(36_500, "days"))

        with pytest.raises(InvalidOption, match="past the year 9999"):
            instance.insert_all([first, late])

        assert instance.jobs() == []
        assert testing.recorded_jobs(instance) == []
        assert (first.id, first.state) == (None, JobState.AVAILABLE)


def test_failed_insert_all_keeps_scheduled_at() -> None:
    # Guarantee: bad input raises a clear error at the call and changes
    # nothing. insert_all gets a valid job, then one whose schedule_in lies
    # past the year 9999, and raises InvalidOption. The valid job, inserted
    # again a minute later, is due when it is inserted, as any job without a
    # schedule is.
    clock = FakeClock(start=datetime(9990, 1, 1, tzinfo=UTC))
    with running(clock=clock, queues={"default": {"limit": 1, "paused": True}}) as (
        instance
    ):
        first = EchoWorker.new({"value": 1})
        late = EchoWorker.new({"value": 2}, schedule_in=(36_500, "days"))
        with pytest.raises(InvalidOption):
            instance.insert_all([first, late])
        assert first.scheduled_at is None

        clock.advance(60)
        instance.insert(first)

        assert first.scheduled_at == first.inserted_at


# ---------------------------------------------------------------------------
# Testing filters given a path that names the worker through another module


def test_refute_enqueued_alias_path() -> None:
    # Guarantee: a testing assertion fails loudly instead of matching nothing.
    # This module imports EchoWorker from workers, so "<this module>.EchoWorker"
    # imports and names the same class. A job inserted with EchoWorker.new
    # carries the path "workers.EchoWorker". Given the other path, which it
    # accepts as valid, refute_enqueued must still see that job.
    alias = f"{__name__}.EchoWorker"
    with running(testing="manual") as instance:
        job = instance.insert(EchoWorker.new({"value": 1}))
        assert job.worker == "workers.EchoWorker"

        with pytest.raises(AssertionError):
            testing.refute_enqueued(instance, worker=alias)


def test_stop_abandons_job_not_yet_started(cleanup: list[Any]) -> None:
    # Guarantee: stop() waits the grace period for executing jobs, then
    # abandons the rest, which never start again. Here the pool's thread has
    # taken a job and marked it executing, and is held before its attempt
    # begins when the grace period ends. stop() must abandon the job, and the
    # thread must not run it afterwards.
    instance = new_instance(
        "third-break", queues={"default": 1}, shutdown_grace_period=0.05
    )
    queue = instance._queues["default"]
    run = queue._runner
    gate = Gate()

    def held_run(job: stagehand.Job, owner: Any) -> bool:
        gate.hold()
        return run(job, owner)

    queue._runner = held_run
    cleanup.append(gate.release.set)
    instance.start()
    cleanup.append(instance.stop)
    job = instance.insert(CountingWorker.new({"n": 1}))
    assert gate.entered.wait(HANG_GUARD)
    assert job.state is JobState.EXECUTING

    instance.stop()
    gate.release.set()
    wait_until(lambda: queue.stuck == 0)

    assert job.state is JobState.DISCARDED
    assert job.errors[-1]["error"].startswith("abandoned: ")
    assert (job.attempt, runs_of(1)) == (0, 0)
