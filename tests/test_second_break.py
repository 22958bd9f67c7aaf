"""Races of retry_job and stop(), and holds and filters in testing modes.

As in test_break_review.py, each race test stops one thread at a chosen point
with a gate: a wrapped dict, method or attribute that waits on an event,
which has the same effect as the thread being descheduled there.
"""

from __future__ import annotations

import logging
import sys
import threading
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
from workers import CountingWorker, FailingWorker, runs_of

import stagehand
from stagehand import JobState, testing
from stagehand._job import Job
from stagehand.exceptions import ShuttingDown
from stagehand.testing import FakeClock

pytestmark = pytest.mark.usefixtures("clear_counts")


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.WARNING
    ]


# ---------------------------------------------------------------------------
# stop() against retries and retry_job

_BACKOFF_GATES: dict[str, Gate] = {}


class GatedBackoffWorker(stagehand.Worker):
    """Fails every attempt; its backoff waits on the gate named in args."""

    max_attempts = 5

    def backoff(self, job: stagehand.Job) -> float:
        _BACKOFF_GATES[job.args["gate"]].hold()
        return 10.0

    def perform(self, job: stagehand.Job) -> None:
        raise RuntimeError(f"attempt {job.attempt} failed")


def test_retry_held_after_stop_is_not_lost_silently(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    # An attempt has failed and its thread is in the worker's backoff() when
    # the grace period ends, so stop() neither abandons nor counts the job.
    # When backoff() returns, the job is held in the stopped scheduler, where
    # it never runs, so it must be logged as lost by id.
    name = unique_name("second-break")
    gate = _BACKOFF_GATES[name] = Gate()
    instance = new_instance(
        "second-break",
        queues={"default": 1},
        clock=FakeClock(),
        shutdown_grace_period=0.05,
    )
    instance.start()
    cleanup.append(instance.stop)
    cleanup.append(gate.release.set)

    with watching() as watcher, caplog.at_level(logging.INFO, logger="stagehand"):
        job = instance.insert(GatedBackoffWorker.new({"gate": name}))
        assert gate.entered.wait(HANG_GUARD)
        instance.stop()
        gate.release.set()
        watcher.wait_stops(job, 1)

    # Warnings from the start of stop() on; the failed attempt's own error
    # comes before it.
    messages = [record.getMessage() for record in caplog.records]
    since_stop = messages.index(f"stagehand instance {instance.name!r} stopping")
    mentioned = [
        record.getMessage()
        for record in caplog.records[since_stop:]
        if record.levelno >= logging.WARNING and job.id in record.getMessage()
    ]
    assert job.state.is_final or mentioned, (job.state, messages[since_stop:])


def test_retry_job_racing_stop_is_rejected(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    # retry_job is held after its first check that the instance runs, and
    # before it takes the locks, while stop() runs to the end. It must then
    # raise ShuttingDown and leave the job completed, not queue it in a
    # closed queue that stop() has already counted.
    instance = new_instance("second-break", queues={"default": 1})
    instance.start()
    cleanup.append(instance.stop)
    with watching() as watcher:
        job = instance.insert(CountingWorker.new({"n": 1}))
        watcher.wait_final(job)

    locks_for = instance._locks_for
    gate = Gate()
    cleanup.append(gate.release.set)
    main = threading.get_ident()

    def gated_locks_for(target: Job) -> Any:
        if threading.get_ident() != main:
            gate.hold()
        return locks_for(target)

    instance._locks_for = gated_locks_for  # type: ignore[method-assign]
    thread, outcome = run_in_thread(cleanup, instance.retry_job, job.id)
    assert gate.entered.wait(HANG_GUARD)
    with caplog.at_level(logging.INFO, logger="stagehand"):
        instance.stop()
    gate.release.set()
    thread.join(HANG_GUARD)

    lost = [message for message in _warnings(caplog) if "are lost" in message]
    assert isinstance(outcome[0], ShuttingDown) or lost, (outcome, job.state)
    if isinstance(outcome[0], ShuttingDown):
        assert job.state is JobState.COMPLETED
    assert runs_of(1) == 1


# ---------------------------------------------------------------------------
# retry_job during a scheduled insert


def test_retry_during_scheduled_insert_makes_job_available(
    cleanup: list[Any],
) -> None:
    # retry_job makes a scheduled job available now. Here the inserting
    # thread is held after it stores a job scheduled in 60 s in the live
    # table and before it hands the job to the scheduler. The job must be
    # available once retry_job returns, and stay so after the insert goes on.
    clock = FakeClock()
    live = HeldLive()
    instance = new_instance(
        "second-break", queues={"default": {"limit": 1, "paused": True}}, clock=clock
    )
    instance._live = live
    instance.start()
    cleanup.append(instance.stop)
    cleanup.append(live.gate.release.set)
    job = CountingWorker.new({"n": 1}, schedule_in=60)

    def insert() -> Job:
        live.thread = threading.get_ident()
        return instance.insert(job)

    inserter, _ = run_in_thread(cleanup, insert)
    assert live.gate.entered.wait(HANG_GUARD)
    retried = instance.retry_job(job.id)  # type: ignore[arg-type]
    live.gate.release.set()
    inserter.join(HANG_GUARD)
    assert not inserter.is_alive()
    assert retried.state is JobState.AVAILABLE
    assert job.state is JobState.AVAILABLE


# ---------------------------------------------------------------------------
# Testing modes: the hold without a scheduler, stop() and filters


def test_cancel_during_manual_hold_is_not_retried(cleanup: list[Any]) -> None:
    # An executing job gets cancel_requested from cancel_job; if its attempt
    # then fails, it is cancelled, not retried. A testing="manual" instance
    # runs jobs in drain_queue(). Here the draining thread has failed an
    # attempt and is held as it marks the job retryable, and cancel_job runs
    # meanwhile. The job must end cancelled.
    instance = new_instance("second-break", testing="manual")
    instance.start()
    cleanup.append(instance.stop)
    gate = Gate()
    cleanup.append(gate.release.set)
    drainer: list[int] = []
    slot = Job.__dict__["state"]

    class GatedStateJob(Job):
        # Holds the draining thread as it sets the state to retryable.
        __slots__ = ()

        @property  # type: ignore[override]
        def state(self) -> JobState:
            return slot.__get__(self, Job)  # type: ignore[no-any-return]

        @state.setter
        def state(self, value: JobState) -> None:
            if value is JobState.RETRYABLE and threading.get_ident() in drainer:
                gate.hold()
            slot.__set__(self, value)

    job = instance.insert(FailingWorker.new({}))
    job.__class__ = GatedStateJob

    def drain() -> dict[str, int]:
        drainer.append(threading.get_ident())
        return testing.drain_queue("default", instance)

    drain_thread, _ = run_in_thread(cleanup, drain)
    assert gate.entered.wait(HANG_GUARD)
    # A hold that owns the recorded jobs' lock here makes cancel_job wait
    # for it; one that does not lets cancel_job finish first.
    held_under_lock = instance._recorded_lock.locked()
    canceller, _ = run_in_thread(cleanup, instance.cancel_job, job.id)
    if not held_under_lock:
        canceller.join(HANG_GUARD)
    gate.release.set()
    canceller.join(HANG_GUARD)
    drain_thread.join(HANG_GUARD)
    # cancel_job sets cancel_requested when it finds the job executing, and
    # cancels it outright when it finds it retryable: both end cancelled.
    assert job.state is JobState.CANCELLED


def _waits(thread: threading.Thread) -> bool:
    # True while `thread` is blocked in a wait of the threading module.
    frame = sys._current_frames().get(thread.ident)  # type: ignore[arg-type]
    return (
        frame is not None
        and frame.f_code.co_name in ("wait", "wait_for", "_wait_for_tstate_lock")
        and frame.f_code.co_filename == threading.__file__
    )


_STOPPERS: dict[str, stagehand.Stagehand] = {}


class StopsItsInlineInstanceWorker(stagehand.Worker):
    """Calls stop() on its own instance, then waits until that stop has ended
    or is waiting for this job."""

    def perform(self, job: stagehand.Job) -> str:
        instance = _STOPPERS[job.args["name"]]
        instance.stop()
        name = f"stagehand-stop-{instance.name}"
        stoppers = [t for t in threading.enumerate() if t.name == name]
        wait_until(lambda: all(not t.is_alive() or _waits(t) for t in stoppers))
        return "done"


def test_stop_from_inline_job_does_not_abandon_it(cleanup: list[Any]) -> None:
    # stop() called from a job returns at once and stops in the background.
    # On a testing="inline" instance the job runs in the inserting thread,
    # outside any queue. The background stop must not abandon it: the job
    # returns on its own and must end completed with its result.
    name = unique_name("second-break")
    instance = new_instance(
        "second-break", name=name, testing="inline", shutdown_grace_period=HANG_GUARD
    )
    _STOPPERS[name] = instance
    instance.start()
    cleanup.append(instance.stop)
    job = instance.insert(StopsItsInlineInstanceWorker.new({"name": name}))
    assert instance._stopped.wait(HANG_GUARD)
    assert job.state is JobState.COMPLETED
    assert job.result == "done"


def test_worker_filter_alias_path(cleanup: list[Any]) -> None:
    # A job built as Job(worker=path) keeps that path, and jobs(worker=path)
    # finds it. Here the path names the class through this module, which
    # imports CountingWorker from workers. The testing filters must match
    # the job by the path it was inserted under.
    instance = new_instance("second-break", testing="manual")
    instance.start()
    cleanup.append(instance.stop)
    alias = f"{__name__}.CountingWorker"
    job = instance.insert(stagehand.Job(worker=alias, args={"n": 1}))
    assert instance.jobs(worker=alias) == [job]
    testing.assert_enqueued(instance, worker=alias)
    with pytest.raises(AssertionError):
        testing.refute_enqueued(instance, worker=alias)
