"""Inserts against cancel_job, retry_job, stop() and each other.

Each test stops an inserting thread at a chosen step with a gate in an object
the engine calls: the live jobs, the instance clock or a queue's
`ensure_open`. The gate has the same effect as the thread being descheduled
there. Another thread then acts on the job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
from support import (
    HANG_GUARD,
    Gate,
    HeldLive,
    lost_jobs,
    new_instance,
    run_in_thread,
    wait_until,
    watching,
)
from workers import CountingWorker, runs_of

import stagehand
from stagehand import Job, JobState
from stagehand.exceptions import ShuttingDown

pytestmark = pytest.mark.usefixtures("clear_counts")

PROMPT = 10.0


class HeldTime:
    """A wrapper of the instance's time reader whose first call by `thread` waits.

    An insert reads the time once, in `_enqueue`, after validate() and
    before it stamps the job.
    """

    def __init__(self, read: Callable[[], Any]) -> None:
        self._read = read
        self.thread: int | None = None
        self.gate = Gate()

    def __call__(self) -> Any:
        if threading.get_ident() == self.thread and not self.gate.entered.is_set():
            self.gate.hold()
        return self._read()


class UniqueCountingWorker(CountingWorker):
    unique = True


def _started(cleanup: list[Any], instance: stagehand.Stagehand) -> None:
    instance.start()
    cleanup.append(instance.stop)


def _idle(queue: Any) -> None:
    wait_until(lambda: not queue._pending and not queue._running)


# ---------------------------------------------------------------------------
# One Job object inserted by two threads at once


def test_same_job_two_threads_once(cleanup: list[Any]) -> None:
    # Thread A passes validate() and waits before it stamps the job. The
    # main thread inserts the same Job object, and validate() finds no id
    # yet, so it stamps and queues it. A must then find the job stamped and
    # raise InvalidOption, so the job is queued and run once.
    instance = new_instance(
        "insertorder", queues={"default": {"limit": 1, "paused": True}}
    )
    queue = instance._queues["default"]
    _started(cleanup, instance)
    gated_time = HeldTime(instance._time)
    instance._time = gated_time
    cleanup.append(gated_time.gate.release.set)
    job = CountingWorker.new({"n": 1})

    def insert_as_a() -> Job:
        gated_time.thread = threading.get_ident()
        return instance.insert(job)

    inserter, outcome = run_in_thread(cleanup, insert_as_a)
    assert gated_time.gate.entered.wait(HANG_GUARD)
    second: Any
    try:
        second = instance.insert(job)
    except stagehand.InvalidOption as error:
        second = error
    gated_time.gate.release.set()
    inserter.join(PROMPT)
    results = [outcome[0], second]
    listed = [seen for seen in instance.jobs() if seen is job]
    available = queue.available
    instance.resume_queue("default")
    _idle(queue)

    assert sum(isinstance(result, stagehand.InvalidOption) for result in results) == 1
    assert available == 1
    assert len(listed) == 1
    assert runs_of(1) == 1


# ---------------------------------------------------------------------------
# A scheduled insert, live but not yet held by the scheduler


def test_scheduled_cancel_retry_runs_once(cleanup: list[Any]) -> None:
    # The scheduled insert made its job live and has not called add_job.
    # cancel_job cancels it and retry_job queues it now. add_job then skips
    # the job, which is no longer scheduled: it runs once, nothing waits in
    # the scheduler, and the insert returns the job.
    # Paused, so that the retried job waits until the checks have read it.
    instance = new_instance(
        "insertorder", queues={"default": {"limit": 1, "paused": True}}
    )
    queue = instance._queues["default"]
    live = HeldLive()
    instance._live = live
    _started(cleanup, instance)
    cleanup.append(live.gate.release.set)
    job = CountingWorker.new({"n": 1}, schedule_in=60)
    inserter, outcome = run_in_thread(cleanup, instance.insert, job, live=live)
    assert live.gate.entered.wait(HANG_GUARD)
    job_id: str = job.id  # type: ignore[assignment]

    with watching() as watcher:
        assert instance.cancel_job(job_id).state is JobState.CANCELLED
        assert instance.retry_job(job_id).state is JobState.AVAILABLE
        instance.resume_queue("default")
        watcher.wait_final(job, timeout=PROMPT)
        live.gate.release.set()
        inserter.join(PROMPT)
    _idle(queue)
    assert outcome == [job]
    assert job.state is JobState.COMPLETED
    assert runs_of(1) == 1
    assert instance._scheduler.waiting == 0  # type: ignore[union-attr]
    assert instance._scheduler.waiting_jobs() == []  # type: ignore[union-attr]
    assert instance.get_job(job_id) is job


# ---------------------------------------------------------------------------
# insert_all: jobs live before they are queued


def _batch_held_at_check(
    cleanup: list[Any], instance: stagehand.Stagehand, jobs: list[Job]
) -> tuple[threading.Thread, list[Any], Gate]:
    """Run insert_all(jobs) in a thread that waits in its first queue check.

    By then every job is stamped and live, and none is queued.
    """
    queue = instance._queues["default"]
    gate = Gate()
    cleanup.append(gate.release.set)
    real_check = queue.ensure_open
    holder: dict[str, int] = {}

    def ensure_open_held() -> None:
        if threading.get_ident() == holder.get("thread") and not gate.entered.is_set():
            gate.hold()
        real_check()

    queue.ensure_open = ensure_open_held  # type: ignore[method-assign]

    def insert_all() -> list[Job]:
        holder["thread"] = threading.get_ident()
        return instance.insert_all(jobs)

    thread, outcome = run_in_thread(cleanup, insert_all)
    assert gate.entered.wait(HANG_GUARD)
    return thread, outcome, gate


def test_batch_cancel_before_push_skipped(cleanup: list[Any]) -> None:
    # insert_all has made three jobs live but queued none. cancel_job finds
    # the first one available, unqueued and not being taken, so it cancels
    # it at once, and push_many then skips it. The second is cancelled and
    # retried in the window, so retry_job queues it and push_many skips it
    # as well: it runs once. The third runs once as usual.
    # Paused, so that the retried job waits until the checks have read it.
    instance = new_instance(
        "insertorder", queues={"default": {"limit": 2, "paused": True}}
    )
    queue = instance._queues["default"]
    _started(cleanup, instance)
    jobs = [CountingWorker.new({"n": n}) for n in (1, 2, 3)]
    thread, outcome, gate = _batch_held_at_check(cleanup, instance, jobs)
    first, second, third = jobs

    with watching() as watcher:
        assert instance.get_job(third.id) is third  # type: ignore[arg-type]
        assert instance.cancel_job(first.id).state is JobState.CANCELLED  # type: ignore[arg-type]
        assert instance.cancel_job(second.id).state is JobState.CANCELLED  # type: ignore[arg-type]
        assert instance.retry_job(second.id).state is JobState.AVAILABLE  # type: ignore[arg-type]
        gate.release.set()
        thread.join(PROMPT)
        instance.resume_queue("default")
        watcher.wait_final(second, third, timeout=PROMPT)
    _idle(queue)
    assert outcome == [jobs]
    assert [job.state for job in jobs] == [
        JobState.CANCELLED,
        JobState.COMPLETED,
        JobState.COMPLETED,
    ]
    assert runs_of(1) == 0
    assert runs_of(2) == 1
    assert runs_of(3) == 1
    assert [len(instance.jobs(state=s)) for s in ("cancelled", "completed")] == [1, 2]


def test_batch_drain_before_push_keeps(cleanup: list[Any]) -> None:
    # drain_queue runs while insert_all's jobs are live but unqueued: it
    # finds none of them, and they all run once afterwards. A job both
    # drained and queued would run although drain_queue returned it.
    instance = new_instance("insertorder", queues={"default": 1})
    queue = instance._queues["default"]
    _started(cleanup, instance)
    jobs = [CountingWorker.new({"n": n}) for n in (1, 2)]
    thread, outcome, gate = _batch_held_at_check(cleanup, instance, jobs)

    assert instance.drain_queue("default") == []
    with watching() as watcher:
        gate.release.set()
        thread.join(PROMPT)
        watcher.wait_final(*jobs, timeout=PROMPT)
    _idle(queue)
    assert outcome == [jobs]
    assert runs_of(1) == 1
    assert runs_of(2) == 1


# ---------------------------------------------------------------------------
# Unique jobs whose insert fails or whose job is drained


def test_unique_withdrawn_push_forgotten(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    # A unique insert is part way through its push (stored and live) when
    # stop() closes the queue. stop() waits for the push, which takes its
    # job back and raises. The unique table contains no entry for it, the job
    # is unstamped, and stop() counts no lost job.
    instance = new_instance("insertorder", queues={"default": 1})
    live = HeldLive()
    instance._live = live
    _started(cleanup, instance)
    cleanup.append(live.gate.release.set)
    job = UniqueCountingWorker.new({"n": 1})
    with caplog.at_level(logging.WARNING, logger="stagehand"):
        inserter, outcome = run_in_thread(cleanup, instance.insert, job, live=live)
        assert live.gate.entered.wait(HANG_GUARD)
        stopper, _ = run_in_thread(cleanup, instance.stop)
        wait_until(lambda: instance._queues["default"]._closed)
        live.gate.release.set()
        inserter.join(PROMPT)
        stopper.join(PROMPT)
    assert not stopper.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], ShuttingDown), outcome
    assert job.id is None
    assert job.state is JobState.AVAILABLE
    assert job._queue_seq == 0
    assert len(instance._unique) == 0
    assert dict(live) == {}
    assert lost_jobs(caplog.records, instance.name) == (0, 0)
    assert runs_of(1) == 0


def test_unique_drained_then_reinserted(cleanup: list[Any]) -> None:
    # A drained unique job no longer blocks its duplicate: the next insert
    # of the same args is a new job, not a conflict, and only it runs.
    instance = new_instance(
        "insertorder", queues={"default": {"limit": 1, "paused": True}}
    )
    queue = instance._queues["default"]
    _started(cleanup, instance)
    first = instance.insert(UniqueCountingWorker.new({"n": 1}))
    blocked = instance.insert(UniqueCountingWorker.new({"n": 1}))
    assert blocked.conflict is True
    assert blocked.id == first.id
    assert instance.drain_queue("default") == [first]
    again = instance.insert(UniqueCountingWorker.new({"n": 1}))
    assert again.conflict is False
    assert again.id != first.id
    with watching() as watcher:
        instance.resume_queue("default")
        watcher.wait_final(again, timeout=PROMPT)
    _idle(queue)
    assert runs_of(1) == 1
    assert first.state is JobState.AVAILABLE
    assert instance.get_job(first.id) is None  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Single and batch inserts, immediate and scheduled, racing stop()


def _stop_during_mixed_inserts(
    cleanup: list[Any], caplog: pytest.LogCaptureFixture, base: int, pause: bool
) -> None:
    """Stop an instance while three threads insert single jobs and batches."""
    instance = new_instance("insertorder", queues={"default": 2})
    _started(cleanup, instance)
    tried: list[list[Job]] = [[], [], []]
    rejected: list[list[Job]] = [[], [], []]

    def insert_until_rejected(index: int) -> None:
        for i in range(300):
            n = base + index * 10_000 + i * 4
            options = {"schedule_in": 60} if i % 3 == 0 else {}
            batch = [CountingWorker.new({"n": n + k}, **options) for k in range(3)]
            single = CountingWorker.new({"n": n + 3})
            tried[index].extend([*batch, single])
            try:
                instance.insert_all(batch)
                instance.insert(single)
            except ShuttingDown:
                if single.id is None:
                    rejected[index].append(single)
                return

    threads = [
        run_in_thread(cleanup, insert_until_rejected, index)[0] for index in range(3)
    ]
    wait_until(lambda: sum(map(len, tried)) >= 120)
    if pause:
        instance.pause_queue("default")
    with caplog.at_level(logging.WARNING, logger="stagehand"):
        instance.stop()
    for thread in threads:
        thread.join(HANG_GUARD)
    assert not any(thread.is_alive() for thread in threads)

    jobs = [job for part in tried for job in part]
    stamped = [job for job in jobs if job.id is not None]
    runs = {job.args["n"]: runs_of(job.args["n"]) for job in jobs}
    assert max(runs.values()) <= 1
    assert all(runs[job.args["n"]] == 0 for job in jobs if job.id is None)
    assert all(job.id is None for part in rejected for job in part)
    available, scheduled = lost_jobs(caplog.records, instance.name)
    counted = sum(runs.values()) + available + scheduled
    assert counted == len(stamped), (runs, available, scheduled)
    assert not instance._queues["default"]._pushing
    caplog.clear()


def test_mixed_inserts_racing_stop_counted(
    frequent_thread_switches: None,
    cleanup: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Three threads insert single jobs and batches, some due now and some in
    # 60 s, until stop() rejects them. Every job that got an id ran once or
    # is among the available or scheduled jobs that stop() logs as lost.
    # A rejected single insert leaves its job without an id, and it never
    # runs. No job runs twice, and pause_queue returns under the load.
    for round_number in range(12):
        _stop_during_mixed_inserts(
            cleanup, caplog, round_number * 100_000, pause=bool(round_number % 2)
        )


# ---------------------------------------------------------------------------
# insert_all stamps a batch of jobs that are due now in one pass


def test_batch_and_single_insert_of_one_job(cleanup: list[Any]) -> None:
    # Thread A's insert_all passes validation and waits before it stamps.
    # The main thread inserts the batch's second job on its own. A must then
    # raise InvalidOption and stamp none of its jobs, so each runs once.
    instance = new_instance(
        "insertorder", queues={"default": {"limit": 1, "paused": True}}
    )
    queue = instance._queues["default"]
    _started(cleanup, instance)
    gated_time = HeldTime(instance._time)
    instance._time = gated_time
    cleanup.append(gated_time.gate.release.set)
    batch = [CountingWorker.new({"n": n}) for n in (1, 2, 3)]

    def insert_as_a() -> list[Job]:
        gated_time.thread = threading.get_ident()
        return instance.insert_all(batch)

    inserter, outcome = run_in_thread(cleanup, insert_as_a)
    assert gated_time.gate.entered.wait(HANG_GUARD)
    single = instance.insert(batch[1])
    gated_time.gate.release.set()
    inserter.join(PROMPT)
    ids = [job.id for job in batch]
    available = queue.available
    instance.resume_queue("default")
    _idle(queue)

    assert isinstance(outcome[0], stagehand.InvalidOption)
    assert single is batch[1]
    assert ids[0] is None
    assert ids[2] is None
    assert available == 1
    assert [runs_of(n) for n in (1, 2, 3)] == [0, 1, 0]


def test_batch_leaves_another_threads_claim(cleanup: list[Any]) -> None:
    # Another thread is stamping the batch's last job (its claim is in
    # _stamping). insert_all raises, stamps nothing, and removes only the
    # claims it made itself.
    from stagehand import _instance

    instance = new_instance("insertorder")
    _started(cleanup, instance)
    batch = [CountingWorker.new({"n": n}) for n in (1, 2, 3)]
    other_thread = threading.get_ident() + 1
    _instance._stamping[id(batch[2])] = other_thread
    cleanup.append(lambda: _instance._stamping.pop(id(batch[2]), None))

    with pytest.raises(stagehand.InvalidOption, match="being inserted by another"):
        instance.insert_all(batch)

    assert [job.id for job in batch] == [None, None, None]
    assert _instance._stamping == {id(batch[2]): other_thread}
    assert instance.jobs() == []
