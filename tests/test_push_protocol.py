"""The lock-free push against cancel_job, retry_job and stop().

A push stores its job in the queue's `_pending` table, then makes it live,
then puts its key on the heap. Each test stops threads at chosen steps with
gates in the tables the engine uses (`_pushing`, `_pending`, retention, the
live jobs). A gate there has the same effect as the thread being
descheduled at that step.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from support import (
    HANG_GUARD,
    Gate,
    HeldTable,
    lost_jobs,
    new_instance,
    run_in_thread,
    wait_until,
    watching,
)
from workers import CountingWorker, runs_of

import stagehand
from stagehand import Job, JobState
from stagehand.exceptions import JobNotFound, ShuttingDown

pytestmark = pytest.mark.usefixtures("clear_counts")

# Seconds a call that correct code returns from at once may take, and the
# time a call that must wait is watched before the test lets it go on.
PROMPT = 10.0
WATCHED = 0.3


class HeldRetention:
    """Retention whose first add, or first pop, by `thread` waits.

    cancel_job adds a job to retention just before it marks the job
    cancelled. retry_job pops it after it marks the job available and
    before it queues it.
    """

    def __init__(self, retained: Any, step: str) -> None:
        self._retained = retained
        self.step = step
        self.thread: int | None = None
        self.gate = Gate()

    def _hold(self, step: str) -> None:
        if (
            step == self.step
            and threading.get_ident() == self.thread
            and not self.gate.entered.is_set()
        ):
            self.gate.hold()

    def add(self, job: Job) -> None:
        self._hold("add")
        self._retained.add(job)

    def pop(self, job_id: str) -> Any:
        self._hold("pop")
        return self._retained.pop(job_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._retained, name)


class LiveGates(dict):  # type: ignore[type-arg]
    """A live-jobs table with two gates for the thread `thread`.

    `stored` stops its first store just after the store, and `popping` its
    first pop just before the pop.
    """

    def __init__(self) -> None:
        super().__init__()
        self.thread: int | None = None
        self.stored = Gate()
        self.popping = Gate()
        # _insert_as opens this gate at cleanup; the other one too.
        self.gate = self.stored

    def _mine(self, gate: Gate) -> bool:
        return threading.get_ident() == self.thread and not gate.entered.is_set()

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if self._mine(self.stored):
            self.stored.hold()

    def pop(self, *args: Any) -> Any:
        if self._mine(self.popping):
            self.popping.hold()
        return super().pop(*args)


def _insert_as(
    cleanup: list[Any], instance: stagehand.Stagehand, job: Job, *holders: Any
) -> tuple[threading.Thread, list[Any]]:
    """Insert `job` in a new thread, which becomes each holder's `thread`."""

    def insert() -> Job:
        for holder in holders:
            holder.thread = threading.get_ident()
        return instance.insert(job)

    started = run_in_thread(cleanup, insert)
    for holder in holders:
        # Cleanup runs last first: the gates open before the join.
        cleanup.append(holder.gate.release.set)
    return started


def _call_as(
    cleanup: list[Any], holder: Any, call: Any, *args: Any
) -> tuple[threading.Thread, list[Any]]:
    """Run `call(*args)` in a new thread, which becomes `holder.thread`."""

    def body() -> Any:
        holder.thread = threading.get_ident()
        return call(*args)

    started = run_in_thread(cleanup, body)
    cleanup.append(holder.gate.release.set)
    return started


def _started(cleanup: list[Any], instance: stagehand.Stagehand) -> None:
    instance.start()
    cleanup.append(instance.stop)


def _idle(queue: Any) -> None:
    """Wait until every thread of `queue` sleeps, so no take is under way."""
    wait_until(lambda: list.__len__(queue._sleepers) == queue.limit)


def _reached(gate: Gate, thread: threading.Thread) -> None:
    """Wait until `thread` waits at `gate`, or has ended without reaching it."""
    wait_until(lambda: gate.entered.is_set() or not thread.is_alive())


# ---------------------------------------------------------------------------
# cancel_job and retry_job against a push under way


def test_job_unseen_until_queued(cleanup: list[Any]) -> None:
    # Until the push has stored the job in `_pending`, the job is not live,
    # so cancel_job cannot act on a job that it would then find nowhere.
    instance = new_instance("pushproto", queues={"default": 1})
    pending = HeldTable(after=False)
    instance._queues["default"]._pending = pending
    _started(cleanup, instance)
    job = CountingWorker.new({"n": 1})
    inserter, outcome = _insert_as(cleanup, instance, job, pending)
    assert pending.gate.entered.wait(HANG_GUARD)
    job_id: str = job.id  # type: ignore[assignment]

    assert instance.get_job(job_id) is None
    with pytest.raises(JobNotFound):
        instance.cancel_job(job_id)
    with watching() as watcher:
        pending.gate.release.set()
        inserter.join(PROMPT)
        watcher.wait_final(job, timeout=PROMPT)
    assert outcome == [job]
    assert (job.state, runs_of(1)) == (JobState.COMPLETED, 1)


def test_cancel_before_key_on_heap(cleanup: list[Any]) -> None:
    # The job is stored and live, but its key is not on the heap yet.
    # cancel_job takes it out of `_pending` and cancels it at once. The key
    # the push adds afterwards is skipped, and the job never runs.
    instance = new_instance("pushproto", queues={"default": 1})
    queue = instance._queues["default"]
    live = LiveGates()
    instance._live = live
    _started(cleanup, instance)
    job = CountingWorker.new({"n": 1})
    inserter, outcome = _insert_as(cleanup, instance, job, live)
    assert live.stored.entered.wait(HANG_GUARD)

    returned = instance.cancel_job(job.id)  # type: ignore[arg-type]
    assert returned.state is JobState.CANCELLED
    with watching() as watcher:
        live.stored.release.set()
        inserter.join(PROMPT)
        after = instance.insert(CountingWorker.new({"n": 2}))
        # One thread takes keys in order, and `after` has the larger one.
        watcher.wait_final(after, timeout=PROMPT)
        wait_until(lambda: not queue._heap)
    assert outcome == [job]
    assert (runs_of(1), runs_of(2)) == (0, 1)
    assert job.state is JobState.CANCELLED
    assert queue.available == 0


def test_push_ending_inside_cancel_never_runs(cleanup: list[Any]) -> None:
    # cancel_job has taken the job out of `_pending` but not yet marked it
    # cancelled when the push goes on and ends. The push does not look at
    # the job's state, so nothing it does can queue the job again.
    instance = new_instance("pushproto", queues={"default": 1})
    live = LiveGates()
    instance._live = live
    retention = HeldRetention(instance._retained, "add")
    instance._retained = retention  # type: ignore[assignment]
    _started(cleanup, instance)
    job = CountingWorker.new({"n": 1})
    inserter, outcome = _insert_as(cleanup, instance, job, live)
    assert live.stored.entered.wait(HANG_GUARD)

    canceller, cancelled = _call_as(cleanup, retention, instance.cancel_job, job.id)
    assert retention.gate.entered.wait(HANG_GUARD)
    live.stored.release.set()
    inserter.join(PROMPT)
    retention.gate.release.set()
    canceller.join(PROMPT)

    assert outcome == [job]
    assert cancelled == [job]
    with watching() as watcher:
        after = instance.insert(CountingWorker.new({"n": 2}))
        watcher.wait_final(after, timeout=PROMPT)
    assert (runs_of(1), runs_of(2)) == (0, 1)
    assert (job.state, job.cancel_requested) == (JobState.CANCELLED, False)


def test_cancel_retry_before_key_runs_once(cleanup: list[Any]) -> None:
    # The job is live but its key is not on the heap when cancel_job cancels
    # it and retry_job queues it again under a new key. The push's key is
    # then stale, and the job runs once.
    instance = new_instance(
        "pushproto", queues={"default": {"limit": 1, "paused": True}}
    )
    queue = instance._queues["default"]
    live = LiveGates()
    instance._live = live
    _started(cleanup, instance)
    job = CountingWorker.new({"n": 1})
    inserter, outcome = _insert_as(cleanup, instance, job, live)
    assert live.stored.entered.wait(HANG_GUARD)

    job_id: str = job.id  # type: ignore[assignment]
    assert instance.cancel_job(job_id).state is JobState.CANCELLED
    assert instance.retry_job(job_id).state is JobState.AVAILABLE
    live.stored.release.set()
    inserter.join(PROMPT)
    assert outcome == [job]
    assert queue.available == 1
    with watching() as watcher:
        after = instance.insert(CountingWorker.new({"n": 2}))
        instance.resume_queue("default")
        watcher.wait_final(job, after, timeout=PROMPT)
        wait_until(lambda: not queue._heap)
    assert (runs_of(1), runs_of(2)) == (1, 1)
    assert job.state is JobState.COMPLETED


def test_cancel_waits_for_withdrawn_push(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    # stop() closed the queue during the push, which has taken its job back
    # out of `_pending` but not yet out of the live jobs. cancel_job finds
    # the job live but not queued, and must wait for the push rather than
    # cancel a job whose insert is failing. Once the insert has raised,
    # cancel_job returns the job unchanged: available, with no id.
    instance = new_instance("pushproto", queues={"default": 1})
    queue = instance._queues["default"]
    live = LiveGates()
    instance._live = live
    _started(cleanup, instance)
    cleanup.append(live.popping.release.set)
    job = CountingWorker.new({"n": 1})
    with caplog.at_level(logging.WARNING, logger="stagehand"):
        inserter, outcome = _insert_as(cleanup, instance, job, live)
        assert live.stored.entered.wait(HANG_GUARD)
        stopper, _ = run_in_thread(cleanup, instance.stop)
        wait_until(lambda: queue._closed)
        live.stored.release.set()
        assert live.popping.entered.wait(HANG_GUARD)

        canceller, cancelled = run_in_thread(cleanup, instance.cancel_job, job.id)
        canceller.join(WATCHED)
        cancel_returned_early = not canceller.is_alive()
        live.popping.release.set()
        inserter.join(PROMPT)
        canceller.join(PROMPT)
        stopper.join(PROMPT)

    assert not cancel_returned_early, "cancel_job did not wait for the push"
    assert len(outcome) == 1
    assert isinstance(outcome[0], ShuttingDown), outcome
    assert cancelled == [job]
    assert (job.id, job.state, job._queue_seq) == (None, JobState.AVAILABLE, 0)
    assert dict(instance._live) == {}
    assert runs_of(1) == 0
    assert lost_jobs(caplog.records, instance.name)[0] == 0


# ---------------------------------------------------------------------------
# stop() against a push that begins after the queue closed


def test_late_push_not_counted_lost(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    # The insert passed its check that the instance runs, but its push had
    # not begun when stop() closed the queue, so close() did not wait for
    # it. stop() counts the queued jobs while the push is descheduled. The
    # push must find the queue closed before it stores the job, so the
    # insert raises and stop() counts no job for it.
    instance = new_instance("pushproto", queues={"default": 1})
    queue = instance._queues["default"]
    pushing = HeldTable(after=False)
    queue._pushing = pushing
    pending = HeldTable(after=True)
    queue._pending = pending
    _started(cleanup, instance)
    _idle(queue)
    counting = Gate()
    cleanup.append(counting.release.set)
    real_wait_idle = queue.wait_idle

    def wait_idle_held(deadline: float, monotonic: Any) -> bool:
        # stop() has closed every queue and waited for the takes and pushes
        # under way.
        counting.hold()
        return real_wait_idle(deadline, monotonic)

    queue.wait_idle = wait_idle_held  # type: ignore[method-assign]
    job = CountingWorker.new({"n": 1})
    with caplog.at_level(logging.WARNING, logger="stagehand"):
        inserter, outcome = _insert_as(cleanup, instance, job, pushing, pending)
        assert pushing.gate.entered.wait(HANG_GUARD)
        stopper, _ = run_in_thread(cleanup, instance.stop)
        assert counting.entered.wait(HANG_GUARD)
        pushing.gate.release.set()
        # The job is in `_pending`, and the push has not read `_closed`.
        _reached(pending.gate, inserter)
        counting.release.set()
        stopper.join(PROMPT)
        assert not stopper.is_alive()
        pending.gate.release.set()
        inserter.join(PROMPT)

    assert len(outcome) == 1
    assert isinstance(outcome[0], ShuttingDown), outcome
    assert (job.id, job.state, queue.available) == (None, JobState.AVAILABLE, 0)
    assert runs_of(1) == 0
    assert lost_jobs(caplog.records, instance.name)[0] == 0


# ---------------------------------------------------------------------------
# A failed insert against cancel_job


def test_unstamp_holds_cancel_locks(cleanup: list[Any]) -> None:
    # A scheduled insert made its job live, then found the scheduler
    # stopped, and is undoing its stamp. It checks the job and resets it
    # under the locks that cancel_job takes, so a cancel_job that found the
    # job live waits, then returns the job as the undo left it: available,
    # with no id. Without the locks, the undo would reset a job that
    # cancel_job had just returned cancelled.
    instance = new_instance("pushproto", queues={"default": 1})
    live = LiveGates()
    instance._live = live
    _started(cleanup, instance)
    cleanup.append(live.popping.release.set)
    job = CountingWorker.new({"n": 1}, schedule_in=60)
    inserter, outcome = _insert_as(cleanup, instance, job, live)
    assert live.stored.entered.wait(HANG_GUARD)
    job_id: str = job.id  # type: ignore[assignment]
    instance.stop()
    live.stored.release.set()
    assert live.popping.entered.wait(HANG_GUARD)

    def cancel() -> tuple[Job, JobState, str | None]:
        returned = instance.cancel_job(job_id)
        return returned, returned.state, returned.id

    canceller, cancelled = run_in_thread(cleanup, cancel)
    canceller.join(WATCHED)
    cancel_returned_early = not canceller.is_alive()
    live.popping.release.set()
    inserter.join(PROMPT)
    canceller.join(PROMPT)

    assert not cancel_returned_early, "cancel_job ran inside the undo"
    assert len(outcome) == 1
    assert isinstance(outcome[0], ShuttingDown), outcome
    assert cancelled == [(job, JobState.AVAILABLE, None)]
    assert (job.id, job.state) == (None, JobState.AVAILABLE)
    assert instance.get_job(job_id) is None
    assert runs_of(1) == 0
