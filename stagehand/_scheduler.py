"""The instance's scheduler: one thread that sleeps until the earliest due time.

Scheduled jobs, retries after backoff, snoozed jobs and job timeouts all wait
here. The thread waits on a condition until the head of its heap is due,
and an insert wakes it only when the new entry becomes the head. So an idle
scheduler uses no CPU, however far away the next due time is.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any

from stagehand._clock import Clock
from stagehand._job import Job, JobState
from stagehand.exceptions import ShuttingDown

__all__ = ["Scheduler"]

logger = logging.getLogger(__name__)

_WAITING = frozenset({JobState.SCHEDULED, JobState.RETRYABLE})

# Entry kinds. A job entry's payload is the Job; a timer entry's payload is a
# callable run in the scheduler thread when due.
_JOB = 0
_TIMER = 1

Promote = Callable[[str, list[Job]], None]


class Scheduler:
    """A heap of ``(due, sequence, kind, payload)`` entries and one thread.

    `due` is on the instance clock's monotonic scale, in seconds. An entry is
    never removed from the middle of the heap: a job that is cancelled or
    retried early changes state or sequence, and its entry is skipped.
    """

    def __init__(self, clock: Clock, promote: Promote, name: str = "default"):
        self.cond = threading.Condition(threading.Lock())
        self._clock = clock
        self._promote = promote
        self._heap: list[tuple[float, int, int, Any]] = []
        self._sequence = itertools.count(1)
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._name = name
        self.waiting = 0

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"stagehand-scheduler-{self._name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self._stopped = True
            self.cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def add_job(self, job: Job, due: float, *, new: bool = False) -> None:
        """Hold `job` until the monotonic time `due`, then promote it.

        A job that cancel_job or retry_job took while it was being inserted
        is no longer scheduled, and is skipped.

        Raises:
            ShuttingDown: `new` is true and the scheduler has stopped.
        """
        with self.cond:
            if new and self._stopped:
                raise ShuttingDown(
                    "the instance is stopping; the scheduled job was not inserted"
                )
            # A job handed over by another peer may wait as retryable.
            if job.state in _WAITING:
                self._push_locked(due, _JOB, job)
                self.waiting += 1

    def hold(
        self, job: Job, state: JobState, scheduled_at: datetime, due: float
    ) -> bool:
        """Put an executing job in `state` and hold it until `due`.

        Runs under `cond`, which cancel_job also acquires, so a cancellation
        requested before this call is seen here. Returns False, changing
        nothing, in that case.
        """
        with self.cond:
            if job.cancel_requested:
                return False
            job.state = state
            job.scheduled_at = scheduled_at
            self._push_locked(due, _JOB, job)
            self.waiting += 1
            if self._stopped:
                # stop() has counted the lost jobs already, so this job is
                # logged on its own.
                logger.warning(
                    "job %s (%s) turned %s after its instance stopped; it is lost",
                    job.id,
                    job.worker,
                    state.value,
                )
            return True

    def add_jobs(self, jobs: list[tuple[float, Job]]) -> None:
        with self.cond:
            if self._stopped:
                raise ShuttingDown(
                    "the instance is stopping; the scheduled jobs were not inserted"
                )
            for due, job in jobs:
                if job.state is JobState.SCHEDULED:
                    self._push_locked(due, _JOB, job)
                    self.waiting += 1

    def call_at(self, due: float, callback: Callable[[], None]) -> None:
        """Run `callback` in the scheduler thread at the monotonic time `due`."""
        with self.cond:
            self._push_locked(due, _TIMER, callback)

    def forget_job(self, job: Job) -> bool:
        """Detach a waiting job from its entry; the caller holds `cond`.

        Returns True when the job was waiting here.
        """
        if job._schedule_seq <= 0 or job.state not in _WAITING:
            return False
        job._schedule_seq = 0
        self.waiting -= 1
        return True

    def _push_locked(self, due: float, kind: int, payload: Any) -> None:
        sequence = next(self._sequence)
        if kind == _JOB:
            payload._schedule_seq = sequence
        entry = (due, sequence, kind, payload)
        heapq.heappush(self._heap, entry)
        if self._heap[0] is entry:
            self.cond.notify()

    def waiting_jobs(self) -> list[Job]:
        """Return the jobs still waiting, earliest first."""
        with self.cond:
            entries = sorted(self._heap)
        return [
            payload
            for _, sequence, kind, payload in entries
            if kind == _JOB
            and payload._schedule_seq == sequence
            and payload.state in _WAITING
        ]

    def take_waiting_locked(self) -> list[Job]:
        """Detach every waiting job and return them. The caller must own `cond`.

        Timer entries stay. The jobs keep their state; none of them is
        promoted later.
        """
        jobs = [
            payload
            for _, sequence, kind, payload in sorted(self._heap)
            if kind == _JOB
            and payload._schedule_seq == sequence
            and payload.state in _WAITING
        ]
        for job in jobs:
            job._schedule_seq = 0
        self.waiting -= len(jobs)
        self._heap = [entry for entry in self._heap if entry[2] != _JOB]
        heapq.heapify(self._heap)
        return jobs

    def _run(self) -> None:
        while True:
            try:
                due_jobs, timers = self._wait_for_due()
                if due_jobs is None:
                    return
                self._dispatch(due_jobs, timers)
            except Exception:
                # The thread carries on: every later scheduled job, retry and
                # timeout depends on it.
                logger.critical(
                    "scheduler thread %r failed and continues",
                    self._name,
                    exc_info=True,
                )

    def _wait_for_due(self) -> tuple[list[Job] | None, list[Callable[[], None]]]:
        heap = self._heap
        clock = self._clock
        with self.cond:
            while True:
                if self._stopped:
                    return None, []
                if not heap:
                    clock.wait(self.cond, None)
                    continue
                now = clock.monotonic()
                if heap[0][0] > now:
                    clock.wait(self.cond, heap[0][0] - now)
                    continue
                return self._pop_due(now)

    def _pop_due(self, now: float) -> tuple[list[Job], list[Callable[[], None]]]:
        heap = self._heap
        jobs: list[Job] = []
        timers: list[Callable[[], None]] = []
        while heap and heap[0][0] <= now:
            _, sequence, kind, payload = heapq.heappop(heap)
            if kind == _TIMER:
                timers.append(payload)
            elif payload._schedule_seq == sequence and payload.state in _WAITING:
                # -1 marks a job in transit to its queue: no longer here.
                payload._schedule_seq = -1
                self.waiting -= 1
                jobs.append(payload)
        return jobs, timers

    def _dispatch(self, jobs: list[Job], timers: list[Callable[[], None]]) -> None:
        by_queue: dict[str, list[Job]] = defaultdict(list)
        for job in jobs:
            by_queue[job.queue].append(job)
        for queue, queued in by_queue.items():
            self._promote(queue, queued)
        for timer in timers:
            try:
                timer()
            except Exception:
                logger.critical("scheduler timer %r failed", timer, exc_info=True)
