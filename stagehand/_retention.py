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
        with self._lock:
            # A retried job left through pop() before it runs again, so ids
            # added here are new and the order stays oldest first.
            jobs[job.id] = (now + self._period, job)  # type: ignore[index]
            if len(jobs) > self._limit:
                jobs.popitem(last=False)
            if now >= self._next_expiry:
                self._expire(now)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._expire(self._timer())
            entry = self._jobs.get(job_id)
        return None if entry is None else entry[1]

    def pop(self, job_id: str) -> Job | None:
        with self._lock:
            entry = self._jobs.pop(job_id, None)
        return None if entry is None else entry[1]

    def jobs(self) -> list[Job]:
        """Return the retained jobs, oldest first."""
        with self._lock:
            self._expire(self._timer())
            return [job for _, job in self._jobs.values()]

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._timer())
            return len(self._jobs)

    def _expire(self, now: float) -> None:
        # Drops expired jobs from the front, then remembers when the oldest
        # remaining one expires, so add() only calls this when one may have.
        jobs = self._jobs
        while jobs:
            expires, _ = next(iter(jobs.values()))
            if expires > now:
                self._next_expiry = expires
                return
            jobs.popitem(last=False)
        self._next_expiry = 0.0

    def clear(self) -> None:
        with self._lock:
            self._jobs.clear()
