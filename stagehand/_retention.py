"""Finished jobs kept for inspection, for a period and up to a count."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from stagehand._job import Job

__all__ = ["Retention"]


class Retention:
    """Finished jobs by id, oldest first, each kept for `period` seconds.

    Every job gets the same period, so jobs expire in the order they were
    added, and both the time limit and the count limit only ever remove the
    oldest entries. A dict finds a job by id, and a deque keeps each job's
    expiry and then the job, in the order they were added, so adding and
    trimming cost constant time per job. (An `OrderedDict` took a third of a
    no-op job's run time, and `cachetools.TTLCache` half of it.) The deque
    takes the two values rather than a tuple of them: a tuple per job was
    one more object for the cyclic garbage collector to count and walk.

    Worker threads add without the lock, because a dict store and a deque
    extend are each one step under the GIL. Trimming and `pop` take the
    lock, and an add trims only if the lock is free. Readers trim under the
    lock before they look, so they never see more than `limit` jobs or an
    expired one.

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
        self._by_id: dict[str, Job] = {}
        # Expiry (on the timer's scale), job, expiry, job, ... oldest first.
        self._order: deque[float | Job] = deque()
        # An add trims only once the table is this many jobs over the limit,
        # or the oldest job expired this long ago, so trimming runs once per
        # batch of finished jobs rather than after each one.
        self._count_slack = max(1, min(1024, limit // 16))
        self._time_slack = min(1.0, period / 16)
        self._trim_at = 0.0

    def add(self, job: Job) -> None:
        if not self._limit:
            return
        now = self._timer()
        # A retried job left through pop() before it ran again, so each job
        # is in the deque once.
        self._by_id[job.id] = job  # type: ignore[index]
        self._order.extend((now + self._period, job))
        if (
            len(self._by_id) > self._limit + self._count_slack or now >= self._trim_at
        ) and self._lock.acquire(blocking=False):
            try:
                self._trim(now)
            finally:
                self._lock.release()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._trim(self._timer())
            return self._by_id.get(job_id)

    def pop(self, job_id: str) -> Job | None:
        """Remove a job so that it can run again; return None if it is not retained.

        Finding the job in the deque takes time in proportion to the jobs
        retained, which is fine for `retry_job`, the only caller.
        """
        with self._lock:
            job = self._by_id.pop(job_id, None)
            if job is not None:
                # Adds only append at the right, and every other removal
                # takes the lock, so the index stays valid.
                index = self._order.index(job)
                del self._order[index]
                del self._order[index - 1]

        return job

    def jobs(self) -> list[Job]:
        """Return the retained jobs, oldest first."""
        with self._lock:
            self._trim(self._timer())
            jobs = list(self._by_id.values())
        # Worker threads may have added more since the trim.
        return jobs[-self._limit :] if self._limit else []

    def __len__(self) -> int:
        with self._lock:
            self._trim(self._timer())
            return min(len(self._by_id), self._limit)

    def _trim(self, now: float) -> None:
        # Called with the lock held; worker threads may still add at the
        # right end. Drops the oldest jobs while there are too many or the
        # oldest has expired, then sets when add() trims next.
        by_id = self._by_id
        order = self._order
        limit = self._limit
        popleft = order.popleft
        while order:
            expires: float = order[0]  # type: ignore[assignment]
            if expires > now and len(by_id) <= limit:
                self._trim_at = expires + self._time_slack
                return
            popleft()
            job: Job = popleft()  # type: ignore[assignment]
            by_id.pop(job.id, None)  # type: ignore[arg-type]
        self._trim_at = 0.0

    def clear(self) -> None:
        with self._lock:
            self._by_id.clear()
            self._order.clear()
