"""Waiting assertions in the manual and inline modes, and retried jobs."""

from __future__ import annotations

import threading
from typing import Any

from support import HANG_GUARD, running, unique_name
from workers import EchoWorker, FailingWorker

import stagehand
from stagehand import JobState, testing


def test_assert_waits_for_other_thread() -> None:
    with running(testing="manual") as instance:
        waiting = threading.Event()

        def insert_later() -> None:
            waiting.wait(30)
            instance.insert(EchoWorker.new({"value": "late"}))

        inserter = threading.Thread(target=insert_later)
        inserter.start()
        waiting.set()
        job = testing.assert_enqueued(instance, worker=EchoWorker, timeout=30)
        inserter.join(30)

    assert job.args == {"value": "late"}


def test_retry_job_records_again() -> None:
    with running(testing="manual") as instance:
        job = instance.insert(FailingWorker.new({}, max_attempts=1))
        counts = testing.drain_queue("default", instance)
        assert counts["discarded"] == 1
        testing.refute_enqueued(instance, worker=FailingWorker)

        instance.retry_job(job.id)

        assert job.state is JobState.AVAILABLE
        assert testing.assert_enqueued(instance, worker=FailingWorker) is job


# An inline instance, whose insert from another thread must wake a waiter.


class WatchedCondition(threading.Condition):
    """A condition that sets `waiting` when a thread starts to wait on it."""

    def __init__(self, lock: Any) -> None:
        super().__init__(lock)
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


class SnoozeOnceWorker(stagehand.Worker):
    def perform(self, job: stagehand.Job) -> Any:
        return stagehand.Snooze(60)


def test_inline_assert_wakes_on_insert(cleanup: list[Any]) -> None:
    instance = stagehand.Stagehand(testing="inline", name=unique_name("inline-wait"))
    instance.start()
    cleanup.append(instance.stop)
    watched = WatchedCondition(instance._recorded_lock)
    instance._recorded_changed = watched
    found: list[stagehand.Job] = []
    returned = threading.Event()

    def wait_for_snoozed_job() -> None:
        found.append(
            testing.assert_enqueued(instance, worker=SnoozeOnceWorker, timeout=60)
        )
        returned.set()

    waiter = threading.Thread(target=wait_for_snoozed_job, name="inline-waiter")
    waiter.start()

    def wake_and_join() -> None:
        # Wakes a waiter that missed the insert, so that the thread ends now.
        with watched:
            instance._recorded_version += 1
            watched.notify_all()
        waiter.join(HANG_GUARD)

    cleanup.append(wake_and_join)
    # If a fixed assertion waits on something else, this guard times out and
    # the insert follows. The waiter must still find the job.
    watched.waiting.wait(HANG_GUARD)

    job = SnoozeOnceWorker.new({"n": 1}).insert(instance)
    assert job.state == "scheduled"

    assert returned.wait(10)
    assert found == [job]
