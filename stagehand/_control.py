"""Inspection and control of a running instance: jobs, queues, cancel, retry.

`Stagehand` inherits these methods; they read and change the state that
`stagehand._instance` sets up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from stagehand import events
from stagehand._config import Settings, check_limit
from stagehand._job import Job, JobState
from stagehand._worker import resolve_worker, worker_path
from stagehand.exceptions import (
    InvalidOption,
    JobNotFound,
    QueueNotConfigured,
    ShuttingDown,
)

if TYPE_CHECKING:
    import threading

    from stagehand._clock import Clock
    from stagehand._execute import Executor
    from stagehand._queue import Queue
    from stagehand._retention import Retention
    from stagehand._scheduler import Scheduler
    from stagehand._unique import UniqueTable

__all__ = ["Control"]

logger = logging.getLogger(__name__)

_NEW, _RUNNING, _STOPPING, _STOPPED = "new", "running", "stopping", "stopped"
_WAITING = (JobState.SCHEDULED, JobState.RETRYABLE)


class Control:
    """The inspection and control methods of `stagehand.Stagehand`."""

    name: str
    testing: str
    clock: Clock
    settings: Settings
    _state: str
    _queues: dict[str, Queue]
    _scheduler: Scheduler | None
    _live: dict[str, Job]
    _retained: Retention
    _unique: UniqueTable
    _executor: Executor
    _recorded_lock: threading.Lock
    _recorded: list[Job]

    if TYPE_CHECKING:

        def _finish(self, job: Job, state: JobState) -> None: ...

        def _record_locked(self, job: Job) -> None: ...

    # Inspection

    def get_job(self, job_id: str) -> Job | None:
        """Return the live or retained job with this id, or None."""
        if not isinstance(job_id, str):
            raise TypeError(
                f"job_id must be a job's id string, such as job.id; got {job_id!r}"
            )
        job = self._live.get(job_id)
        if job is None:
            job = self._retained.get(job_id)
            if job is None:
                # retry_job moves a job from retention back to the live jobs:
                # a lookup between the two reads misses it in both.
                job = self._live.get(job_id)
        return job

    def jobs(
        self,
        state: JobState | str | Iterable[JobState | str] | None = None,
        queue: str | None = None,
        worker: type | str | None = None,
    ) -> list[Job]:
        """Return live and retained jobs, oldest insert first, filtered.

        Args:
            state: One state or several, as `JobState` or its string value.
            queue: A queue name.
            worker: A `Worker` subclass or its dotted path.

        Raises:
            InvalidOption: A filter is invalid.
            QueueNotConfigured: `queue` is not configured here.
        """
        states = _check_states(state)
        if queue is not None:
            self._queue(queue)  # raises for a queue that is not configured
        if isinstance(worker, type):
            path: str | None = worker_path(resolve_worker(worker))
        elif worker is None or isinstance(worker, str):
            path = worker
        else:
            raise InvalidOption(
                f"worker must be a Worker subclass or its dotted path; got {worker!r}"
            )
        selected = [
            job
            for job, state in self._snapshot()
            if (states is None or state in states)
            and (queue is None or job.queue == queue)
            and (path is None or job.worker == path)
        ]
        selected.sort(key=_insert_order)
        return selected

    def _snapshot(self) -> list[tuple[Job, JobState]]:
        # Every live and retained job with its state, each read once.
        #
        # Jobs move between the live and retained tables while this runs. A
        # finishing job is retained before its state turns final, and a
        # retried one turns available before it leaves retention, so reading
        # the live jobs that are not final, then the retained ones, then the
        # live ones again misses none. dict.copy() makes no object per entry,
        # so no garbage collection (and no finalizer that lets other threads
        # change the table) runs part way through a copy.
        first = self._live.copy()
        retained = self._retained.jobs()
        second = self._live.copy()

        found: dict[str | None, tuple[Job, JobState]] = {}
        late: list[tuple[Job, JobState]] = []
        finished: list[Job] = []
        for job in retained:
            state = job.state
            found[job.id] = (job, state)
            # A retried job turns available before it leaves retention, so
            # it does not count against the limit.
            if state.is_final:
                finished.append(job)

        for table in (first, second):
            for job_id, job in table.items():
                if job_id in found:
                    continue
                state = job.state
                if state.is_final:
                    # Finished after retention was read: newer than every
                    # retained job.
                    late.append((job, state))
                found[job_id] = (job, state)

        # Show no more finished jobs than retention keeps: the newest ones.
        excess = len(finished) + len(late) - self.settings.retention_limit
        for job in finished[: max(excess, 0)]:
            del found[job.id]
        for job, _ in late[: max(excess - len(finished), 0)]:
            del found[job.id]
        return list(found.values())

    def check_queue(self, queue: str) -> dict[str, Any]:
        """Return the live state of one queue.

        Returns:
            A dict with queue, limit, paused, available, scheduled,
            retryable, executing, stuck (threads still running a job past
            its timeout), threads, and completed, discarded and cancelled
            (among retained jobs).
        """
        stats = self._queue(queue).stats()
        counts = {state: 0 for state in JobState}
        for job, state in self._snapshot():
            if job.queue == queue:
                counts[state] += 1
        # Counted from job states, so a job that just finished is counted as
        # finished and not also as executing.
        for state in (
            JobState.AVAILABLE,
            JobState.SCHEDULED,
            JobState.RETRYABLE,
            JobState.EXECUTING,
        ):
            stats[state.value] = counts[state]
        for state in (JobState.COMPLETED, JobState.DISCARDED, JobState.CANCELLED):
            stats[state.value] = counts[state]
        return stats

    # Control

    def _queue(self, name: str) -> Queue:
        if not isinstance(name, str):
            raise InvalidOption(f"queue must be a queue's name, a str; got {name!r}")
        queue = self._queues.get(name)
        if queue is None:
            raise QueueNotConfigured(
                f"queue {name!r} is not configured on instance {self.name!r}; "
                f"configured queues are {sorted(self._queues)}"
            )
        return queue

    def pause_queue(self, queue: str) -> None:
        """Stop starting jobs from `queue`; executing jobs finish."""
        self._queue(queue).pause()
        logger.info("queue %r of instance %r paused", queue, self.name)
        events.emit("queue.pause", {}, {"queue": queue, "instance": self.name})

    def resume_queue(self, queue: str) -> None:
        """Start running jobs from a paused `queue` again."""
        self._queue(queue).resume()
        logger.info("queue %r of instance %r resumed", queue, self.name)
        events.emit("queue.resume", {}, {"queue": queue, "instance": self.name})

    def scale_queue(self, queue: str, limit: int) -> None:
        """Set the number of worker threads of `queue`, at runtime.

        Scaling down lets busy threads finish their job before they exit.
        """
        target = self._queue(queue)
        target.scale(check_limit(queue, limit))
        logger.info("queue %r of instance %r scaled to %d", queue, self.name, limit)

    def drain_queue(self, queue: str) -> list[Job]:
        """Remove the available jobs of `queue` and return them, unrun."""
        target = self._queue(queue)
        lock = self._recorded_lock if self.testing != "disabled" else target.cond
        with lock:
            if self.testing != "disabled":
                drained = [
                    job
                    for job in self._recorded
                    if job.queue == queue and job.state is JobState.AVAILABLE
                ]
                self._recorded = [job for job in self._recorded if job not in drained]
            else:
                drained = target.drain_locked()
            # Out of the live jobs under the same lock, so a cancel_job that
            # waits for it finds the job gone rather than merely unqueued.
            for job in drained:
                self._live.pop(job.id, None)  # type: ignore[arg-type]
        for job in drained:
            if job.unique is not None:
                self._unique.forget(job)
        return drained

    def cancel_job(self, job_id: str) -> Job:
        """Cancel a job that has not finished, and return it.

        Available, scheduled and retryable jobs become cancelled at once. An
        executing job gets ``cancel_requested = True``, which its worker may
        check; if that attempt then fails, it is cancelled, not retried.

        Raises:
            JobNotFound: No live or retained job has this id.
        """
        job = self._require(job_id)
        while True:
            with self._locks_for(job):
                state = job.state
                queue = self._queues[job.queue]
                taken = False
                if not state.is_final and self._live.get(job.id) is not job:  # type: ignore[arg-type]
                    # Drained, or its insert failed, while this call waited
                    # for the locks: no longer this instance's to cancel.
                    return job
                if (
                    state is JobState.AVAILABLE
                    and self.testing == "disabled"
                    and not queue.remove(job)
                ):
                    # Not in the queue. A worker thread is claiming it, or its
                    # insert is taking it back from a closing queue: wait for
                    # either and look again. Or a thread has claimed it, and
                    # its state shows it once no take is in progress.
                    taken = queue.taking() or queue.pushing(job)
                    state = job.state
                if not taken:
                    taken = False
                    if state is JobState.EXECUTING:
                        job.cancel_requested = True
                        return job
                    if state.is_final:
                        return job
                    if state in _WAITING and self._scheduler is not None:
                        self._scheduler.forget_job(job)
                    job.completed_at = self.clock.now()
                    self._finish(job, JobState.CANCELLED)
            if not taken:
                break
            # A worker thread may have claimed the job a moment ago. Once it
            # has marked its job executing, look again, without the locks
            # meanwhile.
            queue.settle()
        logger.info("job %s (%s) cancelled", job.id, job.worker)
        self._executor.emit_stop(job, 0.0)
        return job

    def retry_job(self, job_id: str) -> Job:
        """Make a scheduled, retryable or finished job available now.

        A job that used all its attempts gets one more. Available and
        executing jobs are returned unchanged.

        Raises:
            JobNotFound: No live or retained job has this id.
        """
        job = self._require(job_id)
        if self._state != _RUNNING:
            raise ShuttingDown(
                f"instance {self.name!r} is not running, so job {job_id} cannot "
                "run again; retry it on a running instance"
            )
        with self._locks_for(job):
            closed = (
                self._queues[job.queue]._closed
                if self.testing == "disabled"
                else self._state != _RUNNING
            )
            if closed:
                # stop() got this far while this call waited for the locks.
                raise ShuttingDown(
                    f"instance {self.name!r} stopped, so job {job_id} cannot run "
                    "again; retry it on a running instance"
                )
            state = job.state
            if state in (JobState.AVAILABLE, JobState.EXECUTING):
                return job
            waiting = state in _WAITING and self._scheduler is not None
            if (
                waiting
                and not self._scheduler.forget_job(job)  # type: ignore[union-attr]
                and job._schedule_seq != 0
            ):
                # In transit from the scheduler to its queue: available soon.
                # A job at 0 is still being inserted, and its insert skips it
                # once this call has made it available.
                return job
            if job.attempt >= job.max_attempts:
                job.max_attempts = job.attempt + 1
            job.cancel_requested = False
            job.completed_at = None
            job.scheduled_at = self.clock.now()
            # A final job stays live for a moment while its _finish runs. Wait
            # until _finish removes it, so the job re-added here stays live.
            if state.is_final:
                while self._live.get(job.id) is job:  # type: ignore[arg-type]
                    time.sleep(0)
            self._live[job.id] = job  # type: ignore[index]
            # No longer final before it leaves retention, so jobs() lists it
            # throughout; out of retention before it can run and finish again.
            job.state = JobState.AVAILABLE
            self._retained.pop(job.id)  # type: ignore[arg-type]
            if self.testing == "disabled":
                self._queues[job.queue].push_locked(job)
            else:
                self._record_locked(job)
        logger.info("job %s (%s) made available by retry_job", job.id, job.worker)
        return job

    def _require(self, job_id: str) -> Job:
        job = self.get_job(job_id)
        if job is None:
            raise JobNotFound(
                f"no live or retained job has id {job_id!r}; finished jobs are "
                f"kept for {self.settings.retention_period:g} s, and at most "
                f"{self.settings.retention_limit:,} of them (retention_limit)"
            )
        return job

    def _locks_for(self, job: Job) -> _Locks:
        locks: list[Any] = []
        if self._scheduler is not None:
            locks.append(self._scheduler.cond)
        if self.testing == "disabled":
            locks.append(self._queues[job.queue].cond)
        else:
            locks.append(self._recorded_lock)
        return _Locks(locks)


class _Locks:
    """Holds several locks in the given order: scheduler first, then queue."""

    def __init__(self, locks: list[Any]):
        self._locks = locks

    def __enter__(self) -> None:
        for lock in self._locks:
            lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        for lock in reversed(self._locks):
            lock.release()


def _check_states(
    state: JobState | str | Iterable[JobState | str] | None,
) -> frozenset[JobState] | None:
    if state is None:
        return None
    values = [state] if isinstance(state, str) else list(state)
    try:
        return frozenset(JobState(value) for value in values)
    except ValueError:
        raise InvalidOption(
            f"state must be one of {[s.value for s in JobState]}; got {state!r}"
        ) from None


def _insert_order(job: Job) -> Any:
    # A job handed over by another peer keeps its inserted_at but gets a
    # new sequence number here, so the time orders first. On the system
    # clock it is an int of nanoseconds, otherwise an aware datetime.
    inserted = job._inserted_at
    if isinstance(inserted, datetime):
        inserted = (inserted - _EPOCH) // _MICROSECOND * 1000
    return (inserted or 0, job._sequence)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
