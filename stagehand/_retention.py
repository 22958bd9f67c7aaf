"""Finished jobs kept for inspection, for a period and up to a count."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from stagehand._job import Job

__all__ = ["Retention"]

# One retained job: (expiry on the timer's scale, job).
_Entry = tuple[float, Job]


class Retention:
    """Finished jobs by id, oldest first, each kept for `period` seconds.

    Every job gets the same period, so jobs expire in the order they were
    added, and both the time limit and the count limit only ever remove the
    oldest entries. A dict finds a job by id and a deque of the same entries
    keeps their order, so adding and trimming cost constant time per job.
    (An `OrderedDict` took a third of a no-op job's run time, and
    `cachetools.TTLCache` half of it.)

    Worker threads add without the lock: a dict store and a deque append are
    each one step under the GIL. Trimming takes the lock, and an add trims
    only if the lock is free; readers trim under the lock before they look,
    so they never see more than `limit` jobs or an expired one.

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
        self._by_id: dict[str, _Entry] = {}
        # The same entries in the order they were added. An entry whose job
        # left through pop(), or was added again since, is stale: the dict
        # no longer holds that entry object, and trimming skips it.
        self._order: deque[_Entry] = deque()
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
        entry = (now + self._period, job)
        # A retried job left through pop() before it ran again, so ids added
        # here are new.
        self._by_id[job.id] = entry  # type: ignore[index]
        self._order.append(entry)
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
            entry = self._by_id.get(job_id)
        return None if entry is None else entry[1]

    def pop(self, job_id: str) -> Job | None:
        with self._lock:
            entry = self._by_id.pop(job_id, None)
        return None if entry is None else entry[1]

    def jobs(self) -> list[Job]:
        """Return the retained jobs, oldest first."""
        with self._lock:
            self._trim(self._timer())
            entries = list(self._by_id.values())
        # Worker threads may have added more since the trim.
        return [job for _, job in entries[-self._limit :]] if self._limit else []

    def __len__(self) -> int:
        with self._lock:
            self._trim(self._timer())
            return min(len(self._by_id), self._limit)

    def _trim(self, now: float) -> None:
        # Called with the lock held; worker threads may still add at the
        # right end. Drops entries from the left while there are too many
        # jobs or the oldest has expired, then sets when add() trims next.
        by_id = self._by_id
        order = self._order
        limit = self._limit
        while order:
            expires, job = order[0]
            if by_id.get(job.id) is not order[0]:  # type: ignore[arg-type]
                order.popleft()  # stale
                continue
            if expires > now and len(by_id) <= limit:
                self._trim_at = expires + self._time_slack
                return
            order.popleft()
            del by_id[job.id]  # type: ignore[arg-type]
        self._trim_at = 0.0

    def clear(self) -> None:
        with self._lock:
            self._by_id.clear()
            self._order.clear()
