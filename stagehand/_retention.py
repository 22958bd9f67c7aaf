"""Finished jobs kept for inspection, for a period and up to a count."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from stagehand._job import Job

__all__ = ["Retention"]


class Retention:
    """Finished jobs by id, oldest first, each kept for `period` seconds.

    Every job gets the same period, so jobs expire in the order they were
    added, and both the time limit and the count limit only ever remove the
    oldest entries. An `OrderedDict` does that in constant time per job.
    (`cachetools.TTLCache` does the same work but took about half of a
    no-op job's run time in a profile of the worker thread.)

    Args:
        period: Seconds a job stays, on the `timer` scale.
        limit: Jobs kept at most; 0 keeps none.
        timer: Monotonic time source, in seconds.
    """

    def __init__(self, period: float, limit: int, timer: Callable[[], float]):
        self._period = period
        self._limit = limit
        self._timer = timer
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, tuple[float, Job]] = OrderedDict()
        self._next_expiry = 0.0

    def add(self, job: Job) -> None:
        if not self._limit:
            return
        now = self._timer()
        jobs = self._jobs
        # One C call, so worker threads add jobs without taking the lock. A
        # retried job left through pop() before it runs again, so ids added
        # here are new and the order stays oldest first.
        jobs[job.id] = (now + self._period, job)  # type: ignore[index]
        # Trimming takes the lock only if it is free: a thread that finds it
        # taken leaves the work to the holder or to the next add, and readers
        # trim under the lock before they look, so they never see more than
        # `limit` jobs.
        if (len(jobs) > self._limit or now >= self._next_expiry) and (
            self._lock.acquire(blocking=False)
        ):
            try:
                self._trim(now)
            finally:
                self._lock.release()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._trim(self._timer())
            entry = self._jobs.get(job_id)
        return None if entry is None else entry[1]

    def pop(self, job_id: str) -> Job | None:
        with self._lock:
            entry = self._jobs.pop(job_id, None)
        return None if entry is None else entry[1]

    def jobs(self) -> list[Job]:
        """Return the retained jobs, oldest first."""
        with self._lock:
            self._trim(self._timer())
            return [job for _, job in self._jobs.values()]

    def __len__(self) -> int:
        with self._lock:
            self._trim(self._timer())
            return len(self._jobs)

    def _trim(self, now: float) -> None:
        # Called with the lock held; worker threads may still add at the end.
        # Drops the oldest jobs beyond the limit, then expired ones, and
        # remembers when the oldest remaining one expires, so add() only
        # trims when one may have. After a count trim that time is left as
        # it was: too early at worst, which costs one extra check.
        jobs = self._jobs
        for _ in range(len(jobs) - self._limit):
            jobs.popitem(last=False)
        if now < self._next_expiry:
            return
        while jobs:
            # The oldest entry is taken in one call rather than by iterating,
            # which an add from another thread would interrupt; one that has
            # not expired goes back to the front.
            job_id, entry = jobs.popitem(last=False)
            if entry[0] > now:
                jobs[job_id] = entry
                jobs.move_to_end(job_id, last=False)
                self._next_expiry = entry[0]
                return
        self._next_expiry = 0.0

    def clear(self) -> None:
        with self._lock:
            self._jobs.clear()
