"""Fingerprints of unique jobs and the table that detects duplicates."""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable
from typing import Any

from cachetools import TLRUCache

from stagehand._job import Job

__all__ = ["UniqueTable", "fingerprint"]


def fingerprint(job: Job) -> str:
    """Return the fingerprint of a unique job.

    The fingerprint covers the fields named in ``job.unique["fields"]``,
    restricted to ``job.unique["keys"]`` within args and meta when keys are
    given. It is a SHA-256 of canonical JSON, so dict key order is ignored.
    """
    settings = job.unique
    assert settings is not None
    keys = settings["keys"]
    parts: dict[str, Any] = {}
    for name in settings["fields"]:
        value = getattr(job, name)
        if keys is not None and name in ("args", "meta"):
            value = {key: value[key] for key in keys if key in value}
        parts[name] = value
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class RemoteEntry(Job):
    """A detached record of a unique job that runs on another peer.

    A cluster peer that owns a fingerprint keeps one of these for a job
    that an older owner inserted. `holder` is the peer id of the peer that
    has the job, which reports its current state.
    """

    __slots__ = ("holder",)

    holder: str


class UniqueTable:
    """Fingerprints of recent unique jobs, each expiring after its period.

    Entries live in a `cachetools.TLRUCache` whose time-to-use is each job's
    own `unique["period"]`, measured on the instance clock. When the table
    is full, the least recently used entry is evicted.

    Args:
        timer: Monotonic time source, in seconds.
        maxsize: Number of fingerprints kept at most.
    """

    def __init__(self, timer: Callable[[], float], maxsize: int):
        self._lock = threading.Lock()
        # Expiry times for entries that `put` stores, read once by the
        # cache's time-to-use function as the entry goes in.
        self._expires: dict[str, float] = {}
        self._cache: TLRUCache[str, Job] = TLRUCache(
            maxsize=maxsize, ttu=self._time_to_use, timer=timer
        )

    def insert(self, job: Job, enqueue: Callable[[Job], Job]) -> Job:
        """Insert `job` with `enqueue` unless a blocking duplicate exists.

        The check and the insert run under one lock, so of many threads that
        insert the same unique job at once, exactly one enqueues it.

        Returns:
            The inserted job, or a detached copy of the existing duplicate
            with ``conflict=True``.
        """
        inserted = self.insert_if_owned(job, enqueue, None)
        assert inserted is not None
        return inserted

    def insert_if_owned(
        self,
        job: Job,
        enqueue: Callable[[Job], Job],
        owns: Callable[[str], bool] | None,
    ) -> Job | None:
        """Do what `insert` does if `owns` accepts the job's fingerprint.

        In a cluster, `owns` returns whether this peer still owns the
        fingerprint. It runs under the lock that `take` holds too, so an
        entry stored here cannot miss a move of its fingerprint to a peer
        that has just joined.

        Returns:
            What `insert` returns, or None when `owns` returned false and
            nothing was inserted.
        """
        assert job.unique is not None
        key = fingerprint(job)
        states = job.unique["states"]
        with self._lock:
            if owns is not None and not owns(key):
                return None
            existing = self._cache.get(key)
            if existing is not None and existing.state.value in states:
                duplicate = existing.snapshot()
                duplicate.conflict = True
                return duplicate
            inserted = enqueue(job)
            self._cache[key] = inserted
            return inserted

    def adopt(self, job: Job, expires: float | None = None) -> None:
        """Record `job`, handed over by another peer, unless its fingerprint is taken.

        The peer that held the job checked it for duplicates when it was
        inserted. An entry here for the same fingerprint came from a check
        made since, and it stays.

        Args:
            expires: The timer's time at which the entry expires; None
                counts its full period from now.
        """
        assert job.unique is not None
        key = fingerprint(job)
        with self._lock:
            existing = self._cache.get(key)
            # A record of this same job, kept while another peer had it,
            # gives way to the job itself.
            if existing is None or (
                isinstance(existing, RemoteEntry) and existing.id == job.id
            ):
                self._store(key, job, expires)

    def peek(self, key: str) -> Job | None:
        """Return the entry for fingerprint `key`, or None."""
        with self._lock:
            return self._cache.get(key)

    def discard(self, key: str, job: Job) -> None:
        """Remove the entry for `key` if it is still `job`."""
        with self._lock:
            if self._cache.get(key) is job:
                del self._cache[key]

    def put(
        self,
        key: str,
        job: Job,
        expires: float,
        owns: Callable[[str], bool] | None = None,
    ) -> bool:
        """Store an entry that another peer handed over, expiring at `expires`.

        An entry already here for the same fingerprint stays if it blocks
        duplicates.

        Args:
            owns: As for `insert_if_owned`: the entry is stored only if this
                peer still owns the fingerprint.

        Returns:
            False if `owns` returned false, and nothing changed.
        """
        with self._lock:
            if owns is not None and not owns(key):
                return False
            existing = self._cache.get(key)
            if (
                existing is not None
                and existing.unique is not None
                and existing.state.value in existing.unique["states"]
                # A newer record of the same job replaces the older one.
                and not (isinstance(existing, RemoteEntry) and existing.id == job.id)
            ):
                return True
            self._store(key, job, expires)
            return True

    def _store(self, key: str, job: Job, expires: float | None) -> None:
        # The caller holds the lock.
        if expires is None:
            self._cache[key] = job
            return
        self._expires[key] = expires
        try:
            self._cache[key] = job
        finally:
            self._expires.pop(key, None)

    def take(self, moving: Callable[[str], bool]) -> list[tuple[str, Job]]:
        """Remove and return the entries whose fingerprint `moving` accepts."""
        with self._lock:
            self._cache.expire()
            keys = [key for key in self._cache if moving(key)]
            return [(key, self._cache.pop(key)) for key in keys]

    def forget(self, job: Job) -> None:
        """Remove the fingerprint of `job` if `job` is the one it blocks for."""
        assert job.unique is not None
        key = fingerprint(job)
        with self._lock:
            if self._cache.get(key) is job:
                del self._cache[key]

    def __len__(self) -> int:
        with self._lock:
            self._cache.expire()
            return len(self._cache)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def _time_to_use(self, key: str, job: Job, now: float) -> float:
        expires = self._expires.get(key)
        if expires is not None:
            return expires
        assert job.unique is not None
        period = job.unique["period"]
        return math.inf if period is None else now + period
