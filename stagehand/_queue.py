"""One queue: a priority heap under a condition, and its pool of threads."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from stagehand._job import Job, JobState
from stagehand.exceptions import ShuttingDown

__all__ = ["Queue"]

logger = logging.getLogger(__name__)

_AVAILABLE = JobState.AVAILABLE
_EXECUTING = JobState.EXECUTING
_PROMOTABLE = frozenset({JobState.AVAILABLE, JobState.SCHEDULED, JobState.RETRYABLE})

# Runs one job in a worker thread. Returns True when the job's timeout took
# the job from this thread, which must then exit: a replacement is running.
Runner = Callable[[Job, "Queue"], bool]


class Queue:
    """A queue's heap of available jobs and the threads that run them.

    Jobs leave the heap strictly by priority (0 first), then in the order
    they became available. The heap holds ``(priority, sequence, job)``
    entries, so jobs themselves are never compared.

    One `threading.Condition` guards every field below. Threads that find
    nothing to do wait on it without a timeout, so an idle queue uses no CPU.
    """

    def __init__(self, name: str, limit: int, runner: Runner, *, paused: bool = False):
        self.name = name
        self.cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[int, int, Job]] = []
        self._sequence = itertools.count()
        self._runner = runner
        self.limit = limit
        self.paused = paused
        self.available = 0
        self.executing = 0
        self.stuck = 0
        self._threads = 0
        self._idle = 0
        self._closed = False
        self._started = False
        self._thread_numbers = itertools.count(1)

    # Starting and stopping

    def start(self) -> None:
        with self.cond:
            self._started = True
            self._spawn(self.limit - self._threads)

    def close(self) -> None:
        """Stop taking jobs from the heap. Running jobs finish; queued stay."""
        with self.cond:
            self._closed = True
            self.cond.notify_all()

    def wait_idle(self, deadline: float, monotonic: Callable[[], float]) -> bool:
        """Wait until no job executes or `deadline` passes; True if idle."""
        with self.cond:
            while self.executing > 0:
                remaining = deadline - monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(min(remaining, threading.TIMEOUT_MAX))
            return True

    def _spawn(self, count: int) -> None:
        for _ in range(max(count, 0)):
            number = next(self._thread_numbers)
            thread = threading.Thread(
                target=self._work,
                name=f"stagehand-{self.name}-{number}",
                daemon=True,
            )
            self._threads += 1
            thread.start()

    # Jobs in and out

    def push(self, job: Job) -> None:
        """Add one new job to the heap and wake one idle thread.

        Raises:
            ShuttingDown: The queue was closed by `stop()`.
        """
        with self.cond:
            self._check_open()
            self.push_locked(job)

    def ensure_open(self) -> None:
        """Raise ShuttingDown if `stop()` closed this queue."""
        with self.cond:
            self._check_open()

    def _check_open(self) -> None:
        if self._closed:
            raise ShuttingDown(
                f"queue {self.name!r} is closed because its instance is stopping; "
                "the job was not inserted"
            )

    def push_locked(self, job: Job) -> None:
        """Add one job to the heap; the caller holds `cond`."""
        job.state = _AVAILABLE
        sequence = next(self._sequence)
        job._queue_seq = sequence
        heapq.heappush(self._heap, (job.priority, sequence, job))
        self.available += 1
        if self._idle and not self.paused:
            self.cond.notify()

    def push_many(self, jobs: Iterable[Job]) -> int:
        """Add the jobs that are not cancelled meanwhile; return how many."""
        heap = self._heap
        sequence = self._sequence
        added = 0
        with self.cond:
            for job in jobs:
                if job.state not in _PROMOTABLE:
                    continue
                job.state = _AVAILABLE
                number = next(sequence)
                job._queue_seq = number
                heapq.heappush(heap, (job.priority, number, job))
                added += 1
            self.available += added
            if self._idle and not self.paused:
                self.cond.notify(min(added, self._idle))
        return added

    def remove(self, job: Job) -> bool:
        """Take an available job out of the count; the caller holds `cond`.

        The heap entry stays and is skipped when it reaches the top.
        """
        if job.state is not _AVAILABLE:
            return False
        self.available -= 1
        return True

    def drain(self) -> list[Job]:
        """Remove every available job, in run order, and return them."""
        with self.cond:
            entries = sorted(self._heap)
            self._heap.clear()
            self.available = 0
        return _current(entries)

    def snapshot_available(self) -> list[Job]:
        with self.cond:
            entries = sorted(self._heap)
        return _current(entries)

    # Control

    def pause(self) -> None:
        with self.cond:
            self.paused = True

    def resume(self) -> None:
        with self.cond:
            self.paused = False
            self.cond.notify_all()

    def scale(self, limit: int) -> None:
        """Set the number of threads; extra threads exit when they go idle."""
        with self.cond:
            self.limit = limit
            if self._started and not self._closed:
                self._spawn(limit - self._threads)
            self.cond.notify_all()

    def release_stuck_slot(self) -> None:
        """Hand the slot of a thread stuck past a job's timeout to a new thread.

        The stuck thread stops counting as executing and as a pool thread.
        """
        with self.cond:
            self.executing -= 1
            self.stuck += 1
            self._threads -= 1
            if not self._closed:
                self._spawn(self.limit - self._threads)
            self.cond.notify_all()

    def stats(self) -> dict[str, Any]:
        with self.cond:
            return {
                "queue": self.name,
                "limit": self.limit,
                "paused": self.paused,
                "available": self.available,
                "executing": self.executing,
                "stuck": self.stuck,
                "threads": self._threads,
            }

    # The worker thread

    def _work(self) -> None:
        try:
            self._work_loop()
        except BaseException:
            logger.critical(
                "worker thread %s of queue %r crashed",
                threading.current_thread().name,
                self.name,
                exc_info=True,
            )
            with self.cond:
                self._threads -= 1
                if not self._closed:
                    self._spawn(self.limit - self._threads)
                self.cond.notify_all()

    def _work_loop(self) -> None:
        cond = self.cond
        heap = self._heap
        runner = self._runner
        finished = False
        while True:
            with cond:
                if finished:
                    self.executing -= 1
                    if self._closed:
                        cond.notify_all()
                job = self._take(cond, heap)
                if job is None:
                    return
            finished = True
            if runner(job, self):
                with cond:
                    self.stuck -= 1
                return

    def _take(
        self, cond: threading.Condition, heap: list[tuple[int, int, Job]]
    ) -> Job | None:
        # Called with cond held. Returns None when this thread must exit.
        while True:
            if self._closed or self._threads > self.limit:
                self._threads -= 1
                cond.notify_all()
                return None
            if heap and not self.paused:
                _, sequence, job = heapq.heappop(heap)
                # A cancelled job, or an entry left behind when a cancelled
                # job was retried, is skipped.
                if job.state is not _AVAILABLE or job._queue_seq != sequence:
                    continue
                job.state = _EXECUTING
                self.available -= 1
                self.executing += 1
                return job
            self._idle += 1
            cond.wait()
            self._idle -= 1


def _current(entries: list[tuple[int, int, Job]]) -> list[Job]:
    # Keeps the entries whose job is still available and queued by them.
    return [
        job
        for _, sequence, job in entries
        if job.state is _AVAILABLE and job._queue_seq == sequence
    ]
